"""The default method's constants, in one place. Each is a default measured against alternatives
(``bench/results/quality.md``, "Defaults of the default method", and ``bench/results/quality-defaults.md``).

The method's modules read them as ``defaults.NAME`` when they run, never by ``from ... import NAME``, so that
setting one here (``bench/quality.py --set NAME=VALUE``, a test's ``monkeypatch``) changes what every module
uses."""

# --- budget planning (:mod:`.budget`)
#: share of the calibration windows used to screen the single removals
SCREEN_FRACTION = 0.25
#: default budget as a share of SLEB's greedy path (in full evaluations)
BUDGET_SHARE = 0.5
#: the fewest predicted tokens on the screen for the single removals to be screened although the budget could
#: evaluate them all on all windows (:func:`~.budget.screens_singles`)
SCREEN_TOKENS = 2048
#: the fewest candidates a greedy round should evaluate on all windows when the singles are not screened
MIN_WIDTH = 4
#: share of the budget left after the screen that the greedy path may spend (the rest: swap search)
PATH_SHARE = 0.8

# --- the search (:mod:`.moves`)
#: the swap search's rounds take turns between the surrogate's best-predicted neighbours and the edge swaps
#: (:func:`~.moves.swap_round`)
EDGE_SWAPS = True

# --- the noise gate (:mod:`.noise`)
#: the swap search's answer replaces the greedy path's only when it is better by more than this many standard
#: errors of a paired difference between masks a swap apart, measured on the run's calibration windows: the
#: search's best is the least of many noisy measurements, so its measured gain runs high (a winner's curse), and
#: a wider gate trades real gains for fewer noise-chosen answers (bench/results/quality.md, "The noise gate")
GATE_SE = 1.25
#: standard deviation of the per-token log-likelihood difference of two masks a swap apart, used only where
#: the game gives no per-window NLLs to measure it from (a task utility, a game without windows): one
#: standard error is then ``DEFAULT_TOKEN_SD / sqrt(calibration tokens)`` in log PPL
DEFAULT_TOKEN_SD = 1.25

# --- the surrogate (:mod:`.surrogate`)
#: ridge on the screen's per-layer bias terms, relative to the other terms: a bias is believed only where
#: both fidelities saw the layer and disagree clearly, so that a layer seen on the screen alone is predicted
#: from the screen (bench/results/quality-defaults.md: 10, 100 and 1000 measured)
BIAS_RIDGE = 1000.0
#: ridge on the pairwise interactions, relative to the layers' own terms: an interaction is believed only as
#: far as the evaluations demand it, so that what one layer's removal costs stays in its own term
#: (bench/results/quality-defaults.md: 10, 100 and 1000 measured)
PAIR_RIDGE = 100.0
#: folds of the surrogate's held-out check (:func:`~.surrogate.surrogate_heldout`)
FOLDS = 5

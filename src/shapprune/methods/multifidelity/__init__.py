"""``shapprune``, the default method: a greedy path whose candidates are chosen by a game surrogate and by the
structure of the removed blocks, and a swap search around it; every step is decided by evaluations on all
calibration windows, and every threshold that depends on the model or the text is measured in the run.

1. **Every layer, once.** Every single removal is evaluated on all windows when that leaves each later
   round at least ``MIN_WIDTH`` candidates; otherwise, or when the screen (the first ``SCREEN_FRACTION`` of the
   windows) holds ``SCREEN_TOKENS`` predicted tokens or more, it is scored on the screen and the
   best-predicted are evaluated on all windows. The screen's reliability (rank correlation and bias of the
   masks evaluated at both fidelities) is measured and reported.
2. **The game, learned from every evaluation made.** A quadratic surrogate of log perplexity in the removed
   layers, ``c₀ + Σ cᵢrᵢ + Σ wᵢⱼrᵢrⱼ``, is fitted on every mask evaluated so far at either fidelity, with the
   screen as one more indicator, so that it learns the screen's offset and per-layer bias.
3. **Greedy path on all windows.** Round ``r`` removes one more layer. ``width`` candidates (the budget's
   ``PATH_SHARE`` spread over the rounds) are evaluated on all windows and the best of those is taken: the
   layers at the edges of the blocks removed so far (a neighbour of a removed layer can become cheap once it
   is gone, an interaction no evaluation has shown yet) take turns with the other layers, each in the
   surrogate's order. A misranking can cost a candidate its place, never decide the pick.
4. **Swap search.** Around the best mask evaluated on all windows, the swap neighbours (keep one removed
   layer, remove one kept layer) and the block swaps (two adjacent for two adjacent) are candidates; each
   round evaluates the surrogate's best-predicted in turn with the *edge swaps* (for each kept layer next to a
   removed block, its best-predicted single swap), until the budget is spent or every neighbour of the best
   has been evaluated.
5. **The noise gate.** The search's best set replaces the greedy path's only if it is better by more than
   ``GATE_SE`` standard errors of a paired difference, measured on this calibration's per-window NLLs: the
   larger of the median over the last greedy round's candidate pairs (masks a swap apart; :func:`gate_se`)
   and the paired SE of the two sets compared. A smaller gain is within what another draw of the text would
   undo.

The budget counts calibration tokens processed, in units of one evaluation on all windows (a screen counts
its share): full-evaluation equivalents, every method's budget unit (``registry.BUDGET_UNIT``); by default it is ``BUDGET_SHARE`` of SLEB's greedy path. The answer is always a mask evaluated on
all windows. The per-layer values reported are, for each removed layer, its measured marginal at the chosen
set (log PPL of the chosen set minus log PPL with that layer put back, with its paired standard error),
from the evaluations made or a few made for the report, counted apart in the cost; for the kept layers, the
surrogate's marginal (log PPL with the layer also removed minus kept), labelled as such, with the
surrogate's held-out error (5-fold, on the masks of the target size) and a warning when that is poor. The
defaults' measurements against alternatives are in ``bench/results/quality.md`` (section "Defaults of the
default method") and ``bench/results/quality-defaults.md``.

The package, one module a job (:mod:`.defaults` holds every constant above; read as ``defaults.NAME``, so that
setting one there changes the run):

* :mod:`.budget` — the default budget, the screen's windows, how the budget is spread over the rounds;
* :mod:`.ledger` — the two games, what was asked of each and its cost, the per-window NLLs;
* :mod:`.surrogate` — the game surrogate, its held-out check and warning;
* :mod:`.moves` — the candidates (removals, swaps, block swaps) and which of them a round evaluates;
* :mod:`.search` — the greedy path, the swap search, the gate between them (:func:`multifidelity_search`);
* :mod:`.noise` — paired standard errors, per-window NLLs, the noise gate;
* :mod:`.record` — the measured marginals and the search's record;
* :mod:`.method` — :func:`select_shapprune`: the screen game, the budget's check, the ``pruning.json`` record.
"""

from shapprune.methods.multifidelity import defaults
from shapprune.methods.multifidelity.budget import (
    default_budget,
    least_budget,
    needs_screen,
    path_width,
    screen_windows,
    screens_singles,
    sleb_cost,
)
from shapprune.methods.multifidelity.ledger import Ledger, MultiFidelity
from shapprune.methods.multifidelity.method import select_shapprune
from shapprune.methods.multifidelity.moves import (
    block_swaps,
    boundary,
    removals,
    round_candidates,
    swap_moves,
    swap_round,
    take_turns,
)
from shapprune.methods.multifidelity.noise import WindowNLLs, gate_se, noise_gate, paired_se
from shapprune.methods.multifidelity.record import measured_marginals, screen_reliability
from shapprune.methods.multifidelity.search import multifidelity_search
from shapprune.methods.multifidelity.surrogate import LayerSurrogate, surrogate_heldout, surrogate_warning

__all__ = ["Ledger", "LayerSurrogate", "MultiFidelity", "WindowNLLs", "block_swaps", "boundary", "default_budget",
           "defaults", "gate_se", "least_budget", "measured_marginals", "multifidelity_search", "needs_screen",
           "noise_gate", "paired_se", "path_width", "removals", "round_candidates", "screen_reliability",
           "screen_windows", "screens_singles", "select_shapprune", "sleb_cost", "surrogate_heldout",
           "surrogate_warning", "swap_moves", "swap_round", "take_turns"]

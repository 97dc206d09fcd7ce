"""Stage 3, the game: layers are players, a mask is a coalition. ``core`` holds the game (``ModelGame``: a
callable on a boolean matrix of masks) and its utilities (perplexity, KL); ``store`` keeps every evaluation;
``sampling`` draws coalitions; ``surrogate`` fits ``f(m) ≈ s(m)``; ``estimators`` turn a game and a budget into
Shapley values; ``synthetic`` holds games with known values that test them; ``distributed`` evaluates masks on
Ray workers, each holding its own ``ModelGame``."""

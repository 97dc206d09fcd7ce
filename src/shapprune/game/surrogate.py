"""Stage 2 of the paper's method: a cheap surrogate of the utility, fit on the Stage 1 evaluations.

Two surrogates, both callables on a boolean matrix of masks ``[B, L]`` returning ``[B]`` predictions:

* :class:`MLPSurrogate` — the paper's network ``Linear(L, 2L) → CELU → Linear(2L, 1) → Sigmoid`` fit with
  MSE by its published optimiser (SGD, momentum 0.9, lr 0.008, batch 300, 300 epochs, learning rate ×0.1
  every 100 epochs), in plain torch on the CPU, seeded — with masks entered as ±1 and at least 10 batches
  per epoch (see :class:`MLPConfig`: the published recipe underfits a few hundred masks badly). The sigmoid caps predictions at 1, but the utility
  ``PPL(full)/PPL(mask)`` can exceed 1 slightly (removing a layer can *lower* calibration perplexity), and
  with the published learning rate the net barely moves when the targets vary over a small range. So the
  targets are mapped affinely onto ``[0.05, 0.95]`` (their observed min and max) before fitting, and
  predictions are mapped back; the surrogate can then predict slightly beyond the observed range, never far.
* :class:`QuadraticSurrogate` — ``a₀ + Σ aᵢmᵢ + Σ_{i<j} bᵢⱼmᵢmⱼ`` by ridge least squares; its Shapley values
  have the closed form ``φᵢ = aᵢ + ½ Σ_{j≠i} bᵢⱼ``.

:func:`fit_surrogate` holds out a split stratified by stratum and reports R², Spearman ρ and Kendall τ on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats

from shapprune.errors import UserError

log = logging.getLogger(__name__)

SURROGATES = ("mlp", "quadratic")


@dataclass
class MLPConfig:
    """The paper's published optimiser settings, plus two adaptations for small Stage 1 samples.

    ``min_steps_per_epoch``: the batch is ``min(batch_size, ceil(n / min_steps_per_epoch))``, so a sample
    smaller than a few batches still gets several updates per epoch (with batch 300 and 100 masks the
    published schedule is 300 full-batch steps in all, which leaves the net close to its initialisation).
    ``center``: masks enter as ``±1`` rather than ``0/1``. ``MLPConfig(min_steps_per_epoch=1, center=False)``
    is the published recipe exactly.
    """

    epochs: int = 300
    batch_size: int = 300
    lr: float = 0.008
    momentum: float = 0.9
    step_size: int = 100
    gamma: float = 0.1
    min_steps_per_epoch: int = 10
    center: bool = True


class MLPSurrogate:
    """``Linear(L, 2L) → CELU → Linear(2L, 1) → Sigmoid`` on masks, predictions rescaled by ``scale``."""

    kind = "mlp"

    def __init__(self, net: torch.nn.Module, low: float, high: float, center: bool = True):
        self.net = net
        self.center = bool(center)
        self.low = float(low)
        self.high = float(high)

    @staticmethod
    def build(num_layers: int) -> torch.nn.Module:
        L = int(num_layers)
        return torch.nn.Sequential(torch.nn.Linear(L, 2 * L), torch.nn.CELU(), torch.nn.Linear(2 * L, 1),
                                   torch.nn.Sigmoid())

    @classmethod
    def fit(cls, masks: np.ndarray, targets: np.ndarray, seed: int = 0,
            config: MLPConfig | None = None) -> MLPSurrogate:
        cfg = config or MLPConfig()
        x = torch.as_tensor(np.asarray(masks, dtype=np.float32))
        if cfg.center:
            x = 2 * x - 1
        y = np.asarray(targets, dtype=np.float64)
        low, high = target_range(y)
        yt = torch.as_tensor(((y - low) / (high - low)).astype(np.float32))[:, None]
        gen = torch.Generator().manual_seed(int(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = cls.build(x.shape[1])
        n = x.shape[0]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: threads only add overhead
        try:
            net = cls._train(net, x, yt, n, cfg, gen)
        finally:
            torch.set_num_threads(threads)
        return cls(net, low, high, cfg.center)

    @staticmethod
    def _train(net, x, yt, n, cfg, gen):
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
        loss_fn = torch.nn.MSELoss()
        batch = max(1, min(cfg.batch_size, -(-n // max(1, cfg.min_steps_per_epoch))))
        net.train()
        for _epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, batch):
                idx = order[s : s + batch]
                opt.zero_grad()
                loss = loss_fn(net(x[idx]), yt[idx])
                loss.backward()
                opt.step()
            sched.step()
        net.eval()
        return net

    def __call__(self, masks: np.ndarray, batch_size: int = 1 << 18) -> np.ndarray:
        x = np.asarray(masks, dtype=np.float32)
        if self.center:
            x = 2 * x - 1
        out = np.empty(x.shape[0], dtype=np.float64)
        with torch.inference_mode():
            for s in range(0, x.shape[0], batch_size):
                out[s : s + batch_size] = self.net(torch.from_numpy(x[s : s + batch_size]))[:, 0].double().numpy()
        return self.low + out * (self.high - self.low)


def target_range(y: np.ndarray, margin: float = 0.05) -> tuple[float, float]:
    """An affine map of the targets into ``[margin, 1 − margin]`` of the sigmoid's range: ``(low, high)`` are the
    values that map to 0 and 1."""
    lo, hi = (float(np.min(y)), float(np.max(y))) if np.size(y) else (0.0, 1.0)
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    pad = span * margin / (1 - 2 * margin)
    return lo - pad, hi + pad


def _pair_index(num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(num_layers, k=1)


def quadratic_features(masks: np.ndarray) -> np.ndarray:
    """``[1, m_1..m_L, m_i m_j (i<j)]`` for each mask row."""
    m = np.asarray(masks, dtype=np.float64)
    iu, ju = _pair_index(m.shape[1])
    return np.concatenate([np.ones((m.shape[0], 1)), m, m[:, iu] * m[:, ju]], axis=1)


def ridge_solve(X: np.ndarray, y: np.ndarray, ridge: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Ridge least squares: the coefficients solving ``(XᵀX + diag(pen)) w = Xᵀy``, with each column's penalty
    ``pen = ridge · rows · weights`` (``weights``: a column's penalty relative to the others, 0 unpenalised; by
    default 1 for every column but the first, the intercept). The one ridge solve of every quadratic surrogate
    (:class:`QuadraticSurrogate`, the default method's ``LayerSurrogate``)."""
    X = np.asarray(X, dtype=np.float64)
    if weights is None:
        weights = np.ones(X.shape[1])
        weights[0] = 0.0
    pen = float(ridge) * max(1, X.shape[0]) * np.asarray(weights, dtype=np.float64)
    return np.linalg.solve(X.T @ X + np.diag(pen) + 1e-12 * np.eye(X.shape[1]), X.T @ y)


class QuadraticSurrogate:
    """``a₀ + Σ aᵢmᵢ + Σ_{i<j} bᵢⱼmᵢmⱼ`` fit by ridge least squares (intercept not penalised)."""

    kind = "quadratic"

    def __init__(self, a0: float, a: np.ndarray, b: np.ndarray):
        self.a0 = float(a0)
        self.a = np.asarray(a, dtype=np.float64)
        self.b = np.asarray(b, dtype=np.float64)  # symmetric [L, L], zero diagonal

    @classmethod
    def fit(cls, masks: np.ndarray, targets: np.ndarray, ridge: float = 1e-4) -> QuadraticSurrogate:
        X = quadratic_features(masks)
        y = np.asarray(targets, dtype=np.float64)
        L = np.asarray(masks).shape[1]
        w = ridge_solve(X, y, ridge)
        b = np.zeros((L, L))
        iu, ju = _pair_index(L)
        b[iu, ju] = w[1 + L :]
        b = b + b.T
        return cls(w[0], w[1 : 1 + L], b)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        m = np.asarray(masks, dtype=np.float64)
        return self.a0 + m @ self.a + 0.5 * np.einsum("bi,ij,bj->b", m, self.b, m)

    def shapley_values(self) -> np.ndarray:
        """Closed form: ``φᵢ = aᵢ + ½ Σ_{j≠i} bᵢⱼ``."""
        return self.a + 0.5 * self.b.sum(axis=1)


@dataclass
class SurrogateFit:
    """A fitted surrogate and its held-out quality (``None`` metrics when nothing could be held out)."""

    surrogate: object
    kind: str
    heldout_r2: float | None
    heldout_spearman: float | None
    heldout_kendall: float | None
    heldout_measured: list[float] = field(default_factory=list)
    heldout_predicted: list[float] = field(default_factory=list)
    heldout_strata: list[int] = field(default_factory=list)
    train_size: int = 0

    def metrics(self) -> dict:
        return {"kind": self.kind, "heldout_r2": self.heldout_r2, "heldout_spearman": self.heldout_spearman,
                "heldout_kendall": self.heldout_kendall}


def stratified_split(strata: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean held-out indicator: ``round(fraction · n_s)`` rows of each stratum, at least one row of every
    stratum with two or more rows, never a whole stratum."""
    strata = np.asarray(strata)
    held = np.zeros(strata.shape[0], dtype=bool)
    for k in np.unique(strata):
        rows = np.flatnonzero(strata == k)
        if rows.size < 2:
            continue
        n = int(min(rows.size - 1, max(1, round(fraction * rows.size))))
        held[rng.choice(rows, size=n, replace=False)] = True
    return held


def r2_score(y: np.ndarray, p: np.ndarray) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    ss = float(np.sum((y - y.mean()) ** 2))
    return float(1.0 - np.sum((y - p) ** 2) / ss) if ss > 0 else float("nan")


def _finite(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def fit_surrogate(kind: str, masks: np.ndarray, targets: np.ndarray, strata: np.ndarray,
                  rng: np.random.Generator, heldout: float = 0.2, mlp: MLPConfig | None = None,
                  ridge: float = 1e-4) -> SurrogateFit:
    """Fit a surrogate of ``kind`` on all but a stratified held-out split, and score it on that split.

    The surrogate returned is the one fit on the training split, so the metrics describe it.
    """
    if kind not in SURROGATES:
        raise UserError(f"unknown surrogate {kind!r}; choose one of {', '.join(SURROGATES)}")
    masks = np.asarray(masks, dtype=bool)
    targets = np.asarray(targets, dtype=np.float64)
    held = stratified_split(strata, heldout, rng) if heldout > 0 else np.zeros(len(targets), bool)
    train = ~held
    seed = int(rng.integers(2**31))
    if kind == "mlp":
        sur = MLPSurrogate.fit(masks[train], targets[train], seed=seed, config=mlp)
    else:
        sur = QuadraticSurrogate.fit(masks[train], targets[train], ridge=ridge)
    r2 = rho = tau = None
    meas = targets[held]
    pred = sur(masks[held]) if held.any() else np.zeros(0)
    if held.sum() >= 3:
        r2 = _finite(r2_score(meas, pred))
        rho = _finite(stats.spearmanr(meas, pred).statistic)
        tau = _finite(stats.kendalltau(meas, pred).statistic)
        log.info("surrogate %s: held-out R² %s, Spearman %s, Kendall %s (%d held out, %d train)", kind,
                 _fmt(r2), _fmt(rho), _fmt(tau), int(held.sum()), int(train.sum()))
    return SurrogateFit(sur, kind, r2, rho, tau, meas.tolist(), np.asarray(pred).tolist(),
                        np.asarray(strata)[held].astype(int).tolist(), int(train.sum()))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"

"""Which training-free repair? Linear-map variants compared on held-out perplexity (the healing check's
windows: the last windows of 2,048 tokens of ``valid.tokens.txt`` outside the calibration windows) and, for
information only, on the first test windows (never used to choose).

Every variant fits one map per run of removed layers, from the same single pass of the unpruned model over the
same healing windows (:func:`shapprune.heal.linear.collect_stats` for the least-squares variants; the raw
activations for the others), and folds it where ``--heal linear`` folds it:

- ``ls``: ridge least squares (ridge chosen by 4-fold held-out error), every position (ReplaceMe's lstsq);
- ``ls-nofirst``: the same without each window's first position (the attention sink): **the default**;
- ``ls-clip``: positions weighted by ``min(1, median‖Z‖/‖Z‖)²`` (huge-norm tokens down-weighted), first dropped;
- ``cosine``: ReplaceMe's cosine objective ``1 − cos(M·T + Y, Z)``, Adam (lr 1e-4, 200 steps of 1,024 tokens)
  started from ``ls-nofirst``;
- ``hadamard-diag``: LinearPatch's structure ``T = H·diag(s)·Hᵀ`` (``H`` Hadamard, or a seeded orthogonal
  matrix where ``D`` is not a power of two), ``s`` by least squares;
- ``scalar``: one scale ``c·I`` by least squares, the magnitude compensation of Prune&Comp restricted to what
  folds into the MLP output (rescaling the whole residual stream would untie the embedding from the head).
- ``norm-full`` (only where a norm follows the MLP, Gemma 3): a full ``T`` on the MLP's output *before* the
  norm, with the norm's weight, fitted through the norm by Adam (``n`` the RMS
  normalisation; started from the identity and the diagonal least-squares weight): it folds exactly into the
  output projection (``W ← Tᵀ·W``) and the norm's weight. ``norm-full`` fits ReplaceMe's cosine objective
  ``1 − cos(Y + g ⊙ n(m·T), Z)`` (what ``--heal linear`` does there), ``norm-full-mse`` the squared error.

Where the block before a run normalises its MLP output (Gemma 3), every variant is restricted to a diagonal map.
"""

from __future__ import annotations

import math
import time

import common
import torch


def main() -> None:
    ap = common.parser(__doc__, out="bench/results/healing-linear-variants.md")
    ap.set_defaults(dtype="auto")
    ap.add_argument("--drop", required=True, help="layers removed, e.g. 3,4,5,6,25,26")
    ap.add_argument("--variants", default="ls,ls-nofirst,ls-clip,cosine,hadamard-diag,scalar")
    ap.add_argument("--tokens", type=int, default=65536, help="healing tokens (default: %(default)s)")
    ap.add_argument("--heldout", type=int, default=16, help="held-out windows of 2,048 (default: %(default)s)")
    ap.add_argument("--test-windows", type=int, default=8)
    ap.add_argument("--norm-steps", type=int, default=None, help="Adam steps of norm-full (default: the library's)")
    ap.add_argument("--norm-lr", type=float, default=None, help="Adam learning rate of norm-full (default: the library's)")
    a = common.parse(ap)

    from shapprune.engine.ppl import sequence_nll
    from shapprune.game.norm_maps import NormMap, apply_norm_map
    from shapprune.heal import heal_windows
    from shapprune.heal.check import decide, window_log_ppl
    from shapprune.heal.linear import Stats, apply_map, collect_stats, fit_map, run_targets, runs_of
    from shapprune.models.layers import find_layer_stack, keep_layers

    removed = common.ints(a.drop)
    model, tok = common.load(a.model, a.dtype)
    calib = common.calibration(tok, "5x256r")  # the README's calibration: its windows are excluded
    hd = heal_windows(tok, str(common.VALID), 2048, a.tokens, calib, calib.bos, heldout=a.heldout,
                      heldout_seqlen=2048)
    test = common.test_windows(tok, a.test_windows)
    stack = find_layer_stack(model)
    kept = [i for i in range(stack.num_layers) if i not in removed]
    runs = runs_of(removed)
    targets = {r: t for r, t in run_targets(model, runs).items() if t.module is not None}

    def per_window(ids):
        with keep_layers(model, kept), torch.inference_mode():
            nll = sequence_nll(model, ids, batch_size=1, progress=False)
        return window_log_ppl(nll.per_window, ids.shape[1] - 1)

    def ppl(w):
        return math.exp(sum(w) / len(w))

    base_h, base_t = per_window(hd.heldout), per_window(test.input_ids)
    rows = [{"variant": "none", "heldout_ppl": ppl(base_h), "test_ppl": ppl(base_t)}]
    print(rows[-1], flush=True)

    # raw activations of one pass (for the variants that are not plain least squares)
    cap: dict = {}
    hooks = []
    for (r0, r1), tg in targets.items():
        hooks.append(tg.module.register_forward_hook(
            lambda m, i, o, k=(r0, r1), s=tg.scale: cap.setdefault(("M", k), []).append(o.float() * s)))
        if tg.diagonal:
            hooks.append(tg.module.register_forward_hook(
                lambda m, i, o, k=(r0, r1): cap.setdefault(("P", k), []).append(i[0].float())))
        hooks.append(stack.layers[r0 - 1].register_forward_hook(
            lambda m, i, o, k=(r0, r1): cap.setdefault(("H", k), []).append((o[0] if isinstance(o, tuple) else o).float())))
        hooks.append(stack.layers[r1].register_forward_hook(
            lambda m, i, o, k=(r0, r1): cap.setdefault(("Z", k), []).append((o[0] if isinstance(o, tuple) else o).float())))
    t0 = time.time()
    with torch.inference_mode():
        for s in range(hd.train.shape[0]):
            model(input_ids=hd.train[s:s + 1], use_cache=False)
    for h in hooks:
        h.remove()
    act = {k: {n: torch.cat(cap[(n, k)]) for n in "MHZP" if (n, k) in cap} for k in targets}
    pass_s = time.time() - t0

    def weights(k, kind):
        Z = act[k]["Z"]
        w = torch.ones(Z.shape[:2])
        if kind != "all":
            w[:, 0] = 0
        if kind == "clip":
            nz = Z.norm(dim=-1)
            w = w * torch.clamp(nz[:, 1:].median() / nz, max=1.0) ** 2
        return w

    def weighted_stats(k, kind):
        M, H, Z = act[k]["M"], act[k]["H"], act[k]["Z"]
        R = Z - (H - M)
        w = weights(k, kind)
        st = [Stats.zeros(M.shape[-1]) for _ in range(4)]
        for i in range(M.shape[0]):
            sw = w[i].sqrt()[:, None].double()
            st[i % 4].add(M[i].double() * sw, R[i].double() * sw)
        return st

    def cosine(k, T0, steps=200, lr=1e-4):
        M, H, Z = act[k]["M"], act[k]["H"], act[k]["Z"]
        D = M.shape[-1]
        Mf, Yf, Zf = M[:, 1:].reshape(-1, D), (H - M)[:, 1:].reshape(-1, D), Z[:, 1:].reshape(-1, D)
        g = torch.Generator().manual_seed(0)
        T = torch.nn.Parameter(T0.float().clone())
        opt = torch.optim.Adam([T], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(0, Mf.shape[0], (1024,), generator=g)
                loss = (1 - torch.nn.functional.cosine_similarity(Mf[idx] @ T + Yf[idx], Zf[idx], dim=-1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return T.detach().double()

    def rotation(D):
        if D & (D - 1) == 0:
            H = torch.ones(1, 1, dtype=torch.float64)
            while H.shape[0] < D:
                H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
            return H / math.sqrt(D)
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        return q

    def structured(k, kind):
        M, H, Z = act[k]["M"][:, 1:], act[k]["H"][:, 1:], act[k]["Z"][:, 1:]
        D = M.shape[-1]
        Mf, Rf = M.reshape(-1, D).double(), (Z - (H - M)).reshape(-1, D).double()
        if kind == "scalar":
            return float((Mf * Rf).sum() / (Mf * Mf).sum()) * torch.eye(D, dtype=torch.float64)
        Q = rotation(D)
        Mr, Rr = Mf @ Q, Rf @ Q
        s = (Mr * Rr).sum(0) / (Mr * Mr).sum(0).clamp_min(1e-12)
        return Q @ torch.diag(s) @ Q.T

    def norm_full(k, tg, t0, objective):
        """The library's fit through the norm (what --heal linear does), on this pass's windows, first position cut."""
        from shapprune.game.norm_maps import fit_through_norm

        rows = [(P[1:], Y[1:], Z[1:]) for P, Y, Z in zip(act[k]["P"], act[k]["H"] - act[k]["M"], act[k]["Z"],
                                                         strict=True)]
        given = {k: v for k, v in (("steps", a.norm_steps), ("lr", a.norm_lr)) if v is not None}
        nm, info = fit_through_norm(rows, tg, t0, objective=objective, **given)
        print(f"{v} {k}: {info}", flush=True)
        return nm

    stats_default = None
    for v in a.variants.split(","):
        t1 = time.time()
        maps = {}
        for k, tg in targets.items():
            if v in ("ls", "ls-nofirst", "ls-clip"):
                st = weighted_stats(k, {"ls": "all", "ls-nofirst": "nofirst", "ls-clip": "clip"}[v])
                maps[k], _ = fit_map(st, tg.diagonal)
            elif v == "cosine":
                T0, _ = fit_map(weighted_stats(k, "nofirst"), tg.diagonal)
                T0 = T0 if T0 is not None else torch.eye(act[k]["M"].shape[-1], dtype=torch.float64)
                maps[k] = T0 if tg.diagonal else cosine(k, T0)
            elif v in ("hadamard-diag", "scalar"):
                maps[k] = structured(k, "scalar" if v == "scalar" else "rot")
                if tg.diagonal and v == "hadamard-diag":
                    maps[k] = torch.diag(torch.diagonal(maps[k]))
            elif v in ("norm-full", "norm-full-mse"):
                T0, _ = fit_map(weighted_stats(k, "nofirst"), tg.diagonal)
                if tg.diagonal:
                    T0 = T0 if T0 is not None else torch.eye(act[k]["M"].shape[-1], dtype=torch.float64)
                    nm = norm_full(k, tg, T0, "squared" if v == "norm-full-mse" else "cosine")
                    maps[k] = T0 if nm is None else nm
                else:
                    maps[k] = T0
        fit_s = time.time() - t1
        undo = []
        for k, T in maps.items():
            if isinstance(T, NormMap):
                undo.append(apply_norm_map(targets[k], T))
            elif T is not None:
                undo.append(apply_map(targets[k], T))
        h, t = per_window(hd.heldout), per_window(test.input_ids)
        for u in undo:
            u()
        c = decide(v, base_h, h)
        rows.append({"variant": v, "heldout_ppl": ppl(h), "test_ppl": ppl(t), "heldout_log_drop": c.drop,
                     "heldout_se": c.se, "fit_seconds": round(fit_s, 1)})
        print(rows[-1], flush=True)
    # the library's own path (what --heal linear runs) must equal ls-nofirst
    t2 = time.time()
    stats_default = collect_stats(model, runs, hd.train, batch_size=1)
    lib_s = time.time() - t2
    undo = []
    for k, st in stats_default.items():
        T, _ = fit_map(st, targets[k].diagonal)
        if T is not None:
            undo.append(apply_map(targets[k], T))
    h = per_window(hd.heldout)
    for u in undo:
        u()
    rows.append({"variant": "library (--heal linear's fit)", "heldout_ppl": ppl(h), "test_ppl": None,
                 "fit_seconds": round(lib_s, 1)})

    full_h = None
    with torch.inference_mode():
        full_h = sequence_nll(model, hd.heldout, batch_size=1, progress=False).perplexity
        full_t = sequence_nll(model, test.input_ids, batch_size=1, progress=False).perplexity

    def gap(before, after, full):
        return (math.log(before) - math.log(after)) / (math.log(before) - math.log(full))

    head = ["variant", "held-out PPL", "held-out gap closed", "log drop ± SE", f"test PPL ({a.test_windows} windows)",
            "test gap closed", "fit s"]
    body = []
    for r in rows:
        body.append([r["variant"], f"{r['heldout_ppl']:.2f}",
                     "" if r["variant"] == "none" else f"{100 * gap(rows[0]['heldout_ppl'], r['heldout_ppl'], full_h):.0f}%",
                     f"{r['heldout_log_drop']:.3f} ± {r['heldout_se']:.3f}" if "heldout_se" in r else "",
                     "" if r["test_ppl"] is None else f"{r['test_ppl']:.2f}",
                     "" if r["variant"] == "none" or r["test_ppl"] is None else
                     f"{100 * gap(rows[0]['test_ppl'], r['test_ppl'], full_t):.0f}%", r.get("fit_seconds", "")])
    text = (f"Model `{a.model}`, removed {removed}; full model: held-out {full_h:.2f}, test {full_t:.2f}. "
            f"Healing: {hd.train.shape[0]} windows of 2,048 tokens; held-out: {hd.heldout.shape[0]} windows of "
            f"2,048 tokens; one pass of the unpruned model to collect activations: {pass_s:.1f} s.\n\n"
            + common.table(head, body))
    common.write_results(a.out, "Training-free repair variants", text, data={"rows": rows, "removed": removed})


if __name__ == "__main__":
    main()

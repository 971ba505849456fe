"""Fitter benchmark: streaming sufficient statistics + ridge solve, from activations in RAM.

* ``accumulate``: :class:`SufficientStats.update` over chunks of x (in host RAM, moved to the
  device chunk by chunk) and synthetic sparse targets (``per_tok`` active features per token,
  depending linearly on x);
* ``gemm_only``: the same chunks moved the same way and multiplied ``xᵀx`` in float32, nothing
  else: the limit of the accumulation;
* ``solve``: :func:`solve_ridge` for every feature;
* ``sklearn``: ``sklearn.linear_model.Ridge(alpha, fit_intercept=True)`` on the same rows with a
  dense Y of the first ``sklearn_feat`` features, against xprobe on the same data: time ratio
  and the largest coefficient difference;
* ``wide``: optionally, a fitter-only run at ``wide_feat`` features (1,048,576 on the GPU size):
  a few chunks accumulated for train and held-out, then solved; peak device memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.bench.common import Timer, device, peak_gpu_mib, peak_rss_mib


def sparse_targets(x: torch.Tensor, n_feat: int, per_tok: int, seed: int = 0):
    """COO Y: ``per_tok`` distinct features per row (one per stripe of n_feat/per_tok columns),
    values 1 + x[row, col % d] + noise (so Y depends linearly on x)."""
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    stride = n_feat // per_tok
    start = torch.randint(0, n_feat, (n, 1), generator=g)
    offs = torch.randint(0, stride, (n, per_tok), generator=g)
    cols = ((start + torch.arange(per_tok) * stride + offs) % n_feat).reshape(-1)
    rows = torch.arange(n).repeat_interleave(per_tok)
    vals = 1 + x[rows, cols % d].float() + 0.1 * torch.randn(len(rows), generator=g)
    return rows, cols, vals


def _inputs(n_rows: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """x [n_rows, d] with correlated columns and a non-zero mean, in host RAM."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    out = torch.empty(n_rows, d, dtype=dtype)
    for start in range(0, n_rows, 65536):
        stop = min(start + 65536, n_rows)
        out[start:stop] = torch.randn(stop - start, d, generator=g) @ mix + 0.5
    return out.pin_memory() if torch.cuda.is_available() else out


def _chunks(rows: torch.Tensor, n: int, chunk: int):
    """Per chunk of ``chunk`` rows: (first row, last row, first entry, last entry) of row-sorted COO."""
    bounds = torch.searchsorted(rows, torch.arange(0, n + chunk, chunk).clamp(max=n))
    for i in range(len(bounds) - 1):
        yield i * chunk, min((i + 1) * chunk, n), int(bounds[i]), int(bounds[i + 1])


def _accumulate(stats, x, rows, cols, vals, n_tok: int, chunk: int) -> None:
    """Feed ``n_tok`` tokens to ``stats``, cycling over the buffer ``x`` chunk by chunk."""
    dev = stats.device
    fed = 0
    while fed < n_tok:
        for r0, r1, e0, e1 in _chunks(rows, len(x), chunk):
            if fed >= n_tok:
                break
            stats.update(
                x[r0:r1].to(dev, non_blocking=True),
                (rows[e0:e1] - r0).to(dev, non_blocking=True),
                cols[e0:e1].to(dev, non_blocking=True),
                vals[e0:e1].to(dev, non_blocking=True),
            )
            fed += r1 - r0


def _gemm_only(x, n_tok: int, chunk: int, dev: str) -> None:
    d = x.shape[1]
    g = torch.zeros(d, d, device=dev)
    fed = 0
    while fed < n_tok:
        for r0 in range(0, len(x), chunk):
            if fed >= n_tok:
                break
            xc = x[r0 : r0 + chunk].to(dev, non_blocking=True).float()
            g += xc.T @ xc
            fed += len(xc)


def bench_fit(work: Path, p: dict) -> dict:
    from pipeline.maths.lstsq import SufficientStats, solve_ridge

    dev = device()
    d, n_feat, chunk, n_tok = p["d"], p["n_feat"], p["chunk"], p["n_tok"]
    x_dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    x = _inputs(min(n_tok, p["buffer_rows"]), d, x_dtype)
    rows, cols, vals = sparse_targets(x, n_feat, p["per_tok"])

    stats = SufficientStats(d, n_feat, torch.device(dev), torch.float32)
    _accumulate(
        stats, x[:chunk], rows[rows < chunk], cols[rows < chunk], vals[rows < chunk], chunk, chunk
    )  # warm-up
    stats = SufficientStats(d, n_feat, torch.device(dev), torch.float32)
    with Timer() as acc:
        _accumulate(stats, x, rows, cols, vals, n_tok, chunk)
    with Timer() as gemm:
        _gemm_only(x, n_tok, chunk, dev)
    with Timer() as solve:
        solve_ridge(stats, None, [p["alpha"]])
    del stats
    out = {
        "device": dev,
        "n_tok": n_tok,
        "x_dtype_in_ram": str(x_dtype).removeprefix("torch."),
        "buffer_rows": len(x),
        "d": d,
        "n_feat": n_feat,
        "active_per_token": p["per_tok"],
        "chunk_rows": chunk,
        "compute_dtype": "float32 products, float64 accumulation",
        "accumulate_s": round(acc.s, 3),
        "accumulate_tokens_per_s": round(n_tok / acc.s),
        "gemm_only_s": round(gemm.s, 3),
        "gemm_only_tokens_per_s": round(n_tok / gemm.s),
        "ratio_accumulate_vs_gemm": round(gemm.s / acc.s, 3),
        "solve_s": round(solve.s, 3),
        "fit_tokens_per_s_incl_solve": round(n_tok / (acc.s + solve.s)),
        "target_gpu_tokens_per_s": ">= 1,000,000 (H100-class, d=2304, F=16384)",
        "sklearn": _versus_sklearn(x, rows, cols, vals, p),
    }
    out["single_layer_model"] = _single_layer(x, p, n_tok / acc.s, solve.s)
    if p.get("wide_feat"):
        out["wide"] = _wide(x, rows, cols, vals, p)
    out["peak_rss_MiB"] = peak_rss_mib()
    out["peak_gpu_MiB"] = peak_gpu_mib()
    return out


def _single_layer(x, p: dict, linear_tok_s: float, linear_solve_s: float) -> dict:
    """The single-layer model's statistics (pipeline/probes/encoder.py) on the same chunks: B's x
    against A's residual ``a = x·M`` (d_A = d), and ``Σ a aᵀ``: dense, independent of F. Then its
    closed-form solve for ``n_feat`` features from a random encoder ``E [d, F]``. Ratios against
    the linear probe's sparse ``XᵀY`` accumulation and solve measured above."""
    from pipeline.maths.lstsq import SufficientStats, solve_ridge
    from pipeline.probes.encoder import PreactivationTargets

    dev, d, n_feat, chunk, n_tok = device(), x.shape[1], p["n_feat"], p["chunk"], p["n_tok"]
    g = torch.Generator().manual_seed(1)
    mix = (torch.randn(d, d, generator=g) / d**0.5).to(dev)
    cross = SufficientStats(d, d, torch.device(dev), torch.float32)
    own = SufficientStats(d, 0, torch.device(dev), torch.float32)
    with Timer() as acc:
        fed = 0
        while fed < n_tok:
            for r0 in range(0, len(x), chunk):
                if fed >= n_tok:
                    break
                xb = x[r0 : r0 + chunk].to(dev, non_blocking=True).float()
                a = xb @ mix
                cross.update_dense(xb, a)
                own.update_dense(a, a.new_zeros(len(a), 0))
                fed += len(xb)
    enc = torch.randn(d, n_feat, generator=g).to(dev)
    with Timer() as solve:
        targets = PreactivationTargets(
            cross, own, enc, torch.zeros(n_feat), torch.full((n_feat,), 100), 16384
        )
        solve_ridge(targets, None, [p["alpha"]])  # type: ignore[arg-type]
    tok_s = n_tok / acc.s
    return {
        "accumulate_tokens_per_s": round(tok_s),
        "ratio_accumulate_vs_linear_probe": round(tok_s / linear_tok_s, 3),
        "solve_s": round(solve.s, 3),
        "ratio_solve_vs_linear_probe": round(solve.s / linear_solve_s, 3),
        "note": "statistics d_B×d_B + d_A×d_B + d_A×d_A float64, whatever F; the linear "
        "probe's XᵀY is F×d_B per split",
    }


def _versus_sklearn(x, rows, cols, vals, p: dict) -> dict:
    """xprobe vs sklearn Ridge on the first ``sklearn_rows`` rows and ``sklearn_feat`` features
    (skipped where scikit-learn is not installed: a dev dependency, absent on a bare GPU box)."""
    try:
        from sklearn.linear_model import Ridge
    except ImportError:
        return {"skipped": "scikit-learn is not installed (pip install scikit-learn)"}

    from pipeline.maths.lstsq import SufficientStats, solve_ridge

    n, f_sub, alpha, chunk = p["sklearn_rows"], p["sklearn_feat"], p["alpha"], p["chunk"]
    keep = (rows < n) & (cols < f_sub)
    r, c, v = rows[keep], cols[keep], vals[keep]
    dev = device()
    with Timer() as ours:
        stats = SufficientStats(x.shape[1], f_sub, torch.device(dev), torch.float32)
        _accumulate(stats, x[:n], r, c, v, n, chunk)
        res = solve_ridge(stats, None, [alpha], direction_dtype=torch.float64)
    y = np.zeros((n, f_sub), np.float32)
    y[r.numpy(), c.numpy()] = v.numpy()
    xn = x[:n].float().numpy()
    with Timer() as theirs:
        ridge = Ridge(alpha=alpha, fit_intercept=True).fit(xn, y)
    coef = np.asarray(ridge.coef_, np.float64)
    return {
        "rows": n,
        "features": f_sub,
        "alpha": alpha,
        "sklearn_s": round(theirs.s, 3),
        "xprobe_s": round(ours.s, 3),
        "time_ratio_xprobe_vs_sklearn": round(ours.s / theirs.s, 3),
        "max_rel_coef_diff": float(np.abs(res["direction"] - coef).max() / np.abs(coef).max()),
        "max_abs_intercept_diff": float(np.abs(res["intercept"] - ridge.intercept_).max()),
        "note": "sklearn gets a dense float32 Y [rows, features]; xprobe the same entries as COO, "
        "float32 d×d products (compute_dtype) with float64 accumulation",
    }


def _wide(x, rows, cols, vals, p: dict) -> dict:
    """Train + held-out statistics at ``wide_feat`` features over a few chunks, then the solve."""
    from pipeline.maths.lstsq import SufficientStats, solve_ridge

    dev, d, wide, chunk = device(), x.shape[1], p["wide_feat"], p["chunk"]
    spread = (cols * (wide // p["n_feat"])) % wide  # the same entries spread over all features
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with Timer() as t:
        train = SufficientStats(d, wide, torch.device(dev), torch.float32)
        held = SufficientStats(d, wide, torch.device(dev), torch.float32)
        n = min(len(x), p["wide_tokens"])
        half = (n // 2 // chunk) * chunk or n // 2
        first, second = rows < half, (rows >= half) & (rows < n)
        _accumulate(train, x[:half], rows[first], spread[first], vals[first], half, chunk)
        _accumulate(
            held, x[half:n], rows[second] - half, spread[second], vals[second], n - half, chunk
        )
    with Timer() as s:
        result = solve_ridge(train, held, [0.0, 1e-2, 1.0], feature_block=p["feature_block"])
    return {
        "n_feat": wide,
        "d": d,
        "tokens": n,
        "accumulate_s": round(t.s, 2),
        "solve_s": round(s.s, 2),
        "n_ok": int((result["status"] == 0).sum()),
        "peak_gpu_MiB": peak_gpu_mib(),
        "fits_80GB": None if peak_gpu_mib() is None else peak_gpu_mib() < 80 * 1000**3 / 2**20,
    }

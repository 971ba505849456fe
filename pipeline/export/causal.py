"""Causal agreement: does B's write direction do to B's next token what A's feature does to A's?

A and B share a tokenizer, so their next-token distributions live in one vocabulary. For each
chosen feature f and up to ``n_contexts`` held-out tokens t where f fires in A (the first ones
in corpus order), with α_f the mean of those activations:

- steering: ``Δ_A = log p_A(· | x_t + α_f·d_A) − log p_A(· | x_t)`` with d_A the change of A's
  SAE reconstruction per unit of f (``decode(e_f) − decode(0)``) added at A's SAE hook, at t only;
  ``Δ_B`` the same in B with B's write direction at B's hook; ``cos_steer`` the cosine of Δ_A and
  Δ_B over the vocabulary, ``cos_null`` the mean cosine of Δ_A with B steered along
  ``n_null`` random directions of the same norm drawn *within B's own activation covariance*
  (v = Σ_B^{1/2}·g, g ~ N(0, I), rescaled to ‖α_f·d_B‖; drawn per context, seeded),
  ``abs_cos_null`` the mean of their magnitudes, and ``z_steer`` = (cos_steer − cos_null) / s,
  with s the spread of the null's cosines about their context's mean, pooled over the feature's
  contexts. A large push in any direction B's stream actually varies along moves log-probs in a
  shared way (the null's cosine was 0.68 beside a perfect B's 0.77 with isotropic directions),
  so only the excess over that null, in its own units, says B's direction does A's feature's
  work: z large for an exact rotation of A, ~0 for a randomly initialised B. An isotropic null
  is blind to B's basis; this one is B's own;
- ablation: B's next-token loss at t with the probe direction projected out of B's residual at
  every position up to t, minus the clean loss (``dloss_probe``), the same for the write
  direction (``dloss_write``) and for a random direction (``dloss_random``).

Per feature the medians over its contexts are reported (one row per feature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import XprobeError
from pipeline.export.measure import load_model, splice
from pipeline.export.sae import FitSource
from pipeline.report.causal import MEASURES
from pipeline.store.layout import acts_unit, safe_name
from pipeline.store.sparse import load_sparse


@dataclass
class Contexts:
    """Firing contexts, one row per (feature, context)."""

    feature: np.ndarray  # [R] A's feature id
    seq: np.ndarray  # [R] corpus sequence
    pos: np.ndarray  # [R] position in the sequence
    value: np.ndarray  # [R] the feature's activation there


def firing_contexts(source: FitSource, features: np.ndarray, n_contexts: int) -> Contexts:
    """Up to ``n_contexts`` held-out counted tokens per feature where A's feature fires."""
    store, info = source.store, source.store.info(source.tokens)
    held = source.held_out()
    ctx, chunk_seqs = int(info["ctx"]), int(info["chunk_seqs"])
    wanted = set(int(f) for f in features)
    found: dict[int, list[tuple[int, int, float]]] = {f: [] for f in wanted}
    for index in range(int(info["n_chunks"])):
        if all(len(v) >= n_contexts for v in found.values()):
            break
        mask = store.read_chunk(f"{source.tokens}/mask", index).reshape(-1)
        rows, cols, vals = (t.numpy() for t in load_sparse(store, source.feats, index))
        seq = index * chunk_seqs + rows // ctx
        # the last position has no next token: skip it
        keep = mask[rows] & held[seq] & (vals > 0) & (rows % ctx < ctx - 1)
        for r, c, v, s in zip(rows[keep], cols[keep], vals[keep], seq[keep], strict=True):
            if int(c) in wanted and len(found[int(c)]) < n_contexts:
                found[int(c)].append((int(s), int(r % ctx), float(v)))
    rows_out = [(f, s, p, v) for f in sorted(found) for s, p, v in found[f]]
    if not rows_out:
        raise XprobeError("none of the chosen features fires on the held-out tokens")
    f, s, p, v = (np.array(col) for col in zip(*rows_out, strict=True))
    return Contexts(f.astype(np.int64), s.astype(np.int64), p.astype(np.int64), v)


def _at_position(vectors: torch.Tensor, pos: torch.Tensor):
    """Add ``vectors [R, d]`` to the residual [R, L, d] at row r, position ``pos[r]``."""

    def replace(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[torch.arange(len(h)), pos] += vectors.to(h.dtype)
        return h

    return replace


def _project_out(units: torch.Tensor):
    """Remove each row's component along ``units [R, d]`` (unit vectors) at every position."""

    def replace(h: torch.Tensor) -> torch.Tensor:
        u = units.to(h.dtype)[:, None, :]
        return h - (h * u).sum(-1, keepdim=True) * u

    return replace


def covariance_root(source: FitSource, max_tokens: int = 4096) -> torch.Tensor:
    """[d, d] float64: Σ_B^{1/2}, the symmetric square root of the covariance of B's activations
    on (at least ``max_tokens``) training tokens of the fit: random directions ``Σ^{1/2}·g`` have
    the shape of B's own variation."""
    parts = [x[mask] for _, mask, x in source.sequences(False, max_tokens)]
    if not parts:
        raise XprobeError("the fit has no training tokens to estimate B's activation covariance")
    x = torch.cat(parts).double()
    x = x - x.mean(0)
    values, vectors = torch.linalg.eigh(x.T @ x / max(len(x) - 1, 1))
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def null_z(cos_steer: np.ndarray, null: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """[R] z of each context's steering cosine against its null: (cos_steer − mean of the
    context's ``null [R, n_null]`` cosines) / s_f, s_f the within-context standard deviation of
    the null pooled over the contexts of the context's ``feature [R]`` (NaN with fewer than 2
    draws per context or a null that does not vary)."""
    n_null = null.shape[1]
    centre = null.mean(1)
    out = np.full(len(cos_steer), np.nan)
    if n_null < 2:
        return out
    deviation = ((null - centre[:, None]) ** 2).sum(1)
    for f in np.unique(feature):
        here = feature == f
        spread = np.sqrt(deviation[here].sum() / (here.sum() * (n_null - 1)))
        if spread > 0:
            out[here] = (cos_steer[here] - centre[here]) / spread
    return out


def _log_probs_at(model: Any, hook: str, ids: torch.Tensor, pos: torch.Tensor, replace) -> Any:
    """log p(next token) at ``pos`` [R] for ``ids`` [R, L], the hook spliced: [R, vocab] float64."""
    with torch.no_grad(), splice(model, hook, replace):
        logits = model(input_ids=ids, use_cache=False).logits
    return torch.log_softmax(logits[torch.arange(len(ids)), pos].double(), -1)


def causal_agreement(
    source: FitSource,
    features: np.ndarray,
    n_contexts: int = 8,
    device: str = "cpu",
    batch: int = 64,
    seed: int = 0,
    steer_b: np.ndarray | None = None,
    n_null: int = 8,
) -> Any:
    """One row per feature (pandas DataFrame): ``feature, n_contexts, alpha, cos_steer,
    cos_null, abs_cos_null, z_steer, dloss_probe, dloss_write, dloss_random`` (medians over its
    contexts; see the module).

    ``features`` [n] ascending; ``steer_b [n, d_B]``: directions to steer B with, per unit of
    activation, instead of B's write directions (e.g. the probe directions)."""
    import pandas as pd

    store = source.store
    contexts = firing_contexts(source, features, n_contexts)
    sae_a = source.sae_a(device)
    hook_a = sae_a.cfg.metadata.hook_name
    feats_config = store.info(source.feats).get("config", {})
    a_unit = acts_unit(source.corpus, safe_name(feats_config.get("model", "")), hook_a)
    model_a = load_model(store.info(a_unit)["model"], store.info(a_unit).get("revision"), device)
    b_info = store.info(source.acts_b)
    model_b = load_model(b_info["model"], b_info.get("revision"), device)

    with torch.no_grad():
        zero = sae_a.decode(torch.zeros(1, sae_a.cfg.d_sae, device=device))
        unit = torch.zeros(len(features), sae_a.cfg.d_sae, device=device)
        unit[torch.arange(len(features)), torch.from_numpy(features)] = 1.0
        dec_a = dict(zip(features.tolist(), sae_a.decode(unit) - zero, strict=True))
    write = store.array(f"{source.probes}/write_direction")
    probe = store.array(f"{source.probes}/direction")
    steer = write.oindex[features, :] if steer_b is None else np.asarray(steer_b, np.float32)
    write_b = dict(zip(features.tolist(), torch.from_numpy(steer), strict=True))
    read_b = dict(zip(features.tolist(), torch.from_numpy(probe.oindex[features, :]), strict=True))
    alpha = {int(f): float(contexts.value[contexts.feature == f].mean()) for f in features}
    generator = torch.Generator().manual_seed(seed)
    root_b = covariance_root(source).to(device)  # [d, d]: B's own directions of variation

    ids_all = store.array(f"{source.tokens}/ids")
    columns: dict[str, list[np.ndarray]] = {k: [] for k in MEASURES if k != "z_steer"}
    null_draws: list[np.ndarray] = []  # [R, n_null] per batch
    for start in range(0, len(contexts.feature), batch):
        sl = slice(start, start + batch)
        feats, seqs, pos = contexts.feature[sl], contexts.seq[sl], contexts.pos[sl]
        length = int(pos.max()) + 2  # up to the next token of the last context
        ids = torch.from_numpy(ids_all.oindex[seqs, :length].astype(np.int64)).to(device)
        p = torch.from_numpy(pos).to(device)
        a = torch.tensor([alpha[int(f)] for f in feats], dtype=torch.float32, device=device)
        v_a = torch.stack([dec_a[int(f)] for f in feats]).to(device) * a[:, None]
        v_b = torch.stack([write_b[int(f)] for f in feats]).to(device) * a[:, None]
        u_probe = torch.stack([read_b[int(f)] for f in feats]).to(device)
        u_probe = u_probe / u_probe.norm(dim=1, keepdim=True).clamp(min=1e-30)
        rand = torch.randn(u_probe.shape, generator=generator).to(device)
        u_rand = rand / rand.norm(dim=1, keepdim=True)

        clean_a = _log_probs_at(model_a, hook_a, ids, p, None)
        delta_a = _log_probs_at(model_a, hook_a, ids, p, _at_position(v_a, p)) - clean_a
        clean_b = _log_probs_at(model_b, source.hook, ids, p, None)
        delta_b = _log_probs_at(model_b, source.hook, ids, p, _at_position(v_b, p)) - clean_b
        nulls = []
        for _ in range(n_null):
            rand = torch.randn(v_b.shape, generator=generator, dtype=torch.float64).to(device)
            rand = (rand @ root_b).float()  # Σ^{1/2} is symmetric: rows are Σ^{1/2}·g
            v_rand = rand / rand.norm(dim=1, keepdim=True) * v_b.norm(dim=1, keepdim=True)
            null_b = _log_probs_at(model_b, source.hook, ids, p, _at_position(v_rand, p))
            nulls.append(torch.nn.functional.cosine_similarity(delta_a, null_b - clean_b, dim=1))
        null = torch.stack(nulls)  # [n_null, R]
        cos = torch.nn.functional.cosine_similarity
        columns["cos_steer"].append(cos(delta_a, delta_b, dim=1).cpu().numpy())
        columns["cos_null"].append(null.mean(0).cpu().numpy())
        columns["abs_cos_null"].append(null.abs().mean(0).cpu().numpy())
        null_draws.append(null.T.cpu().numpy())
        target = ids[torch.arange(len(ids), device=device), p + 1]
        loss_clean = -clean_b.gather(1, target[:, None])[:, 0]
        u_write = v_b / v_b.norm(dim=1, keepdim=True).clamp(min=1e-30)
        ablations = (("dloss_probe", u_probe), ("dloss_write", u_write), ("dloss_random", u_rand))
        for key, u in ablations:
            ablated = _log_probs_at(model_b, source.hook, ids, p, _project_out(u))
            loss = -ablated.gather(1, target[:, None])[:, 0]
            columns[key].append((loss - loss_clean).cpu().numpy())

    measured = {k: np.concatenate(v) for k, v in columns.items()}
    measured["z_steer"] = null_z(
        measured["cos_steer"], np.concatenate(null_draws), contexts.feature
    )
    per_context = pd.DataFrame({"feature": contexts.feature, **{k: measured[k] for k in MEASURES}})
    table = per_context.groupby("feature").median()
    table.insert(0, "n_contexts", per_context.groupby("feature").size())
    table.insert(1, "alpha", [alpha[int(f)] for f in table.index])
    return table.reset_index()


def causal_figure(table: Any, title: str) -> Any:
    """A matplotlib Figure: each feature's steering cosine against its score (presence or R²),
    its random-direction null magnitude in grey beneath; ``table`` has column ``score``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.report.plots import draw_causal

    fig, ax = plt.subplots(figsize=(6, 3.6))
    draw_causal(ax, table)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig

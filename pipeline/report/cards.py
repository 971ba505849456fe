"""The report's feature cards: one feature's scores and its top-activating contexts, as HTML.

Part of the report stage (pipeline/report/html.py and pipeline/report/match.py show the cards), not a
stage.
"""

from __future__ import annotations

import html
import os
from typing import Any

import numpy as np

from pipeline.report.plots import COLORS


# ---- contexts ---------------------------------------------------------------------------------
class Contexts:
    """Decoded windows around stored token indices, with one feature's activation per token."""

    def __init__(self, report: Any):
        from tokenizers import Tokenizer

        store = report.store
        self.store, self.report = store, report
        info = store.info(report.tokens)
        self.ctx, self.rows = info["ctx"], info["chunk_seqs"] * info["ctx"]
        text = store.read_text(f"{report.tokens}/tokenizer.json")
        self.tok = Tokenizer.from_str(text) if text else None
        self._chunk: tuple[int, dict[str, np.ndarray]] | None = None
        self.rendered: dict[tuple[int, int], str] = {}

    def prepare(self, features: list[int], scan: dict[str, np.ndarray]) -> None:
        """Render every context of ``features`` in token order, so each chunk is read once."""
        todo = sorted(
            (int(t), f, float(v), float(scan["top_value"][f][0]))
            for f in set(features)
            for v, t in zip(scan["top_value"][f], scan["top_token"][f], strict=True)
            if t >= 0 and (f, int(t)) not in self.rendered
        )
        for token, f, value, scale in todo:
            self.rendered[(f, token)] = self.render(f, token, value, scale)

    def chunk(self, index: int) -> dict[str, np.ndarray]:
        if self._chunk is None or self._chunk[0] != index:
            store, r = self.store, self.report
            data = {
                name: store.read_chunk(f"{unit}/{name}", index)
                for unit, names in ((r.tokens, ("ids", "mask")), (r.feats, ("idx", "val")))
                for name in names
            }
            data["ids"], data["mask"] = data["ids"].reshape(-1), data["mask"].reshape(-1)
            self._chunk = (index, data)
        return self._chunk[1]

    def pieces(self, ids: list[int]) -> list[str]:
        """The text each token of a window contributes, from decoding growing prefixes of the
        window: a token's leading space survives (SentencePiece/Metaspace tokenizers drop it when
        a token is decoded alone) and multi-byte characters split over tokens come out whole."""
        if self.tok is None:
            return [f"[{i}]" for i in ids]
        out, before = [], ""
        for n in range(1, len(ids) + 1):
            text = self.tok.decode(ids[:n], skip_special_tokens=False)
            common = len(os.path.commonprefix([before, text]))
            out.append(text[common:])
            before = text
        return out

    def render(self, feature: int, token: int, value: float, scale: float) -> str:
        cfg = self.report.cfg
        index, row = divmod(token, self.rows)
        data = self.chunk(index)
        pos = token % self.ctx
        start = row - min(pos, cfg.context_before)
        stop = row + min(self.ctx - 1 - pos, cfg.context_after) + 1
        spans = []
        pieces = self.pieces([int(i) for i in data["ids"][start:stop]])
        for r, piece in zip(range(start, stop), pieces, strict=True):
            hit = data["idx"][r] == feature
            act = float(data["val"][r][hit][0]) if hit.any() else 0.0
            spans.append(self._span(piece, bool(data["mask"][r]), act, scale, r == row))
        return f'<div class="ctx"><span class="act">{value:.3g}</span>{"".join(spans)}</div>'

    def _span(self, piece: str, counted: bool, act: float, scale: float, peak: bool) -> str:
        text = html.escape(piece)
        text = text.replace("\n", '<span class="ws">↵</span>').replace(
            "\t", '<span class="ws">→</span>'
        )
        classes = ["tok"] + (["peak"] if peak else []) + ([] if counted else ["masked"])
        alpha = max(0.0, min(1.0, act / scale)) if scale > 0 else 0.0
        style = f' style="background: rgba(255,140,0,{0.85 * alpha:.2f})"' if act > 0 else ""
        return f'<span class="{" ".join(classes)}" title="{act:.4g}"{style}>{text or "∅"}</span>'


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "—" if not np.isfinite(value) else f"{value:.3f}"
    return html.escape(str(value))


def feature_card(
    report: Any, row: Any, role: Any, scan: dict[str, np.ndarray], contexts: Contexts
) -> str:
    f = int(row["feature"])
    cls = row[f"{role.label}_class"]
    score, raw = row[f"{role.label}_presence"], row[f"{role.label}_presence_raw"]
    badge = f"{cls} {_fmt(score)}"
    if f"{role.label}_presence_lo" in row and np.isfinite(row[f"{role.label}_presence_lo"]):
        low, high = row[f"{role.label}_presence_lo"], row[f"{role.label}_presence_hi"]
        badge += f" [{low:.2f}, {high:.2f}]"
    elif not bool(row.get(f"{role.label}_presence_informative", True)):
        badge += " [no interval]"  # the ceiling's margin over the token baseline is not sure
    badge += f" (unclipped {raw:.2f})" if abs(raw - score) > 5e-4 else ""
    parts = [
        f"frequency {row['frequency']:.2e}",
        f"ceiling R² {_fmt(row['ceiling_r2'])}",
        f"token R² {_fmt(row['token_r2'])}",
    ]
    for other in report.roles[1:]:
        parts.append(
            f"{other.fit} R² {_fmt(row[f'{other.label}_r2'])} ({other.label if other.label == 'floor' else 'best: ' + str(row[f'{other.label}_best_hook'])})"
        )
    p = role.label
    parts.append(f"{role.fit} clipped R² {_fmt(row[f'{p}_r2_clipped'])}")
    parts.append(f"firing AUROC {_fmt(row[f'{p}_auroc'])}")
    if not bool(row.get(f"{p}_same_basis", True)):
        if f"{p}_latent_scale" in row or f"{p}_decoder_cosine" in row:
            parts.append(f"latent scale, decoder cosine: — ({_fmt(row[f'{p}_basis_reason'])})")
    else:
        if f"{p}_latent_scale" in row:
            parts.append(f"latent scale {_fmt(row[f'{p}_latent_scale'])}")
        if f"{p}_decoder_cosine" in row:
            parts.append(f"decoder cosine {_fmt(row[f'{p}_decoder_cosine'])}")
    if f"{p}_map_r2" in row:
        parts.append(f"R² through the affine map {_fmt(row[f'{p}_map_r2'])}")
    if f"{role.label}_transfer_corr" in row:
        parts.append(f"direct-transfer corr {_fmt(row[f'{role.label}_transfer_corr'])}")
    if "encoder_cosine" in row:
        parts.append(f"encoder cosine {_fmt(row['encoder_cosine'])}")
    for m in report.match_roles:
        if m.role.label == role.label:
            parts.append(_match_part(m, row))
    lines = [contexts.rendered[(f, int(t))] for t in scan["top_token"][f] if t >= 0]
    return (
        f'<div class="feature"><div class="head"><a href="#f{f}">feature {f}</a> '
        f'<span class="badge" style="background:{COLORS[cls]}">{badge}</span></div>'
        f'<div class="scores">{" · ".join(parts)}</div>'
        + ("".join(lines) or '<div class="ctx">no activation in the corpus</div>')
        + "</div>"
    )


def _match_part(m: Any, row: Any) -> str:
    best = int(row[f"{m.name}_best_match"])
    if best < 0:
        return f"SAE match {html.escape(m.name)}: no positively correlated B feature"
    mutual = ", mutual" if row[f"{m.name}_mutual"] else ""
    return (
        f"SAE match {html.escape(m.name)}: B feature {best}, "
        f"corr {_fmt(row[f'{m.name}_best_corr'])}{mutual}"
    )

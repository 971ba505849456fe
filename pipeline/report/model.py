"""The report's model: which fits play which role (ceiling, floor, each B), the one pass over
tokens and features (token baseline, top contexts), the table and the summary.

The stage (``stages/report.py``) caches the pass in ``report/<name>/`` through the lifecycle and
renders the files on every run; the table is built in ``table.py``, the page in ``html.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.documents import split_documents
from pipeline.errors import XprobeError
from pipeline.maths.evaluate import bootstrap_weights
from pipeline.maths.presence import (
    CLASSES,
    NO_MARGIN,
    TokenBaseline,
    TokenBaselineReplicates,
    TokenPredictor,
    TopActivations,
    classify,
)
from pipeline.maths.split import held_out_sequences
from pipeline.report.match import agreement_line, pair_match
from pipeline.report.table import feature_table
from pipeline.store import Store
from pipeline.store.layout import feats_unit, probes_unit, report_unit, safe_name, tokens_unit
from pipeline.store.sparse import load_sparse

if TYPE_CHECKING:
    from stages.report import ReportConfig


def _split_of(config: dict[str, Any]) -> tuple[float, int, str]:
    """A fit's held-out split: (held_out_fraction, split_seed, split_by); a fit from before
    ``split_by`` was split by sequence."""
    return (
        config["held_out_fraction"],
        config["split_seed"],
        config.get("split_by", "sequence"),
    )


@dataclass
class Role:
    """One fit as the report uses it."""

    label: str  # column prefix: the fit name, or "ceiling" / "floor"
    fit: str
    model: str
    hooks: list[str]


class Report:
    def __init__(self, cfg: ReportConfig, store: Store):
        self.cfg, self.store = cfg, store
        self.unit = report_unit(cfg.name)
        self.tokens = tokens_unit(cfg.corpus)
        self.feats = feats_unit(cfg.corpus, cfg.features)
        self.writable = store.local_path is not None and store.mode != "r"  # caches go here

    # ---- inputs ---------------------------------------------------------------------------------
    def _fit_info(self, fit: str) -> dict[str, Any]:
        unit = probes_unit(fit)
        if not self.store.has(unit) or not self.store.info(unit).get("complete"):
            raise XprobeError(f"{unit} is not in the store or not complete; run the fit {fit!r}")
        info = self.store.info(unit)
        config = info["config"]
        if config["corpus"] != self.cfg.corpus or config["features"] != self.cfg.features:
            raise XprobeError(
                f"fit {fit!r} probes features {config['features']!r} on corpus {config['corpus']!r}, "
                f"but the report is for {self.cfg.features!r} on {self.cfg.corpus!r}"
            )
        return info

    def _find_ceiling(self, a_model: str, sae_hook: str) -> str:
        if self.cfg.ceiling:
            return self.cfg.ceiling
        found = [
            unit.removeprefix("probes/")
            for unit, info in self.store.units()
            if info.get("stage") == "fit"
            and info["config"]["corpus"] == self.cfg.corpus
            and info["config"]["features"] == self.cfg.features
            and safe_name(info["config"]["model"]) == safe_name(a_model)
            and sae_hook in info["config"]["hooks"]
        ]
        if len(found) != 1:
            raise XprobeError(
                (f"several fits could be the ceiling ({found}); set ceiling = NAME in [report]")
                if found
                else "the report needs the ceiling, a fit of A on itself at the SAE's hook, and "
                f"no such fit is in the store yet ({a_model!r} at {sae_hook!r} on these features). "
                "If your config has that [[fit]], run it first (`xprobe run CONFIG` runs the fits "
                "before the report; or set ceiling = NAME in [report]); otherwise add\n"
                f'  [[fit]]\n  name = "ceiling"\n  corpus = "{self.cfg.corpus}"\n'
                f'  features = "{self.cfg.features}"\n  model = "{a_model}"\n'
                f'  hooks = ["{sae_hook}"]\nto the config (same split as the other fits) and run it.'
            )
        return found[0]

    def validate(self) -> dict[str, Any]:
        store, cfg = self.store, self.cfg
        for unit, what in [(self.tokens, "tokenize"), (self.feats, "features")]:
            if not store.has(unit) or not store.info(unit).get("complete"):
                raise XprobeError(f"{unit} is not in the store or not complete; run {what} first")
        feats = store.info(self.feats)
        a_model, sae_hook = feats["model"], feats["hook"]
        ceiling = self._find_ceiling(a_model, sae_hook)
        cinfo = self._fit_info(ceiling)
        if (
            safe_name(cinfo["config"]["model"]) != safe_name(a_model)
            or sae_hook not in (cinfo["config"]["hooks"])
        ):
            raise XprobeError(
                f"the ceiling fit {ceiling!r} must probe A ({a_model!r}) at the SAE's hook "
                f"{sae_hook!r}; it probes {cinfo['config']['model']!r} at {cinfo['config']['hooks']}"
            )
        split = _split_of(cinfo["config"])
        n_boot = int(cinfo["config"].get("n_bootstrap", 0))
        roles = [Role("ceiling", ceiling, a_model, [sae_hook])]
        named = [(fit, fit) for fit in cfg.fits if fit not in (ceiling, cfg.floor)]
        if cfg.floor:
            named.append(("floor", cfg.floor))
        for label, fit in named:
            info = self._fit_info(fit)
            if _split_of(info["config"]) != split:
                raise XprobeError(
                    f"fit {fit!r} uses another held-out split than the ceiling {ceiling!r} "
                    f"(held_out_fraction, split_seed, split_by = {split}); refit it with the "
                    "same split"
                )
            if int(info["config"].get("n_bootstrap", 0)) != n_boot:
                raise XprobeError(
                    f"fit {fit!r} has n_bootstrap = {info['config'].get('n_bootstrap', 0)} but the "
                    f"ceiling {ceiling!r} has {n_boot}: intervals combine the fits replicate by "
                    "replicate; refit with the same n_bootstrap"
                )
            roles.append(Role(label, fit, info["config"]["model"], list(info["config"]["hooks"])))
        if len(roles) == 1:
            raise XprobeError("fits lists only the ceiling/floor; add the fit of a model B")
        token_roles = []
        for fit in cfg.token_fits if cfg.token_baseline else ():
            info = self._fit_info(fit)
            if _split_of(info["config"]) != split or int(
                info["config"].get("n_bootstrap", 0)
            ) != n_boot:
                raise XprobeError(
                    f"token fit {fit!r} has another held-out split or n_bootstrap than the ceiling "
                    f"{ceiling!r} ({split}, {n_boot}): the token baseline is compared replicate by "
                    "replicate; refit it like the ceiling"
                )
            token_roles.append(Role(f"token:{fit}", fit, info["config"]["model"], list(info["config"]["hooks"])))
        self.token_roles = token_roles
        self.roles, self.split, self.n_boot = roles, split, n_boot
        self.docs = split_documents(store, self.tokens, split[2])  # None: split by sequence
        self.match_roles = [pair_match(self, spec, int(feats["n_feat"])) for spec in cfg.matches]
        if len({m.name for m in self.match_roles}) < len(self.match_roles):
            raise XprobeError(f"matches names a match twice: {list(cfg.matches)}")
        tokens = store.info(self.tokens)
        return {
            "corpus": cfg.corpus,
            "sae": cfg.features,
            "model": a_model,
            "hook": sae_hook,
            "n_feat": int(feats["n_feat"]),
            "fits": {r.label: r.fit for r in roles},
            "matches": {m.name: m.role.fit for m in self.match_roles},
            "held_out_fraction": split[0],
            "split_seed": split[1],
            "split_by": "sequence" if self.docs is None else "document",
            "n_bootstrap": n_boot,
            "tokenizer_fingerprint": tokens["tokenizer_fingerprint"],
            "corpus_fingerprint": tokens["corpus_fingerprint"],
        }

    def split_unit(self) -> str:
        """What the split and the bootstrap resample: "documents" or "sequences"."""
        return "documents" if self.docs is not None else "sequences"

    def _counted(self, index: int) -> np.ndarray:
        """Positions of chunk ``index`` that count: the tokens' mask, less those the features
        stage excluded for their residual norm (``exclude_norm_above``)."""
        mask = self.store.read_chunk(f"{self.tokens}/mask", index).reshape(-1)
        if self.store.has(f"{self.feats}/excluded"):
            mask = mask & ~self.store.read_chunk(f"{self.feats}/excluded", index).reshape(-1)
        return mask

    # ---- the one pass over tokens and features ---------------------------------------------------
    def scan_pass(self, n_feat: int) -> tuple[dict[str, np.ndarray], int]:
        from tqdm.auto import tqdm

        store, tokens = self.store, self.store.info(self.tokens)
        ctx, chunk_seqs, n_chunks = tokens["ctx"], tokens["chunk_seqs"], tokens["n_chunks"]
        held = held_out_sequences(tokens["n_seq"], *self.split[:2], doc_ids=self.docs)
        baseline = TokenBaseline(n_feat)
        top = TopActivations(n_feat, self.cfg.n_contexts)
        for index in tqdm(
            range(n_chunks), desc="report", unit="chunk", disable=not self.cfg.progress
        ):
            ids = store.read_chunk(f"{self.tokens}/ids", index).reshape(-1)
            mask = self._counted(index)
            rows, cols, vals = (t.numpy() for t in load_sparse(store, self.feats, index))
            first_token = index * chunk_seqs * ctx
            top.update(first_token + rows, cols, vals)
            if not self.cfg.token_baseline:
                continue
            is_held = held[index * chunk_seqs + np.arange(len(ids)) // ctx]
            for split, keep in (("train", mask & ~is_held), ("held_out", mask & is_held)):
                new_row = np.cumsum(keep) - 1
                sel = keep[rows]
                baseline.update(split, ids[keep], new_row[rows[sel]], cols[sel], vals[sel])
        token_r2 = baseline.r2_held_out() if self.cfg.token_baseline else np.zeros(n_feat)
        token_r2_boot = np.zeros((n_feat, 0))
        if self.cfg.token_baseline and self.n_boot:
            token_r2_boot = self._token_replicates(baseline.predictor())
        arrays = {"token_r2": token_r2, "token_r2_boot": token_r2_boot}
        return {**arrays, "top_value": top.value, "top_token": top.token}, n_chunks

    def _token_replicates(self, predictor: TokenPredictor) -> np.ndarray:
        """[F, n_boot]: the token baseline's held-out R² in each bootstrap replicate of held-out
        sequences (the fits' weights), from a pass over the held-out chunks' tokens and features."""
        store, tokens = self.store, self.store.info(self.tokens)
        ctx, chunk_seqs, n_seq = tokens["ctx"], tokens["chunk_seqs"], tokens["n_seq"]
        held = held_out_sequences(n_seq, *self.split[:2], doc_ids=self.docs)
        replicates = TokenBaselineReplicates(predictor, self.n_boot)
        for index in range(tokens["n_chunks"]):
            first = index * chunk_seqs
            n_seqs = min(chunk_seqs, n_seq - first)
            if not held[first : first + n_seqs].any():
                continue
            ids = store.read_chunk(f"{self.tokens}/ids", index).reshape(-1)
            mask = self._counted(index)
            local_seq = np.arange(len(ids)) // ctx
            keep = mask & held[first + local_seq]
            rows, cols, vals = (t.numpy() for t in load_sparse(store, self.feats, index))
            new_row = np.cumsum(keep) - 1
            sel = keep[rows]
            docs = None if self.docs is None else self.docs[first : first + n_seqs]
            weights = bootstrap_weights(self.split[1], index, n_seqs, self.n_boot, doc_ids=docs)
            replicates.update(
                ids[keep], new_row[rows[sel]], cols[sel], vals[sel], weights[local_seq[keep]]
            )
        return replicates.result()[1]

    # ---- the table --------------------------------------------------------------------------------
    def table(self, scan: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
        """The per-feature table (a DataFrame) and notes for the page: pipeline/report/table.py."""
        return feature_table(self, scan)

    # ---- summary ------------------------------------------------------------------------------------
    def summary_text(self, df: Any) -> str:
        cfg = self.cfg
        token = "max(R²_token, 0)" if cfg.token_baseline else "0"
        controls = [r.fit for r in getattr(self, "token_roles", [])] if cfg.token_baseline else []
        lines = [
            f"presence = (R²_B − {token}) / (R²_ceiling − {token}), clipped to [0, 1]"
            + (
                f"; R²_token: the best of the per-id mean and {', '.join(controls)} (each token "
                "read alone), per feature and resample"
                if controls
                else ""
            ),
            f"present: ≥ {cfg.present_at:g}   partial: ≥ {cfg.partial_at:g}   absent: < {cfg.partial_at:g}"
            f"   (scored where R²_ceiling − {token} ≥ {cfg.min_headroom:g})",
            (
                f"classes from {cfg.confidence:.0%} bootstrap intervals ({self.n_boot} replicates "
                f"over held-out {self.split_unit()}): undetermined = the interval straddles a "
                f"threshold; {NO_MARGIN} = the ceiling does not beat the token baseline in more "
                f"than {(1 - cfg.confidence) / 2:.1%} of the resamples (no interval: "
                "<fit>_presence_informative is false)"
                if self.n_boot
                else "classes from the point score (the fits have no bootstrap replicates)"
            ),
            "features: "
            + ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
            + f" (of {len(df)})",
        ]
        width = max(len(self.display(r)) for r in self.roles[1:])
        column = {c: max(10, len(c) + 2) for c in CLASSES}
        lines.append(f"  {'':<{width}}" + "".join(f"{c:>{column[c]}}" for c in CLASSES))
        floor_present = (
            df["floor_class"] == "present" if "floor_class" in df else np.zeros(len(df), bool)
        )
        for role in self.roles[1:]:
            counts = df[f"{role.label}_class"].value_counts()
            row = f"  {self.display(role):<{width}}" + "".join(
                f"{int(counts.get(c, 0)):>{column[c]}}" for c in CLASSES
            )
            if role.label != "floor" and "floor_class" in df:
                both = int(((df[f"{role.label}_class"] == "present") & floor_present).sum())
                row += f"   ({both} of its present features are present in the floor too)"
            lines.append(row)
        lines += class_lines(df, self.roles[1:], cfg.present_at, cfg.partial_at)
        for m in self.match_roles:
            lines.append(agreement_line(df, m, cfg.match_at))
        return "\n".join(lines)

    @staticmethod
    def display(role: Role) -> str:
        return f"{role.fit} (floor)" if role.label == "floor" else role.fit


def class_lines(df: Any, roles: list[Role], present_at: float, partial_at: float) -> list[str]:
    """Summary lines of presence per token class (fits with ``classes``; see table.class_columns)."""
    from pipeline.inputs.chat import TOKEN_CLASSES

    rows = []
    for role in roles:
        for token_class in TOKEN_CLASSES:
            col = f"{role.label}_presence_{token_class}"
            if col not in df:
                continue
            verdict = classify(df[col].to_numpy(), present_at, partial_at)
            rows.append(
                (f"{role.fit} on {token_class}", [int((verdict == k).sum()) for k in CLASSES])
            )
    if not rows:
        return []
    width = max(len(label) for label, _ in rows)
    column = {c: max(10, len(c) + 2) for c in CLASSES}
    lines = [f"  {'':<{width}}" + "".join(f"{c:>{column[c]}}" for c in CLASSES)]
    for label, counts in rows:
        lines.append(
            f"  {label:<{width}}"
            + "".join(f"{n:>{column[c]}}" for c, n in zip(CLASSES, counts, strict=True))
        )
    lines.insert(0, "per token class (presence = R²_B / R²_ceiling on its held-out tokens):")
    return lines

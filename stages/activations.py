"""Activations stage: token sequences -> a model's residual stream at chosen layers.

Reads ``tokens/<corpus>/ids`` ``[n_seq, ctx]`` and writes one unit per hook,
``acts/<corpus>/<model>/blocks.{L}.hook_resid_{post|pre}``, holding
    x  [n_tok, d_model]   every position (n_tok = n_seq * ctx; the mask lives in tokens)
chunked ``(chunk_seqs * ctx, d_model)``, so activation chunk i is token chunk i.

Hook semantics (TransformerLens / sae-lens names): ``resid_pre`` of layer L is the input of
decoder block L, ``resid_post`` the output of block L. They are captured with hooks on the
blocks, so they equal ``output_hidden_states``' ``hidden_states[L]`` and ``hidden_states[L+1]``
except for ``resid_post`` of the LAST layer: HF applies the final norm (GPT-2 ``ln_f``, Llama
``norm``) to ``hidden_states[-1]``, while we store the block output before that norm (the true
residual stream, as TransformerLens does). The forward stops after the deepest block needed.

Storage dtypes: float32 and float16 as such (a chunk holding inf/nan is refused, never stored);
bfloat16 as its uint16 bit pattern with ``dtype = "bfloat16"`` in the provenance (numpy has no
bf16); ``pipeline.store.reader`` restores it.

``context = "token"`` (the token control, pipeline/controls.py): every position holds the residual
the model computes for its token read alone, after the corpus's BOS (``[BOS, t]``, position 1;
without a BOS, after the tokenizer's BOS or EOS, else alone at position 0). It is a function of
the current token only, through everything the model does with one token (embedding, MLPs, the
attention to BOS), so a fit on it is the best "the token alone" can do through that model: for a
model whose residual is a function of the current token (attention contributing nothing), it
equals the model's own stream. Computed once per used token id, in fixed blocks of
``TOKEN_BLOCK`` consecutive used ids (each block's forward is the same whichever chunk asks for
it: resumed runs are bit-identical), then looked up for every position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.cluster import client_for, scheduler_field, workers_field
from pipeline.config import canonical, check_fields, path_field, runtime
from pipeline.device import resolve_device, resolve_dtype
from pipeline.errors import XprobeError
from pipeline.inputs.model import find_blocks, gguf_facts, is_gguf, load_causal_lm, load_config
from pipeline.inputs.tokenizer import (
    load_tokenizer,
    require_local_folder,
    tokenizer_fingerprint,
    vocab,
)
from pipeline.inputs.vocab import compare, tokenizer_facts, used_from_chunks, vocab_from_json
from pipeline.lazy import zarr
from pipeline.lineage import Input, model_input, unit_input
from pipeline.maths import norms as norm_hist
from pipeline.stage import ChunkedStage
from pipeline.store import Store
from pipeline.store.chunks import ChunkResult
from pipeline.store.layout import (
    RESID_HOOK,
    RESID_HOOK_ADVICE,
    acts_unit,
    default_name,
    tokens_unit,
)
from pipeline.store.reader import STORED_DTYPE, encode_for_store


@dataclass(frozen=True)
class ActivationsConfig:
    corpus: str
    """Name of the tokenized corpus in the store (``tokens/<corpus>``)."""
    model: str = path_field(kind="path_or_hub")
    """HF causal LM: hub name, local folder, or a GGUF file (``*.gguf``, dequantized to ``dtype``
    by transformers; needs ``xprobe[gguf]``)."""
    name: str | None = None
    """Store name of the model (``acts/<corpus>/<name>``); default: the hub name with ``/`` as
    ``--`` (``google--gemma-2-2b``), a local model folder's name, or a GGUF file's name without
    ``.gguf``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    layers: tuple[int, ...] | Literal["all"] = ()
    """Decoder layers to store (0-based; negative counts from the end: -1 is the last), or ``"all"``."""
    hook: Literal["resid_post", "resid_pre"] = "resid_post"
    """Which residual stream point of each layer: block output or block input."""
    hooks: tuple[str, ...] = ()
    """TransformerLens/sae-lens hook names (``blocks.6.hook_resid_post``); override layers/hook."""
    context: Literal["corpus", "token"] = "corpus"
    """What each position reads: the corpus sequence (``corpus``), or its token alone after BOS
    (``token``: a function of the current token only, the report's token control; see the module
    docstring). Give a ``token`` section its own ``name`` (e.g. ``"B.tokens"``)."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Model and storage dtype; ``auto`` is bfloat16 on cuda, float32 elsewhere."""
    device: str = "auto"
    """torch device; ``auto`` picks cuda, then mps, then cpu. Ignored with ``device_map``."""
    attn_implementation: str | None = None
    """transformers attention kernel (``eager``, ``sdpa``, ``flash_attention_2``...); default:
    transformers' choice. Kernels differ in the last bits, so it is part of the identity."""
    device_map: str | None = runtime(
        None,
        'spread the model over devices (accelerate): "auto", "balanced", "sequential", or one '
        'device ("cuda:1"); inputs go to the embedding\'s device',
    )
    max_memory: tuple[str, ...] = runtime(
        (), 'with device_map: memory per device, "DEVICE=SIZE" ("0=70GiB", "cpu=200GiB")'
    )
    offload_folder: str | None = runtime(
        None, "with device_map: where accelerate puts the weights that fit on no device (disk)"
    )
    trust_remote_code: bool = runtime(
        False, "run the model repository's own code (its config names it)"
    )
    batch_seqs: int = runtime(16, "sequences per forward pass")
    progress: bool = runtime(True, "show a progress bar")
    scheduler: str | None = scheduler_field()
    workers: int | None = workers_field()

    def __post_init__(self) -> None:
        check_fields(self)
        if self.batch_seqs < 1:
            raise XprobeError(f"batch_seqs must be positive, got {self.batch_seqs}")
        for h in self.hooks:
            if not RESID_HOOK.match(h):
                raise XprobeError(f"hook {h!r} is not a residual stream hook; {RESID_HOOK_ADVICE}")
        if not self.hooks and not self.layers:
            raise XprobeError('give layers (a list of ints or "all") or hooks to store')
        if self.max_memory and self.device_map is None:
            raise XprobeError('max_memory needs device_map (e.g. device_map = "auto")')
        parse_max_memory(self.max_memory)


def parse_max_memory(entries: tuple[str, ...]) -> dict[int | str, str]:
    """``("0=70GiB", "cpu=200GiB")`` -> ``{0: "70GiB", "cpu": "200GiB"}`` (accelerate's form)."""
    out: dict[int | str, str] = {}
    for entry in entries:
        device, sep, size = entry.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise XprobeError(
                f'max_memory entry {entry!r} is not DEVICE=SIZE; write e.g. "0=70GiB" or "cpu=200GiB"'
            )
        device = device.strip()
        out[int(device) if device.isdigit() else device] = size.strip()
    return out


class _Stop(Exception):
    """Raised from a hook once the deepest requested activation is captured."""


@contextmanager
def capture(
    blocks: Any, wanted: list[tuple[int, str]], out: dict[tuple[int, str], Any]
) -> Iterator[None]:
    """Hooks storing block inputs (``pre``) / outputs (``post``) into ``out``, stopping the forward
    after the deepest one. Wrap the forward in ``try/except _Stop``."""
    last = max(wanted, key=lambda w: (w[0], w[1] == "post"))
    handles = []

    def pre_hook(layer: int):
        def fn(module, args, kwargs):
            out[(layer, "pre")] = args[0] if args else kwargs["hidden_states"]
            if last == (layer, "pre"):
                raise _Stop

        return fn

    def post_hook(layer: int):
        def fn(module, args, output):
            out[(layer, "post")] = output[0] if isinstance(output, tuple) else output
            if last == (layer, "post"):
                raise _Stop

        return fn

    try:
        for layer, kind in wanted:
            if kind == "pre":
                handles.append(
                    blocks[layer].register_forward_pre_hook(pre_hook(layer), with_kwargs=True)
                )
            else:
                handles.append(blocks[layer].register_forward_hook(post_hook(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


def forward_capture(model: Any, blocks: Any, ids: Any, wanted: list[tuple[int, str]]) -> dict:
    """Activations ``{(layer, kind): [batch, ctx, d_model]}`` for ``ids`` [batch, ctx], running
    the model only up to the deepest requested block."""
    import torch

    out: dict[tuple[int, str], Any] = {}
    with torch.inference_mode(), capture(blocks, wanted, out):
        try:
            model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
    return out


class ActivationsStage(ChunkedStage):
    name = "activations"
    cfg: ActivationsConfig

    def __init__(self, cfg: ActivationsConfig):
        super().__init__(cfg)
        self.tokens = tokens_unit(cfg.corpus)
        self.model_name = cfg.name or default_name(
            str(Path(cfg.model).expanduser().absolute().with_suffix(""))
            if is_gguf(cfg.model)
            else cfg.model
        )
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self._model_config = None
        self._model = None
        self._tokenizer_check: dict[str, Any] | None = None

    # ---- model facts ----------------------------------------------------------------------
    @property
    def model_config(self) -> Any:
        if self._model_config is None:
            require_local_folder(self.cfg.model, "model")
            self._model_config = load_config(
                self.cfg.model, self.cfg.revision, self.cfg.trust_remote_code
            )
        return self._model_config

    @property
    def n_layers(self) -> int:
        return int(self.model_config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model_config.hidden_size)

    def wanted(self) -> list[tuple[int, str]]:
        """``(layer, "pre"|"post")`` for every requested hook, in config order, no duplicates."""
        cfg = self.cfg
        if cfg.hooks:
            wanted = []
            for h in cfg.hooks:
                m = RESID_HOOK.match(h)
                wanted.append((int(m.group(1)), m.group(2)))
        else:
            if cfg.layers == "all":
                layers = list(range(self.n_layers))
            else:
                layers = [self._layer(L) for L in cfg.layers]
            kind = cfg.hook.removeprefix("resid_")
            wanted = [(int(L), kind) for L in layers]
        return list(dict.fromkeys(wanted))

    def _layer(self, layer: int) -> int:
        """A layer index from the config: negative ones count from the end (-1: the last)."""
        if not -self.n_layers <= layer < self.n_layers:
            raise XprobeError(
                f"layer {layer} does not exist: {self.cfg.model!r} has layers 0..{self.n_layers - 1} "
                f"(or -{self.n_layers}..-1 from the end)"
            )
        return layer % self.n_layers

    def tokenizer_check(self, store: Store) -> dict[str, Any]:
        """Facts for the units' provenance: this model's tokenizer fingerprint and how it differs
        from the corpus tokenizer (``tokenizer_differences``: sentences, empty if identical).
        Refuses a model that would read an id of the corpus as another token, or has no
        embedding row for it (``pipeline.inputs.vocab``): compatibility is by the ids the
        corpus uses, not by tokenizer identity."""
        if self._tokenizer_check is not None:
            return self._tokenizer_check
        tinfo = store.info(self.tokens)
        tok = load_tokenizer(self.cfg.model, self.cfg.revision, self.cfg.trust_remote_code)
        fp = tokenizer_fingerprint(tok)
        differences: list[str] = []
        facts = tokenizer_facts(tok)
        same_facts = tinfo.get("tokenizer_facts") in (None, facts)
        if fp != tinfo["tokenizer_fingerprint"] or not same_facts:
            text = store.read_text(f"{self.tokens}/tokenizer.json")
            if not text:
                raise XprobeError(
                    f"{self.tokens} has no tokenizer.json, so the ids it holds cannot be checked "
                    f"against {self.cfg.model!r}'s tokenizer; tokenize the corpus again (--force)"
                )
            verdict = compare(
                vocab_from_json(text),
                tinfo.get("tokenizer_facts"),
                self._ids_used(store, tinfo),
                vocab(tok),
                facts,
                getattr(self.model_config, "vocab_size", None),
            )
            if not verdict.ok:
                raise XprobeError(
                    f"{self.cfg.model!r} cannot read {self.tokens}: "
                    + "; ".join(verdict.problems)
                    + ". A and B must read the corpus's ids as the same tokens: tokenize with a "
                    "tokenizer whose ids mean the same in both models, or compare models that "
                    "share a vocabulary."
                )
            differences = verdict.differences or [
                "merges, normalisation or pre-tokenisation differ (B reads the stored ids, so "
                "this changes nothing)"
            ]
        self._tokenizer_check = {
            "model_tokenizer_fingerprint": fp,
            "tokenizer_differences": differences,
        }
        return self._tokenizer_check

    def _ids_used(self, store: Store, tinfo: dict[str, Any]) -> np.ndarray:
        """``[n_vocab] bool``: recorded by tokenize, or counted from the stored ids (older stores)."""
        if store.has(f"{self.tokens}/ids_used"):
            return store.array(f"{self.tokens}/ids_used")[:]
        return used_from_chunks(
            (store.read_chunk(f"{self.tokens}/ids", i) for i in range(int(tinfo["n_chunks"]))),
            0,
        )

    def unit_of(self, layer: int, kind: str) -> str:
        return acts_unit(self.cfg.corpus, self.model_name, f"blocks.{layer}.hook_resid_{kind}")

    # ---- stage contract -------------------------------------------------------------------
    def identity(self) -> Any:
        """The config, without ``attn_implementation`` when unset (activations stored before it
        existed keep their config fingerprint)."""
        out = canonical(self.cfg)
        if self.cfg.attn_implementation is None:
            del out["attn_implementation"]
        if self.cfg.context == "corpus":  # stores written before ``context`` existed
            del out["context"]
        return out

    def units(self, store: Store) -> dict[str, dict[str, Any]]:
        tinfo = store.info(self.tokens)
        out = {}
        for layer, kind in self.wanted():
            out[self.unit_of(layer, kind)] = {
                "corpus": self.cfg.corpus,
                "model": self.cfg.model,
                "revision": self.cfg.revision,
                "layer": layer,
                "hook": f"resid_{kind}",
                "hook_name": f"blocks.{layer}.hook_resid_{kind}",
                "context": self.cfg.context,
                "dtype": self.dtype,
                "d_model": self.d_model,
                "model_type": getattr(self.model_config, "model_type", None),
                "tokenizer_fingerprint": tinfo["tokenizer_fingerprint"],
                **self.tokenizer_check(store),
                "corpus_fingerprint": tinfo["corpus_fingerprint"],
                "n_tok": int(tinfo["n_seq"]) * int(tinfo["ctx"]),
                "n_seq": int(tinfo["n_seq"]),
                "ctx": int(tinfo["ctx"]),
                "chunk_seqs": int(tinfo["chunk_seqs"]),
            }
            if is_gguf(self.cfg.model):  # what was dequantized (to ``dtype``), from the header
                out[self.unit_of(layer, kind)]["gguf"] = gguf_facts(self.cfg.model)
        return out

    def inputs(self, store: Store) -> dict[str, Input]:
        return {
            "tokens": unit_input(store, self.tokens),
            "model": model_input(self.cfg.model, self.cfg.revision),
        }

    def validate(self, store: Store) -> None:
        require_local_folder(self.cfg.model, "model")
        if not store.has(self.tokens):
            raise XprobeError(f"{self.tokens} is not in the store; run the tokenize stage first")
        tinfo = store.info(self.tokens)
        if not tinfo.get("complete"):
            raise XprobeError(f"{self.tokens} is not complete; resume the tokenize stage first")
        self.tokenizer_check(store)
        config = self.model_config
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if max_pos is not None and int(tinfo["ctx"]) > int(max_pos):
            raise XprobeError(
                f"{self.tokens} has ctx {tinfo['ctx']} tokens, which exceeds the {max_pos} positions of "
                f"{self.cfg.model!r}; tokenize with a smaller ctx"
            )
        for layer, _ in self.wanted():
            if not 0 <= layer < self.n_layers:
                raise XprobeError(
                    f"layer {layer} does not exist: {self.cfg.model!r} has layers "
                    f"0..{self.n_layers - 1}"
                )
        for unit in self.units(store):
            if store.has_local(unit) and "xprobe" in store.group(unit).attrs:
                stored = store.info(unit).get("dtype")
                if stored != self.dtype:
                    raise XprobeError(
                        f"{unit} was started in {stored} but this run resolves to {self.dtype} "
                        "(dtype/device auto on another machine?); set dtype explicitly or use --force"
                    )

    def prepare(self, store: Store) -> int | None:
        tinfo = store.info(self.tokens)
        rows = int(tinfo["chunk_seqs"]) * int(tinfo["ctx"])
        n_tok = int(tinfo["n_seq"]) * int(tinfo["ctx"])
        for unit in self.units(store):
            store.create_array(
                f"{unit}/x",
                (n_tok, self.d_model),
                (rows, self.d_model),
                STORED_DTYPE[self.dtype],
                store.info(unit),
                # zstd level 1 saves 20% on 16-bit activations at ~900 MB/s, but only 7% on
                # float32 at ~200 MB/s: not worth a writer competing with the forward for cores
                compressors=None if self.dtype == "float32" else zarr.codecs.ZstdCodec(level=1),
            )
            # per chunk: how many tokens' residual norms fall in each log2 bin, per position
            # group, and the groups' maxima (pipeline.maths.norms); summed at finalize
            n_chunks, groups = int(tinfo["n_chunks"]), len(norm_hist.GROUPS)
            store.create_array(
                f"{unit}/norm_hist",
                (n_chunks, groups, norm_hist.N_BINS),
                (1, groups, norm_hist.N_BINS),
                np.uint32,
                store.info(unit),
            )
            store.create_array(
                f"{unit}/norm_max", (n_chunks, groups), (1, groups), np.float64, store.info(unit)
            )
        return int(tinfo["n_chunks"])

    def finalize(self, store: Store, n_chunks: int | None) -> dict[str, Any]:
        """Each unit's norm distribution (median, p99, max; by position) into its provenance."""
        for unit in self.units(store):
            if not store.has(f"{unit}/norm_hist") or n_chunks is None:
                continue  # a unit started before norms were recorded
            done = store.done_chunks(unit)
            if not all(i in done for i in range(n_chunks)):
                continue
            hist = np.zeros((len(norm_hist.GROUPS), norm_hist.N_BINS), dtype=np.int64)
            top = np.zeros(len(norm_hist.GROUPS))
            for i in range(n_chunks):
                hist += store.read_chunk(f"{unit}/norm_hist", i)[0]
                top = np.maximum(top, store.read_chunk(f"{unit}/norm_max", i)[0])
            store.update_info(unit, norms=norm_hist.summary(hist, top))
        return {}

    def _rows(self, tinfo: dict[str, Any], index: int) -> int:
        cs = int(tinfo["chunk_seqs"])
        return min(cs, int(tinfo["n_seq"]) - index * cs)

    def tokens_todo(self, store: Store, done: set[int]) -> int | None:
        tinfo = store.info(self.tokens)
        todo = [i for i in range(int(tinfo["n_chunks"])) if i not in done]
        return sum(self._rows(tinfo, i) for i in todo) * int(tinfo["ctx"])

    def load_model(self) -> Any:
        """The model in eval mode, on ``device``, or spread by ``device_map`` (accelerate loads
        shard by shard straight to each device, so no device ever holds the whole model)."""
        if self._model is None:
            import torch

            cfg = self.cfg
            kwargs: dict[str, Any] = {
                "revision": cfg.revision,
                "dtype": getattr(torch, self.dtype),
                "trust_remote_code": cfg.trust_remote_code,
            }
            if cfg.attn_implementation is not None:
                kwargs["attn_implementation"] = cfg.attn_implementation
            if cfg.device_map is not None:
                kwargs["device_map"] = cfg.device_map
                if cfg.max_memory:
                    kwargs["max_memory"] = parse_max_memory(cfg.max_memory)
                if cfg.offload_folder is not None:
                    kwargs["offload_folder"] = cfg.offload_folder
            model = load_causal_lm(cfg.model, **kwargs)
            if cfg.device_map is None:
                model = model.to(self.device)
            self._model = model.eval()
        return self._model

    def input_device(self, model: Any) -> Any:
        """Where the ids go: ``device``, or the embedding's device under a ``device_map``."""
        if self.cfg.device_map is None:
            return self.device
        embed = model.get_input_embeddings()
        hook = getattr(embed, "_hf_hook", None)  # offloaded weights sit on "meta" between calls
        return getattr(hook, "execution_device", None) or embed.weight.device

    def compute(self, store: Store, todo: Callable[[int], bool]) -> Iterator[ChunkResult]:
        import torch

        tinfo = store.info(self.tokens)
        wanted = self.wanted()
        units = {w: self.unit_of(*w) for w in wanted}
        model = self.load_model()
        blocks = find_blocks(model, self.n_layers)
        device = self.input_device(model)
        ctx, cs, bs = int(tinfo["ctx"]), int(tinfo["chunk_seqs"]), self.cfg.batch_seqs
        alone = TokenAlone(self, store, model, blocks, device) if self.cfg.context == "token" else None
        for index in range(int(tinfo["n_chunks"])):
            if not todo(index):
                continue
            ids = torch.from_numpy(store.read_chunk(f"{self.tokens}/ids", index).astype(np.int64))
            parts: dict[tuple[int, str], list] = {w: [] for w in wanted}
            if alone is not None:
                for w, x in alone.lookup(ids).items():
                    parts[w].append(x)
            for start in range(0, len(ids) if alone is None else 0, bs):
                acts = forward_capture(model, blocks, ids[start : start + bs].to(device), wanted)
                for w in wanted:
                    parts[w].append(acts[w].detach().to("cpu"))
            first, last = index * cs, index * cs + len(ids) - 1
            mask = store.read_chunk(f"{self.tokens}/mask", index).reshape(-1)
            arrays = {}
            for w, pieces in parts.items():
                x = torch.cat(pieces).reshape(-1, self.d_model)
                arrays[f"{units[w]}/x"] = encode_for_store(
                    x, f"{units[w]} chunk {index} (corpus sequences {first}..{last})", ctx
                )
                # norms of the values as stored (float64 sums of squares)
                norms = torch.linalg.vector_norm(x.double(), dim=-1).numpy()
                hist, top = norm_hist.chunk_histograms(norms, mask, ctx)
                arrays[f"{units[w]}/norm_hist"] = hist[None]
                arrays[f"{units[w]}/norm_max"] = top[None]
            yield ChunkResult(index, arrays, n_tok=len(ids) * ctx)


TOKEN_BLOCK = 256
"""Used token ids per forward of ``context = "token"`` (sequences of 2 tokens)."""


class TokenAlone:
    """``context = "token"``: each used token id's residual at the wanted hooks when the model
    reads it alone after a prefix token (see the module docstring), computed lazily per block
    of :data:`TOKEN_BLOCK` consecutive used ids and kept."""

    def __init__(self, stage: ActivationsStage, store: Store, model: Any, blocks: Any, device: Any):
        import torch

        tinfo = store.info(stage.tokens)
        self.stage, self.model, self.blocks, self.device = stage, model, blocks, device
        self.wanted = stage.wanted()
        self.used = np.flatnonzero(stage._ids_used(store, tinfo)).astype(np.int64)
        self.rank = np.full(int(self.used.max()) + 1 if len(self.used) else 1, -1, np.int64)
        self.rank[self.used] = np.arange(len(self.used))
        self.prefix = token_prefix(store, stage.tokens, tinfo, stage)
        self.table = {
            w: torch.zeros(len(self.used), stage.d_model, dtype=getattr(torch, stage.dtype))
            for w in self.wanted
        }
        self.ready = np.zeros((len(self.used) + TOKEN_BLOCK - 1) // TOKEN_BLOCK, bool)

    def _block(self, b: int) -> None:
        import torch

        ids = torch.from_numpy(self.used[b * TOKEN_BLOCK : (b + 1) * TOKEN_BLOCK])[:, None]
        if self.prefix is not None:
            ids = torch.cat([torch.full_like(ids, self.prefix), ids], dim=1)
        acts = forward_capture(self.model, self.blocks, ids.to(self.device), self.wanted)
        for w in self.wanted:
            self.table[w][b * TOKEN_BLOCK : b * TOKEN_BLOCK + len(ids)] = acts[w][:, -1].to("cpu")
        self.ready[b] = True

    def lookup(self, ids: Any) -> dict[tuple[int, str], Any]:
        """``{hook: [n, ctx, d_model]}`` for the token ids ``ids [n, ctx]`` of one chunk."""
        flat = ids.reshape(-1).numpy()
        if flat.max(initial=-1) >= len(self.rank) or (self.rank[flat] < 0).any():
            raise XprobeError(
                f"{self.stage.tokens}'s ids_used does not list every id its chunks hold; "
                "tokenize the corpus again (--force)"
            )
        rank = self.rank[flat]
        for b in np.unique(rank // TOKEN_BLOCK):
            if not self.ready[b]:
                self._block(int(b))
        return {w: t[rank].reshape(*ids.shape, -1) for w, t in self.table.items()}


def token_prefix(store: Store, tokens: str, tinfo: dict[str, Any], stage: ActivationsStage) -> int | None:
    """The token that precedes each token read alone: the corpus's BOS (the first id of its
    first sequence, when the corpus was tokenized with ``bos``), else the model tokenizer's BOS,
    else its EOS, else none."""
    if (tinfo.get("config") or {}).get("bos", False):
        return int(store.read_chunk(f"{tokens}/ids", 0).reshape(-1)[0])
    tok = load_tokenizer(stage.cfg.model, stage.cfg.revision, stage.cfg.trust_remote_code)
    for token_id in (tok.bos_token_id, tok.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return None


def run(
    cfg: ActivationsConfig, store: Store, force: bool = False, rebuild_stale: bool = False
) -> dict[str, Any]:
    from pipeline import lifecycle

    return lifecycle.run(
        ActivationsStage(cfg),
        store,
        force=force,
        rebuild_stale=rebuild_stale,
        progress=cfg.progress,
        cluster=lambda: client_for(cfg),  # None unless scheduler / workers is set
    )

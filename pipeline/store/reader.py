"""Reading stored activations back as torch tensors, chunk by chunk, with background prefetch.

Used by downstream stages and in notebooks:

    for chunk in iter_chunks(store, "web", "gpt2", "blocks.6.hook_resid_post", device="cuda"):
        chunk.acts   # [n_tok_chunk, d_model] in the stored dtype (bfloat16 restored)
        chunk.mask   # [n_tok_chunk] bool: positions that count (skip the others)
        chunk.ids    # [n_tok_chunk] int32 token ids

Also the storage codec of activations: numpy has no bfloat16, so bf16 rows are stored as their
uint16 bit pattern (``dtype = "bfloat16"`` in the unit's provenance) and restored here exactly.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.errors import XprobeError
from pipeline.lazy import torch
from pipeline.store import Store
from pipeline.store.layout import acts_unit, tokens_unit

STORED_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
"""numpy dtype an activations array is stored in, by the model dtype it holds."""


def encode_for_store(acts: torch.Tensor, where: str, ctx: int) -> np.ndarray:
    """A CPU tensor ``[n_tok, d_model]`` as the numpy array that is stored (bf16 as uint16 bits).

    Non-finite values (float16 overflow, a broken model) are an error that says where they are.
    """
    check_finite(
        acts, where, ctx, 'With float16 this is overflow: use dtype = "bfloat16" or "float32".'
    )
    acts = acts.contiguous()
    if acts.dtype == torch.bfloat16:
        return acts.view(torch.int16).numpy().view(np.uint16)
    return acts.numpy()


def check_finite(acts: torch.Tensor, where: str, ctx: int, advice: str) -> None:
    """Raise, naming the first bad token row (sequence and position), if ``acts`` [n_tok, d] holds nan/inf."""
    finite = torch.isfinite(acts)
    if not bool(finite.all()):
        row = int((~finite.all(dim=1)).nonzero()[0])
        raise XprobeError(
            f"non-finite activation (nan/inf) in {where}: token row {row} of the chunk = sequence "
            f"{row // ctx} of the chunk, position {row % ctx}. {advice}"
        )


def decode_from_store(data: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy rows as a tensor in the recorded ``dtype`` (bfloat16 bits restored exactly)."""
    tensor = torch.from_numpy(np.ascontiguousarray(data))
    if dtype == "bfloat16":
        return tensor.view(torch.int16).view(torch.bfloat16)
    return tensor


def load_acts(store: Store, unit: str, index: int, verify: bool = True) -> torch.Tensor:
    """Chunk ``index`` of an activations unit as ``[n_tok_chunk, d_model]`` in its dtype.

    An unwritten or corrupted chunk (crc32 checked unless ``verify`` is False) and one holding
    nan/inf raise XprobeError, the latter naming the chunk, token row, sequence and position.
    """
    data = store.read_chunk(f"{unit}/x", index, verify=verify)
    info = store.info(unit)
    acts = decode_from_store(data, info["dtype"])
    ctx = int(info.get("ctx") or 1)
    first = index * int(info.get("chunk_seqs") or 0)
    check_finite(
        acts,
        f"{unit} chunk {index} (corpus sequences from {first})",
        ctx,
        "The stored activations are unusable: recompute this unit with the activations stage (--force).",
    )
    return acts


@dataclass
class ActChunk:
    index: int
    acts: torch.Tensor  # [n_tok_chunk, d_model]
    mask: torch.Tensor  # [n_tok_chunk] bool
    ids: torch.Tensor  # [n_tok_chunk] int32


def iter_chunks(
    store: Store,
    corpus: str,
    model_name: str | None = None,
    hook: str | None = None,
    *,
    device: str | torch.device = "cpu",
    prefetch: int = 2,
    chunks: Iterable[int] | None = None,
) -> Iterator[ActChunk]:
    """Chunks of ``acts/<corpus>/<model_name>/<hook>`` with their tokens' mask and ids, in order,
    read ``prefetch`` chunks ahead on a background thread and moved to ``device``.

    ``corpus`` may instead be a whole unit path (then leave out ``model_name`` and ``hook``).
    ``chunks`` selects chunk indices (default: all); an unwritten one raises XprobeError.
    """
    if model_name is None and hook is None:
        unit = corpus
    elif model_name is None or hook is None:
        raise XprobeError("give iter_chunks a corpus, model name and hook, or one unit path")
    else:
        unit = acts_unit(corpus, model_name, hook)
    info = store.info(unit)
    if "corpus" not in info or "d_model" not in info:
        raise XprobeError(f"{unit} is not an activations unit")
    tokens = tokens_unit(info["corpus"])
    n_chunks = info.get("n_chunks") or info.get("n_chunks_planned")
    indices = list(range(n_chunks) if chunks is None else chunks)
    device = torch.device(device)
    out: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def produce() -> None:
        try:
            for index in indices:
                if stop.is_set():
                    return
                acts = load_acts(store, unit, index)
                mask = torch.from_numpy(store.read_chunk(f"{tokens}/mask", index).reshape(-1))
                ids = torch.from_numpy(store.read_chunk(f"{tokens}/ids", index).reshape(-1))
                if device.type == "cuda":  # pinned memory lets the copy overlap compute
                    acts, mask, ids = acts.pin_memory(), mask.pin_memory(), ids.pin_memory()
                out.put(ActChunk(index, acts, mask, ids))
            out.put(None)
        except BaseException as e:  # handed to the consumer
            out.put(e)

    thread = threading.Thread(target=produce, name="xprobe-reader", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            nb = device.type == "cuda"
            yield ActChunk(
                item.index,
                item.acts.to(device, non_blocking=nb),
                item.mask.to(device, non_blocking=nb),
                item.ids.to(device, non_blocking=nb),
            )
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


# ---- high-norm positions (``exclude_norm_above``) ---------------------------------------------


def excluded_threshold(store: Store, acts_unit: str, factor: float) -> float:
    """``factor`` × the median per-token residual norm the activations stage recorded for
    ``acts_unit``; refuses a unit stored before norms were recorded."""
    norms = store.info(acts_unit).get("norms")
    if not norms or norms.get("median") is None:
        raise XprobeError(
            f"{acts_unit} has no recorded residual norms (stored by an older xprobe), so "
            "exclude_norm_above has no median to scale; rerun its activations stage with --force"
        )
    return float(factor) * float(norms["median"])


def high_norm(acts: torch.Tensor, threshold: float) -> np.ndarray:
    """``[n] bool``: rows of ``acts`` whose L2 norm (float64, as the activations stage records
    it) exceeds ``threshold``."""
    import torch

    return (torch.linalg.vector_norm(acts.double(), dim=-1) > threshold).cpu().numpy()


def excluded_rows(store: Store, feats_unit: str, index: int) -> np.ndarray | None:
    """``[rows] bool``: positions of chunk ``index`` the features stage excluded for their norm
    (``exclude_norm_above``), or None when it excluded none. Readers treat them as masked."""
    if not store.has(f"{feats_unit}/excluded"):
        return None
    return store.read_chunk(f"{feats_unit}/excluded", index).reshape(-1).astype(bool)

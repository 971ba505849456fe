"""Stages on dask.distributed: the same bits as one process, a lost worker, the fitter's tree sum.

One LocalCluster of two single-threaded worker processes serves the module. Every comparison is
against the same stage run in this process on a copy of the same tokens.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import shutil
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pipeline.cli
import pipeline.distributed
from pipeline.cluster import THREAD_VARIABLES, local_cluster, visible_gpus
from pipeline.config import fingerprint
from pipeline.distributed import merge_tree, partitions
from pipeline.errors import XprobeError
from pipeline.lifecycle import run as run_stage
from pipeline.maths.lstsq import SufficientStats, solve_ridge
from pipeline.store import Store
from pipeline.store.checkpoint import load_checkpoint
from stages.activations import ActivationsConfig, ActivationsStage
from stages.activations import run as activations
from stages.features import FeaturesConfig
from stages.features import run as features
from stages.fit import FitConfig
from stages.fit import run as fit
from tests.helpers import save_standard_sae, tokenize_small

pytestmark = pytest.mark.slow  # the slow lane (make test-slow): kills, segments, clusters

# the failure-injecting stages below must reach the workers by value, not by module name
cloudpickle.register_pickle_by_value(sys.modules[__name__])

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
N_CHUNKS = 8


@pytest.fixture(scope="module")
def cluster():
    before = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    with local_cluster(2) as cluster:  # no GPU here: two single-threaded worker processes
        yield cluster
    assert {name: os.environ.get(name) for name in THREAD_VARIABLES} == before


@pytest.fixture(scope="module")
def client(cluster):
    from distributed import Client

    with Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def tokens_store(tmp_path_factory, corpus_jsonl, tokenizer_dir) -> Path:
    """A store holding only tokens: ctx 32, 4 sequences per chunk, 8 chunks."""
    root = tmp_path_factory.mktemp("dist") / "tokens"
    # max_tokens counts tokens that count: 31 of each 32 positions (the BOS is masked)
    tokenize_small(Store(root), corpus_jsonl, tokenizer_dir, 31 * 4 * N_CHUNKS)
    assert Store(root, mode="r").info("tokens/c")["n_chunks"] == N_CHUNKS
    return root


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    return save_standard_sae(tmp_path_factory.mktemp("dist_sae") / "sae", hook=HOOKS[0])


def _copy(tokens_store: Path, name: str) -> Store:
    target = tokens_store.parent / name
    shutil.copytree(tokens_store, target)
    return Store(target)


def acts_cfg(model_dir: Path, name: str, **runtime) -> ActivationsConfig:
    return ActivationsConfig(
        corpus="c", model=str(model_dir), name=name, layers=(0, 1), progress=False, **runtime
    )


def feats_cfg(sae_dir: Path, **runtime) -> FeaturesConfig:
    return FeaturesConfig(
        corpus="c",
        model="a",
        sae_path=str(sae_dir),
        name="sae",
        transfer_models=("b",),
        progress=False,
        **runtime,
    )


def fit_cfg(**runtime) -> FitConfig:
    return FitConfig(
        name="probe",
        corpus="c",
        features="sae",
        model="b",
        hooks=HOOKS,
        held_out_fraction=0.25,
        min_active=3,
        compute_dtype="float64",
        device="cpu",
        progress=False,
        **runtime,
    )


def run_all(store: Store, gpt2_dir, llama_dir, sae_dir, **runtime) -> None:
    """A (the test GPT-2) and B (the test Llama) at layers 0 and 1, A's SAE, B's probes."""
    activations(acts_cfg(gpt2_dir, "a", **runtime), store)
    activations(acts_cfg(llama_dir, "b", **runtime), store)
    features(feats_cfg(sae_dir, **runtime), store)
    fit(fit_cfg(**runtime), store)


@pytest.fixture(scope="module")
def single(tokens_store, gpt2_dir, llama_dir, sae_dir) -> Store:
    store = _copy(tokens_store, "single")
    run_all(store, gpt2_dir, llama_dir, sae_dir)
    return store


@pytest.fixture(scope="module")
def on_cluster(tokens_store, gpt2_dir, llama_dir, sae_dir, cluster) -> Store:
    store = _copy(tokens_store, "cluster")
    run_all(store, gpt2_dir, llama_dir, sae_dir, scheduler=cluster.scheduler_address)
    return store


def chunk_arrays() -> list[str]:
    """Every array the activations and features stages write."""
    paths = [f"acts/c/{m}/{h}/x" for m in ("a", "b") for h in HOOKS]
    feats = "feats/c/sae"
    paths += [f"{feats}/{name}" for name in ("idx", "val", "chunk_stats")]
    paths += [f"{feats}/chunk_transfer_b_pair", f"{feats}/chunk_transfer_b_scalars"]
    paths += [f"{feats}/stats/{s}" for s in ("count", "mean", "max", "sum", "sum_sq", "dead")]
    paths += [f"{feats}/transfer/b/corr"]
    return paths


def assert_identical(store: Store, reference: Store, paths: list[str]) -> None:
    for path in paths:
        got, want = store.array(path)[...], reference.array(path)[...]
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), path  # bit for bit, NaN included


def test_scheduler_and_workers_are_runtime_only():
    base = acts_cfg(Path("m"), "a")
    for cfg in (
        dataclasses.replace(base, scheduler="tcp://10.0.0.1:8786"),
        dataclasses.replace(base, workers=4),
    ):
        assert fingerprint(cfg) == fingerprint(base)
    assert fingerprint(fit_cfg(scheduler="tcp://x:1")) == fingerprint(fit_cfg())


def test_partitions_and_merge_tree(client):
    assert partitions(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert partitions([4, 9], 8) == [[4], [9]]
    futures = [client.submit(lambda i: [i], i, pure=False) for i in range(7)]
    # concatenation is not commutative: the tree keeps partitions in order
    assert merge_tree(client, futures, operator.add).result() == list(range(7))


def test_chunk_stages_bit_identical_to_one_process(single, on_cluster):
    assert_identical(on_cluster, single, chunk_arrays())
    for unit in [f"acts/c/{m}/{h}" for m in ("a", "b") for h in HOOKS] + ["feats/c/sae"]:
        info = on_cluster.info(unit)
        assert info["complete"] and info["n_chunks"] == N_CHUNKS
        for i in range(N_CHUNKS):  # the manifests agree too (checksums of every array)
            assert (
                on_cluster.chunk_record(unit, i)["crc32"] == single.chunk_record(unit, i)["crc32"]
            )
    assert on_cluster.info("feats/c/sae")["transfer"] == single.info("feats/c/sae")["transfer"]


def test_each_worker_builds_each_stage_once(on_cluster, client):
    loads = client.run(lambda: dict(pipeline.distributed.LOADS))
    assert len(loads) == 2
    per_worker = [counts for counts in loads.values()]
    assert all(n == 1 for counts in per_worker for n in counts.values()), loads
    # three chunk stages ran (A, B, the SAE) and both workers took part
    assert len(set().union(*per_worker)) == 3
    assert all(per_worker)


def _stats(store: Store) -> dict:
    return load_checkpoint(store, "probes/probe")


def test_fit_equals_one_process(single, on_cluster):
    got, want = _stats(on_cluster), _stats(single)
    assert sorted(got["consumed"]) == sorted(want["consumed"]) == list(range(N_CHUNKS))
    for hook in HOOKS:
        for split in ("train", "held_out"):
            a, b = got["stats"][hook][split], want["stats"][hook][split]
            assert int(a["n"]) == int(b["n"]) > 0
            for name, value in b.items():
                if value.dtype == torch.int64:
                    assert torch.equal(a[name], value), name
                else:
                    scale = float(value.abs().max()) or 1.0
                    torch.testing.assert_close(a[name], value, rtol=1e-12, atol=1e-12 * scale)
            assert not torch.equal(a["cxx"], torch.zeros_like(a["cxx"]))
        # the solve from either set of statistics gives the same probes
        solved = []
        for stats in (got, want):
            train, held = (
                SufficientStats.from_state_dict(stats["stats"][hook][s], torch.device("cpu"))
                for s in ("train", "held_out")
            )
            solved.append(solve_ridge(train, held, [0.0, 1e-3], direction_dtype=torch.float64))
        for key in ("direction", "intercept", "r2_held_out", "r2_train"):
            scale = float(np.abs(solved[1][key]).max()) or 1.0
            np.testing.assert_allclose(
                solved[0][key], solved[1][key], rtol=1e-9, atol=1e-12 * scale
            )
        for key in ("status", "lam", "n_active_train"):
            np.testing.assert_array_equal(solved[0][key], solved[1][key])
        # and the stored probes agree (direction is stored in float32)
        for key in ("intercept", "linear_r2_held_out", "linear_pearson_held_out"):
            got_arr = on_cluster.array(f"probes/probe/{hook}/{key}")[...]
            want_arr = single.array(f"probes/probe/{hook}/{key}")[...]
            np.testing.assert_allclose(got_arr, want_arr, rtol=1e-9, atol=1e-12)
        # the single-layer model's scores pass through A's SAE in its own dtype (float32)
        for key in ("r2_held_out",):  # (Pearson is undefined where a prediction is constant)
            got_arr = on_cluster.array(f"probes/probe/{hook}/{key}")[...]
            want_arr = single.array(f"probes/probe/{hook}/{key}")[...]
            np.testing.assert_allclose(got_arr, want_arr, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            on_cluster.array(f"probes/probe/{hook}/direction")[...],
            single.array(f"probes/probe/{hook}/direction")[...],
            rtol=1e-5,
            atol=1e-7,
        )
    assert (single.array("probes/probe/" + HOOKS[0] + "/status")[...] == 0).any()


def test_fit_on_cluster_reports_each_partition_once_for_progress(single, client):
    from stages.fit import Fit

    fit_ = Fit(fit_cfg(), single)
    d = single.info(f"acts/c/b/{HOOKS[0]}")["d_model"]
    n_feat = single.info("feats/c/sae")["n_feat"]
    seen: list[list[int]] = []
    pipeline.distributed.accumulate_fit(
        client, fit_, list(range(N_CHUNKS)), d, n_feat, n_parts=3, on_partition=seen.append
    )
    assert len(seen) == 3 and sorted(i for part in seen for i in part) == list(range(N_CHUNKS))


def _metadata(store: Store) -> dict[str, tuple[int, bytes]]:
    """Every zarr metadata file under acts/ (arrays and groups): mtime and content."""
    files = sorted((store.local_path / "acts").rglob("zarr.json"))
    return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in files}


class _WatchMetadata(ActivationsStage):
    """Activations that record, on the coordinator, the store's metadata once the arrays are
    prepared (tokens_todo runs just before the tasks) and again before finalize."""

    def tokens_todo(self, store, done):
        self.before = _metadata(store)
        return super().tokens_todo(store, done)

    def finalize(self, store, n_chunks):
        self.after = _metadata(store)
        return super().finalize(store, n_chunks)


def test_workers_write_no_shared_metadata(tokens_store, single, gpt2_dir, client):
    store = _copy(tokens_store, "metadata")
    stage = _WatchMetadata(acts_cfg(gpt2_dir, "a"))
    run_stage(stage, store, client=client)
    # x, norm_hist, norm_max and their unit per hook, acts/ groups
    assert len(stage.before) == 4 * len(HOOKS) + 3
    assert stage.after == stage.before  # no array resized, no attribute written by a worker
    assert_identical(store, single, [f"acts/c/a/{h}/x" for h in HOOKS])


def test_a_stage_error_on_a_worker_is_reported_as_is(on_cluster, sae_dir, cluster):
    # top-1 storage of a ReLU SAE with tens of active features drops most of the mass
    cfg = dataclasses.replace(
        feats_cfg(sae_dir, scheduler=cluster.scheduler_address),
        name="sae_top1",
        k=1,
        transfer_models=(),
    )
    with pytest.raises(XprobeError, match="top-1 storage drops"):
        features(cfg, on_cluster)
    assert not on_cluster.info("feats/c/sae_top1").get("complete")
    assert not (on_cluster.local_path / "feats/c/sae_top1.lock").exists()


class _DiesAtChunk(ActivationsStage):
    """Activations whose worker, computing chunk ``die_at`` while ``flag`` exists, writes garbage
    into that chunk's rows (data files, no marker) and dies without cleanup. ``once``: the flag is
    removed first, so the rerun of the task succeeds."""

    die_at = 3
    flag = ""
    once = False

    def compute(self, store, todo):
        for result in super().compute(store, todo):
            if result.index == self.die_at and os.path.exists(self.flag):
                if self.once:
                    os.remove(self.flag)
                for path, data in result.arrays.items():
                    arr = store.array(path)
                    start = result.index * arr.chunks[0]
                    arr[start : start + len(data)] = np.full_like(data, 7)
                os._exit(1)
            yield result


def _dying(cfg: ActivationsConfig, flag: Path, once: bool) -> ActivationsStage:
    name = "DiesOnceAtChunk" if once else "DiesAtChunk"
    stage_cls = type(name, (_DiesAtChunk,), {"flag": str(flag), "once": once})
    return stage_cls(cfg)


@pytest.mark.slow  # restarts a worker process
def test_lost_worker_then_resume_is_identical(
    tokens_store, single, gpt2_dir, cluster, client, tmp_path
):
    store = _copy(tokens_store, "killed")
    flag = tmp_path / "die"
    flag.touch()
    units = [f"acts/c/a/{h}" for h in HOOKS]
    allowed = cluster.scheduler.allowed_failures
    cluster.scheduler.allowed_failures = 0  # no retry: the lost chunk fails the run
    try:
        with pytest.raises(XprobeError, match="worker died.*resume"):
            run_stage(_dying(acts_cfg(gpt2_dir, "a"), flag, once=False), store, client=client)
    finally:
        cluster.scheduler.allowed_failures = allowed
    for unit in units:
        assert 3 not in store.done_chunks(unit)
        assert not store.info(unit).get("complete")
    rows = store.array(f"{units[0]}/x")[3 * 128 : 4 * 128]
    assert (rows == 7).all()  # the dead worker's data is there, unmarked
    assert not (store.local_path / f"{units[0]}.lock").exists()

    client.wait_for_workers(2, timeout=120)
    flag.unlink()
    result = CliRunner().invoke(  # resume from the command line, on the cluster
        pipeline.cli.cli,
        [
            "activations",
            "--store",
            str(store.local_path),
            "--corpus",
            "c",
            "--model",
            str(gpt2_dir),
            "--name",
            "a",
            "--layers",
            "0,1",
            "--no-progress",
            "--scheduler",
            cluster.scheduler_address,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "activations: wrote" in result.output
    for unit in units:
        assert store.info(unit)["complete"]
    assert_identical(store, single, [f"{u}/x" for u in units])


@pytest.mark.slow  # restarts a worker process
def test_lost_worker_is_replaced_and_its_chunk_redone(
    tokens_store, single, gpt2_dir, client, tmp_path
):
    store = _copy(tokens_store, "retried")
    flag = tmp_path / "die_once"
    flag.touch()
    client.wait_for_workers(2, timeout=120)
    summary = run_stage(_dying(acts_cfg(gpt2_dir, "a"), flag, once=True), store, client=client)
    assert not flag.exists()  # a worker did die on chunk 3
    assert summary["chunks_written"] == N_CHUNKS
    assert_identical(store, single, [f"acts/c/a/{h}/x" for h in HOOKS])


def test_one_worker_per_visible_gpu_each_seeing_only_its_own(monkeypatch):
    from distributed import Client

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus() == ["3", "5"]
    with pytest.raises(XprobeError, match="only 2 GPU"):
        local_cluster(3)
    with local_cluster(0) as cluster, Client(cluster) as client:  # 0: every visible GPU
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        threads = client.nthreads()
    assert sorted(seen.values()) == ["3", "5"]
    assert sorted(threads.values()) == [1, 1]


def test_a_local_cluster_leaves_this_process_threads_alone(monkeypatch):
    """dask's nannies would write OMP_NUM_THREADS=1 (and MKL's, OpenBLAS's) into this process's
    environment before spawning a worker: every process started from here afterwards (a resumed
    `xprobe run`) would sum on one BLAS thread, in another order than the run it resumes. The
    workers still get one thread each, set in their own process; a restart leaks nothing."""
    from distributed import Client

    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with local_cluster(1) as cluster, Client(cluster) as client:
        assert not {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ}
        seen = client.run(lambda: {n: os.environ.get(n) for n in THREAD_VARIABLES})
        assert list(seen.values()) == [dict.fromkeys(THREAD_VARIABLES, "1")]
        client.restart()
        assert not {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ}

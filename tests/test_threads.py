"""Thread counts and bit-identical resumes: BLAS sums in another order on another thread count,
so a fit's checkpoint records the count it was written on and a resume on another one says so."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pipeline.maths.lstsq import SufficientStats
from pipeline.probes import accumulate
from pipeline.store import Store


def _fit(tmp_path):
    return SimpleNamespace(
        store=Store(tmp_path / "store"),
        unit="probes/t",
        device=torch.device("cpu"),
        dtype=torch.float64,
        held_out_mask=lambda: torch.zeros(4, dtype=torch.bool),
    )


def test_a_resume_on_another_thread_count_says_so_and_one_on_the_same_is_silent(
    tmp_path, capsys, monkeypatch
):
    fit = _fit(tmp_path)
    gen = torch.Generator().manual_seed(0)
    train = SufficientStats(3, 2, torch.device("cpu"), torch.float64)
    rows, cols = torch.tensor([0, 2, 3]), torch.tensor([1, 0, 1])
    train.update(torch.randn(5, 3, generator=gen), rows, cols, torch.rand(3, generator=gen))
    stats = {"h": {"train": train}}
    held = fit.held_out_mask()
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 5)
    accumulate.checkpoint(accumulate.Accumulation(fit, stats, [0], held))
    monkeypatch.undo()
    state = accumulate.resume(fit, 3, 2)
    err = capsys.readouterr().err
    assert f"resumes on {threads} torch thread(s)" in err and f"written on {threads + 5}" in err
    assert f"OMP_NUM_THREADS={threads + 5}" in err
    for name, value in train.state_dict().items():  # the statistics themselves, exactly
        assert torch.equal(state.stats["h"]["train"].state_dict()[name], value), name
    assert state.consumed == [0]
    accumulate.checkpoint(accumulate.Accumulation(fit, stats, [0], held))
    accumulate.resume(fit, 3, 2)
    assert capsys.readouterr().err == ""

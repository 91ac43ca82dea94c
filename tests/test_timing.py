import itertools

import pytest
import torch

from sparselora import timing


def test_median_ms_warms_up_then_takes_the_median(monkeypatch):
    calls = []
    # fake clock: each timed call starts at t and ends after its own duration (seconds)
    durations = iter([0.003, 0.001, 0.100, 0.002, 0.004])
    ticks = itertools.count()
    stamps = []

    def clock():
        i = next(ticks)
        if i % 2 == 0:
            stamps.append(float(i))
            return float(i)
        return stamps[-1] + next(durations)

    monkeypatch.setattr(timing.time, "perf_counter", clock)
    ms = timing.median_ms(lambda: calls.append(torch.is_grad_enabled()), iters=5, warmup=2)
    assert len(calls) == 7 and not any(calls)  # 2 warm-up + 5 timed, all under no_grad
    assert ms == pytest.approx(3.0)  # median of 3, 1, 100, 2, 4 ms: one straggler does not move it


def test_median_ms_rejects_no_iterations():
    with pytest.raises(ValueError, match="iters must be >= 1"):
        timing.median_ms(lambda: None, iters=0)


@pytest.mark.gpu
def test_median_ms_on_cuda_times_device_work():
    a = torch.randn(2048, 2048, device="cuda")
    small = timing.median_ms(lambda: a[:256, :256] @ a[:256, :256], iters=5, device="cuda")
    big = timing.median_ms(lambda: a @ a @ a, iters=5, device="cuda")
    assert 0 < small < big  # events around asynchronous launches see the device's time

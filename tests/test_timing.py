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


# -- benchmarks.common: rotating weight copies inside graphs of many calls ----------------------
def _common():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import common

    return common


def test_copies_exceed_three_times_l2_within_limits():
    c = _common()
    l2 = 60 << 20  # H200
    n = c.copies_for(19 << 20, l2)  # a packed 4096x4096 bf16 weight
    assert n * (19 << 20) >= 3 * l2 and (n - 1) * (19 << 20) < 3 * l2
    assert c.copies_for(400 << 20, l2) == 1  # one copy is already far beyond L2
    assert c.copies_for(1, l2) == 256  # capped count
    assert c.copies_for(100 << 20, l2, factor=30, max_total_bytes=1 << 30) == 10  # capped bytes


def test_calls_per_graph_are_many_and_whole_rounds():
    c = _common()
    assert c.calls_for(10.0, 6) == 198  # decode-sized call: ~100+ calls, 33 rounds of 6 copies
    assert c.calls_for(5000.0, 2) == 20  # prefill-sized call: the minimum, still many
    assert c.calls_for(1.0, 7) % 7 == 0 and c.calls_for(1.0, 7) >= 20
    assert c.calls_for(10.0, 300) == 300  # at least one round over all copies


@pytest.mark.gpu
def test_time_rotating_on_cuda_scales_with_work():
    c = _common()
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)

    def make(n):
        w = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16)
        return lambda: torch.nn.functional.linear(x, w)

    small, big = c.time_rotating(lambda: make(1024)), c.time_rotating(lambda: make(16384))
    assert small["copies"] > big["copies"] >= 1
    assert big["copies"] * big["copy_bytes"] >= 3 * c.l2_cache_bytes() or big["copies"] == 1
    assert big["graph_us"] > 4 * small["graph_us"] > 0 and big["eager_us"] > 0

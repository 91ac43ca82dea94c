import contextlib
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


def test_time_rotating_plumbing_with_a_fake_cuda(monkeypatch):
    # The CUDA calls of time_rotating replaced by a host clock and a graph that records the
    # callables run inside its capture: checks the copies, the calls per graph, the per-call
    # division and that every copy is used, without a GPU.
    import time
    import types

    c = _common()
    state = {"alloc": 0, "capture": None}

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    class Graph:
        def __init__(self):
            self.ops = []

        def replay(self):
            for op in self.ops:
                op()

    @contextlib.contextmanager
    def graph(g):
        state["capture"] = g.ops
        yield
        state["capture"] = None

    fake = types.SimpleNamespace(
        get_device_properties=lambda i: types.SimpleNamespace(L2_cache_size=1 << 20), current_device=lambda: 0,
        synchronize=lambda: None, memory_allocated=lambda: state["alloc"], Event=Event, CUDAGraph=Graph, graph=graph,
        Stream=lambda: types.SimpleNamespace(wait_stream=lambda s: None),
        current_stream=lambda: types.SimpleNamespace(wait_stream=lambda s: None), stream=lambda s: contextlib.nullcontext())
    monkeypatch.setattr(c, "torch", types.SimpleNamespace(cuda=fake, ones=lambda *a, **k: types.SimpleNamespace(sum=lambda: 0),
                                                          float32=None))
    used = []

    def make_copy():
        state["alloc"] += 256 << 10  # a 256 KiB weight copy: 12 copies reach 3 x 1 MiB
        i = len(used)
        used.append(0)

        def call():
            if state["capture"] is not None:
                state["capture"].append(call)  # captured, not run
                return
            used[i] += 1
            t = time.perf_counter()
            while time.perf_counter() - t < 50e-6:  # 50 us of "work"
                pass
        return call

    r = c.time_rotating(make_copy, target_us=5000.0, cold=True)
    assert r["copies"] == 12 and r["copy_bytes"] == 256 << 10
    assert r["calls"] % 12 == 0 and 20 <= r["calls"] <= 200
    assert 40 <= r["graph_us"] < 400 and 40 <= r["eager_us"] < 400 and r["cold_us"] >= 40
    # round-robin: every copy read equally often (graph replays: 6 x calls/12 each), plus the
    # cold cross-check's 21 calls on the first copy
    assert len(set(used[1:])) == 1 and used[1] >= 6 * r["calls"] // 12 and used[0] == used[1] + 21

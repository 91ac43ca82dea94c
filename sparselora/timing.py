"""One median-latency helper for the CLI, the demo and the end-to-end benchmark.

On CUDA the region is timed with device events (work is asynchronous; a host clock would time
the launch), on CPU with ``time.perf_counter``. Warm-up calls come first so that compilation,
handle creation and plan building stay out of the numbers; the median resists stragglers.
Per-GEMM benchmarks use ``benchmarks.common.time_rotating`` instead (graphs of many calls over rotating weight copies).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["median_ms"]


def median_ms(fn: Callable[[], object], iters: int, device=None, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``iters`` calls, under ``torch.no_grad``."""
    if iters < 1:
        raise ValueError(f"median_ms: iters must be >= 1, got {iters}")
    cuda = device is not None and torch.device(device).type == "cuda"
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)

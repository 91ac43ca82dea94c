"""Shared benchmark plumbing: the shape grid, device/version info, result files, honest timing.

Timing (``time_rotating``): what a layer costs inside a model, where its weight comes from HBM
(every other layer's weights went through L2 since its last call) and no CPU sits between two
kernels. So each method is timed on enough distinct copies of its weight to exceed 3x the L2
cache, called round-robin inside one CUDA graph of many calls, and the graph time is divided by
the number of calls: the headline figure (``graph_us``). No L2 flush by writing (``zero_()`` on a
big buffer leaves tens of MB of dirty lines that the timed kernel pays to write back), and no
graph of a single call (its fixed replay cost of a few us would compress small-layer ratios).
``eager_us`` is the same round-robin loop issued from Python: per-call wall time of back-to-back
launches, i.e. max(GPU time, CPU launch overhead); it says what an un-graphed caller gets.
``cold_single_us`` (a cross-check) times one call after a *read-only* pass over 2x L2.
"""
from __future__ import annotations

import datetime as _dt
import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

# SPARSELORA_RESULTS_DIR redirects every result file (tools/gpu_run.py points it at its run folder)
RESULTS = Path(os.environ.get("SPARSELORA_RESULTS_DIR") or Path(__file__).parent / "results")

# (model, layer, N=out_features, K=in_features): weight shapes of real VLMs (DESIGN.md)
SHAPES = [
    ("llava-1.5-7b", "attn q/k/v/o", 4096, 4096),
    ("llava-1.5-7b", "mlp up/gate", 11008, 4096),
    ("llava-1.5-7b", "mlp down", 4096, 11008),
    ("clip-vit-l/14", "attn", 1024, 1024),
    ("clip-vit-l/14", "mlp fc1", 4096, 1024),
    ("clip-vit-l/14", "mlp fc2", 1024, 4096),
    ("qwen2-vl-7b", "attn q/o", 3584, 3584),
    ("qwen2-vl-7b", "mlp up/gate", 18944, 3584),
    ("qwen2-vl-7b", "mlp down", 3584, 18944),
]
TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
DECODE_M = [m for m in TOKENS if m <= 16]
PREFILL_M = [m for m in TOKENS if m >= 4096]


def device_info() -> dict:
    import importlib.metadata as md

    def v(d):
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            return None

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": v("triton"),
        "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def geomean(xs):
    import math

    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def write_results(name: str, rows: list[dict], columns: list[str], summary: dict | None = None, info: dict | None = None) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (a table of ``columns``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = info or device_info()
    payload = {"info": info, "summary": summary or {}, "rows": rows}
    jpath, mpath = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    tmp = jpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, jpath)

    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = [f"# {name}", "", "| " + " | ".join(f"{k}: {fmt(v)}" for k, v in info.items()) + " |", ""]
    if summary:
        lines += ["| summary | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in summary.items()] + [""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    mpath.write_text("\n".join(lines) + "\n")
    return jpath, mpath


def l2_cache_bytes(device=None) -> int:
    """L2 size of the GPU (H100: 50 MB, H200: 60 MB)."""
    return int(torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device()).L2_cache_size)


def copies_for(bytes_per_copy: int, l2_bytes: int, factor: float = 3.0, max_copies: int = 256,
               max_total_bytes: int = 4 << 30) -> int:
    """How many distinct weight copies make a round-robin over them stream from HBM: their bytes
    together reach ``factor`` x L2 (at least 1, at most ``max_copies`` and ``max_total_bytes``)."""
    if bytes_per_copy <= 0:
        return max_copies
    import math

    n = math.ceil(factor * l2_bytes / bytes_per_copy)
    n = min(n, max_copies, max(1, max_total_bytes // bytes_per_copy))
    return max(1, n)


def calls_for(per_call_us: float, copies: int, target_us: float = 20000.0, lo: int = 20, hi: int = 200) -> int:
    """Calls captured in one graph: ~``target_us`` of work, ``lo``..``hi`` calls (~100 for decode
    layers), a whole number of rounds over the copies so each copy is read equally often."""
    n = int(min(hi, max(lo, target_us / max(per_call_us, 1e-3))))
    return max(1, n // copies) * copies


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _loop_us(calls, n_calls: int) -> float:
    s, e = _events()
    s.record()
    for i in range(n_calls):
        calls[i % len(calls)]()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) * 1000 / n_calls


def graph_time_us(calls, n_calls: int, reps: int = 5) -> float:
    """Per-call time of one CUDA graph holding ``n_calls`` calls round-robin over ``calls``
    (median over ``reps`` replays, divided by ``n_calls``). Warm up before capture: autotuners
    and plan searches must not run inside it."""
    import statistics

    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        for f in calls:
            f()
    cur.wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_calls):
            calls[i % len(calls)]()
    g.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = _events()
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1000 / n_calls)
    del g
    return statistics.median(times)


def cold_single_us(fn, l2_bytes: int, iters: int = 20) -> float:
    """Cross-check: median time of one call after a read-only pass over 2x L2 (evicts the
    weight without leaving dirty lines). Includes one kernel's launch latency."""
    import statistics

    buf = torch.ones(2 * l2_bytes // 4, dtype=torch.float32, device="cuda")
    fn()
    times = []
    for _ in range(iters):
        buf.sum()  # reads 2x L2, writes one scalar
        s, e = _events()
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1000)
    return statistics.median(times)


def time_rotating(make_copy, graph: bool = True, eager: bool = True, cold: bool = False,
                  target_us: float = 20000.0, max_calls: int = 200) -> dict:
    """Time a method over rotating weight copies. ``make_copy()`` builds one fresh copy of the
    method's weight (and whatever buffers it prepares) and returns a no-argument callable that
    runs the method on it. Returns ``copies``, ``copy_bytes`` (measured allocation of one copy),
    ``calls`` and ``graph_us`` / ``eager_us`` / ``cold_us`` as requested; a capture failure is
    recorded as ``graph_error`` (some paths cannot be captured), not raised."""
    l2 = l2_cache_bytes()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    first = make_copy()
    torch.cuda.synchronize()
    nbytes = torch.cuda.memory_allocated() - before
    calls = [first] + [make_copy() for _ in range(copies_for(nbytes, l2) - 1)]
    for f in calls:  # warm-up: compilation, autotuning, plan search, all outside any capture
        f()
    torch.cuda.synchronize()
    est = _loop_us(calls, len(calls))
    n_calls = calls_for(est, len(calls), target_us, hi=max_calls)
    res = {"copies": len(calls), "copy_bytes": nbytes, "calls": n_calls}
    if eager:
        _loop_us(calls, len(calls))
        res["eager_us"] = _loop_us(calls, n_calls)
    if graph:
        try:
            res["graph_us"] = graph_time_us(calls, n_calls)
        except Exception as e:  # noqa: BLE001 - e.g. a path that syncs or allocates on the host
            torch.cuda.synchronize()
            res["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if cold:
        res["cold_us"] = cold_single_us(first, l2)
    del calls, first
    return res


def per_call_us(make_copy) -> float:
    """:func:`time_rotating`'s CUDA-graph per-call time in us (its eager time if capture failed)."""
    t = time_rotating(make_copy)
    return t.get("graph_us", t["eager_us"])


def tuning_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every ``tune_*`` script shares: ``--quick``, ``--dtype``, ``--no-write-table``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--no-write-table", action="store_true", help="only write benchmarks/results")
    return ap

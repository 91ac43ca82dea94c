"""Shared benchmark plumbing: the shape grid, device/version info, result files."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

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


def cuda_time_us(fn, warmup: int = 10, iters: int = 50, flush_l2: bool = True) -> float:
    """Median CUDA-event time of ``fn()`` in microseconds, L2 flushed between runs."""
    import statistics

    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1000)
    return statistics.median(times)

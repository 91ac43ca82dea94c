"""The ``hybrid`` backend: per call, cuSPARSELt for many tokens, the Triton kernel for few.

Why two kernels: at small M (decode) a 2:4 GEMM is bound by reading the weight, and the Triton
kernel, which reads the canonical layout (9/16 of the dense bytes) and decompresses in registers,
is the fast one; cuSPARSELt's tiles are built for large M and lose there. At large M (prefill,
vision encoders) the work is tensor-core bound and cuSPARSELt's sparse MMA wins (up to 2x).

The switch point is a per-shape threshold ``cusparselt_min_m``: calls with M >= it use
cuSPARSELt, the others ``sparselora.ops.sparse24_linear`` (whose CUDA kernel is the Triton one).
Thresholds come from a measured table, ``tables/hybrid_<device>.json``, written on the GPU by
``benchmarks/tune_hybrid.py``, keyed by device name and ``"NxK"``:

    {"device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
     "shapes": {"4096x4096": {"cusparselt_min_m": 256, "slower_than_dense_m": []}, ...}}

``cusparselt_min_m`` is the smallest measured M from which cuSPARSELt beats Triton at every
larger measured M (``null``: never). Lookup order for a weight shape on a device:

1. the table entry of that device and shape;
2. the median threshold of that device's table (shapes not measured);
3. no table for the device: the heuristic ``HEURISTIC_MIN_M = 256``. Reason: below a few hundred
   tokens an H100/A100 GEMM is bound by weight bandwidth (the roofline ridge is ~300 FLOP/B for
   bf16), where Triton's smaller weight read wins; above it, the sparse tensor cores do.

"auto is never slower than dense": the tuner also records, per shape, the measured M values
(``measured_m``) and those where even the faster sparse path lost to dense
(``slower_than_dense_m``). :func:`dense_faster_at` turns that into a decision that
``sparsify(backend="auto", tokens=...)`` uses to leave such layers dense. This backend itself
holds no dense copy, so a layer is either sparse at every M or dense at every M.

Memory: 2 copies of the weight, the canonical values + meta (state dict, read by Triton) and the
cuSPARSELt compressed buffer (about 1.125x the dense bytes): ``auto`` only picks it with
``allow_extra_copy=True``, or name it (``backend="hybrid"``).
"""
from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path
from typing import Optional

import torch

from ..ops import sparse24_linear
from .base import Backend, get_backend, register_backend
from .cusparselt_backend import CUSPARSELT
from .device_tables import TABLE_DIR, slug as _slug
from .speed import nearest_measured

__all__ = ["HybridBackend", "HEURISTIC_MIN_M", "TABLE_DIR", "table_path", "load_table", "cusparselt_min_m",
           "choose", "dense_faster_at", "derive_thresholds"]

HEURISTIC_MIN_M = 256
NEVER = 1 << 62  # threshold meaning "cuSPARSELt never wins for this shape"


def table_path(device_name: str, table_dir: Path = TABLE_DIR) -> Path:
    return Path(table_dir) / f"hybrid_{_slug(device_name)}.json"


@functools.lru_cache(maxsize=None)
def _load_table_cached(path: str) -> Optional[dict]:
    p = Path(path)
    if not p.is_file():
        return None
    with open(p) as f:
        table = json.load(f)
    if not isinstance(table, dict) or not isinstance(table.get("shapes"), dict):
        raise ValueError(f"{p}: hybrid table needs a 'shapes' object keyed by 'NxK'")
    return table


def load_table(device_name: str, table_dir: Path = TABLE_DIR) -> Optional[dict]:
    """The measured table of this device, or None."""
    return _load_table_cached(str(table_path(device_name, table_dir)))


def _threshold(entry: dict) -> int:
    m = entry.get("cusparselt_min_m")
    return NEVER if m is None else int(m)


def cusparselt_min_m(device_name: str, n: int, k: int, table_dir: Path = TABLE_DIR) -> tuple[int, str]:
    """(threshold M, where it came from) for an ``[n, k]`` weight on this device."""
    table = load_table(device_name, table_dir)
    if table is None:
        return HEURISTIC_MIN_M, f"heuristic (no table for {device_name!r})"
    entry = table["shapes"].get(f"{n}x{k}")
    if entry is not None:
        return _threshold(entry), f"table {table_path(device_name, table_dir).name} ({n}x{k})"
    measured = [_threshold(e) for e in table["shapes"].values()]
    if not measured:
        return HEURISTIC_MIN_M, f"heuristic (empty table for {device_name!r})"
    return int(statistics.median_low(measured)), f"table {table_path(device_name, table_dir).name} (median, {n}x{k} not measured)"


def choose(device_name: str, n: int, k: int, m: int, table_dir: Path = TABLE_DIR) -> str:
    """``"cusparselt"`` or ``"triton"`` for ``m`` tokens through an ``[n, k]`` weight."""
    return "cusparselt" if m >= cusparselt_min_m(device_name, n, k, table_dir)[0] else "triton"


_nearest = nearest_measured  # the shared rule of every measured table (sparselora.backends.speed)


def dense_faster_at(device_name: str, n: int, k: int, tokens: Optional[list[int]] = None,
                    table_dir: Path = TABLE_DIR) -> Optional[str]:
    """Reason string if the measured table says dense beats the hybrid for an ``[n, k]`` weight.

    ``tokens`` None: only when the hybrid lost at *every* measured M (the layer never pays off).
    Otherwise: when it lost at the measured M nearest (log scale) to any requested M. No table,
    no entry for the shape, or no ``measured_m`` list (older tables): None, i.e. stay sparse:
    without a measurement the patcher keeps the user's request."""
    table = load_table(device_name, table_dir)
    entry = (table or {}).get("shapes", {}).get(f"{n}x{k}")
    if not entry or not entry.get("measured_m"):
        return None
    measured = sorted(int(v) for v in entry["measured_m"])
    slower = {int(v) for v in entry.get("slower_than_dense_m", [])}
    src = table_path(device_name, table_dir).name
    if tokens is None:
        if slower >= set(measured):
            return f"dense F.linear was faster at every measured M {measured} ({src})"
        return None
    lost = sorted({m for m in (int(t) for t in tokens) if _nearest(measured, m) in slower})
    if lost:
        return f"dense F.linear was faster at M={lost} (nearest measured M in {src})"
    return None


def derive_thresholds(rows: list[dict]) -> tuple[Optional[int], list[int]]:
    """Table entry of one weight shape from measurements ``{"M", "dense_us", "cusparselt_us",
    "triton_us" (None if no Triton kernel)}``: returns ``(cusparselt_min_m, slower_than_dense_m)``.

    ``cusparselt_min_m`` is the smallest measured M from which cuSPARSELt is at least as fast as
    Triton at every larger measured M (None: never); between two measured M the hybrid keeps
    Triton, the conservative side. Without a Triton kernel, cuSPARSELt is compared with dense.
    Each row gets ``hybrid_path``, ``hybrid_us`` and ``hybrid_speedup`` (dense / hybrid) added."""
    rows = sorted(rows, key=lambda r: r["M"])
    no_triton = all(r.get("triton_us") is None for r in rows)
    rival = "dense_us" if no_triton else "triton_us"
    wins = [r["cusparselt_us"] <= r[rival] for r in rows]
    min_m = next((r["M"] for i, r in enumerate(rows) if all(wins[i:])), None)
    slower = []
    for r in rows:
        use_cslt = no_triton or (min_m is not None and r["M"] >= min_m)
        r["hybrid_path"] = "cusparselt" if use_cslt else "triton"
        r["hybrid_us"] = r["cusparselt_us"] if use_cslt else r["triton_us"]
        r["hybrid_speedup"] = r["dense_us"] / r["hybrid_us"]
        if r["hybrid_us"] > r["dense_us"]:
            slower.append(r["M"])
    return min_m, slower


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


class HybridBackend(Backend):
    name = "hybrid"
    priority = 40
    copies = 2  # auto skips it unless allow_extra_copy=True
    weight_copies = ("2 (canonical values+meta: state dict and Triton's operand for small M; plus the cuSPARSELt "
                     "compressed buffer for large M; auto only with allow_extra_copy=True)")

    def _triton(self) -> Optional[Backend]:
        try:
            return get_backend("triton")
        except KeyError:
            return None

    def unavailable_reason(self):
        why = CUSPARSELT.unavailable_reason()
        if why:
            return f"cusparselt: {why}"
        triton = self._triton()
        if triton is None:
            return "the triton backend is not registered (sparselora.backends.triton_backend missing)"
        why = triton.unavailable_reason()
        return f"triton: {why}" if why else None

    def unsupported_reason(self, device, dtype, out_features, in_features):
        why = CUSPARSELT.unsupported_reason(device, dtype, out_features, in_features)
        if why:
            return f"cusparselt: {why}"
        triton = self._triton()
        why = triton.unsupported_reason(device, dtype, out_features, in_features) if triton else None
        return f"triton: {why}" if why else None

    def prepare(self, packed):
        extra = dict(CUSPARSELT.prepare(packed))
        # The small-M path calls the canonical op directly, so Triton needs no extra buffer.
        return extra

    def dense_faster_reason(self, device, dtype, out_features, in_features, tokens=None):
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        return dense_faster_at(_device_name(device.index or 0), out_features, in_features, tokens)

    def linear(self, x, packed, extra, bias):
        n, k = packed.shape
        m = x.numel() // k if k else 0
        if choose(_device_name(x.device.index or 0), n, k, m) == "cusparselt":
            return CUSPARSELT.linear(x, packed, extra, bias)
        return sparse24_linear(x, packed.values, packed.meta, bias)


HYBRID = register_backend(HybridBackend())

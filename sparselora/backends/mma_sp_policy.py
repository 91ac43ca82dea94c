"""When ``auto`` puts a layer on ``mma-sp`` rather than leaving it dense (the backend's speed verdict).

1. **Measured** (decides when present): ``tables/mma_sp_<device>.json``, written on the GPU by
   ``benchmarks/tune_mma_sp.py`` (``bash tools/gpu_run.sh tune_mma``): per weight shape the M
   measured and those where dense cuBLAS won (format and rules in
   :mod:`sparselora.backends.speed`).
2. **Prior** (no table for the device, or the shape is not in it): the static model of
   ``benchmarks/NOTES.md`` (mma.sp sections, predictions, not measurements), taken
   conservatively: mma-sp only where it predicts a clear win:

   * decode, M <= :data:`PRIOR_MAX_M` (32, the decode configs' token tiles): predicted 1.2-1.7x
     on H200 for the LLaVA/Qwen shapes, the weight read being the whole cost;
   * and N*K >= :data:`PRIOR_MIN_WEIGHT` (2^23 elements, 16 MiB dense in 16-bit, ~3.5 us of
     HBM at H200's 4.8 TB/s, a few times the ~1 us of launch and pipeline fill): below it the
     launch dominates both sides (CLIP 1024x1024 predicted ~1.0x), which is no clear win.

   Everything else is dense: M = 64 is predicted 1.0-1.3x, prefill <= 1.1x on H100/H200 (the
   shared-memory datapath of ``mma.sp``; 0.8-1.0x realistic). A100 prefill is predicted 1.3-1.6x
   but not measured, so the prior leaves it to a measured table too.

``tokens`` None (the M the model will run are not known): as for measured tables, dense only if
the layer is not predicted to win at any M (the small shapes); the large shapes stay sparse
(decode wins, prefill is predicted at 0.8-1.1x). Pass ``tokens`` to ``sparsify`` to be >= dense
at exactly those M.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .base import DeviceProfile, SpeedVerdict
from .device_tables import TABLE_DIR, slug
from .speed import load_speed_table, table_verdict

__all__ = ["PRIOR_MAX_M", "PRIOR_MIN_WEIGHT", "table_path", "prior_verdict", "mma_sp_verdict"]

PRIOR_MAX_M = 32
PRIOR_MIN_WEIGHT = 1 << 23


def table_path(device_name: str, table_dir: Optional[Path] = None) -> Path:
    return Path(table_dir or TABLE_DIR) / f"mma_sp_{slug(device_name)}.json"


def prior_verdict(n: int, k: int, tokens: Optional[list[int]], why_prior: str) -> SpeedVerdict:
    """The documented prior (module docstring) for an ``[n, k]`` weight."""
    if n * k < PRIOR_MIN_WEIGHT:
        return SpeedVerdict(True, "prior", f"{why_prior}; N*K={n * k} < 2^23: launch-bound, predicted ~1.0x at best "
                                           f"(benchmarks/NOTES.md)")
    if tokens is None:
        return SpeedVerdict(False, "prior", f"{why_prior}; decode M<={PRIOR_MAX_M} predicted 1.2-1.7x for N*K >= 2^23; "
                                            f"tokens not given (prefill is predicted 0.8-1.1x: pass tokens to exclude it)")
    lost = sorted({m for m in tokens if m > PRIOR_MAX_M})
    if lost:
        return SpeedVerdict(True, "prior", f"{why_prior}; M={lost} > {PRIOR_MAX_M}: no predicted win (M=64 1.0-1.3x, "
                                           f"prefill <= 1.1x on H100/H200, benchmarks/NOTES.md)")
    return SpeedVerdict(False, "prior", f"{why_prior}; decode M<={PRIOR_MAX_M} with N*K >= 2^23: predicted 1.2-1.7x")


def mma_sp_verdict(profile: DeviceProfile, n: int, k: int, tokens: Optional[list[int]],
                   table_dir: Optional[Path] = None) -> Optional[SpeedVerdict]:
    """The measured table's verdict for this device and shape, else the prior's; None off CUDA."""
    if profile.kind != "cuda":
        return None
    path = table_path(profile.name, table_dir)
    table = load_speed_table(path)
    if table is None:
        return prior_verdict(n, k, tokens, f"no table {path.name} for {profile.name!r}")
    entry = table["shapes"].get(f"{n}x{k}")
    verdict = table_verdict(entry, path.name, tokens) if entry else None
    if verdict is None:
        return prior_verdict(n, k, tokens, f"{n}x{k} not measured in {path.name}")
    return verdict

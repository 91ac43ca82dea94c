"""``auto``'s speed policy: per layer, a sparse backend only where it is faster than dense.

:func:`choose_for_speed` walks the backends ``auto`` may take for a layer (they run, support the
layer, hold one copy unless ``allow_extra_copy``), highest priority first, and asks each for its
:meth:`Backend.speed_verdict <sparselora.backends.base.Backend.speed_verdict>`:

* "faster than dense" (a measured table or a documented prior says so): take it;
* "dense faster": go on, but from then on only a backend with positive evidence may win;
* None (nothing known, e.g. every backend on CPU): take it if nothing before it said dense.

No backend left: the layer stays dense. Which source decided is in the returned reason (the
``sparsify`` report) and logged at INFO once per layer shape.

Why a sparsify-time, per-layer decision and not a dense path inside the layer: a layer that
falls back to dense keeps its ``nn.Linear`` (its one dense copy) and holds nothing sparse; one
that goes sparse holds only its packed copy and serves every M from it. A dense fallback per call
would have to expand the packed weight on the fly (an extra read and write of the weight, slower
than either kernel at decode) or keep a dense copy next to the sparse one (two copies, which the
project forbids). Layers that arrive packed (``load_sparse``, ``from_pretrained``, a model
sparsified on CPU and moved to the GPU) have no dense weight to keep, so they stay sparse on the
highest-priority backend (:func:`packed_arrival_note` puts the verdict in their
``backend_reason`` and the log when it says dense would be faster); sparsify on the device (with
``tokens``) to get the speed policy.

Measured tables share one per-shape format (``tables/<backend>_<device>.json``)::

    {"device": "NVIDIA H200", "dtype": "bfloat16", "backend": "mma-sp",
     "shapes": {"4096x4096": {"measured_m": [1, 16, 4096], "slower_than_dense_m": [4096]}, ...}}

read by :func:`table_verdict` (the ``hybrid`` table adds its threshold to the same fields).
"""
from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from .base import Backend, BackendChoice, DeviceProfile, SpeedVerdict, device_profile, extra_copy_reason, list_backends

log = logging.getLogger(__name__)

__all__ = ["choose_for_speed", "packed_arrival_note", "table_verdict", "load_speed_table", "nearest_measured"]


def nearest_measured(measured: list[int], m: int) -> int:
    """The measured M standing for ``m``: GEMM time scales with M roughly geometrically between
    tile-size steps, so nearest in log space (ties to the larger M)."""
    return min(measured, key=lambda v: (abs(math.log2(max(v, 1)) - math.log2(max(m, 1))), -v))


@functools.lru_cache(maxsize=None)
def _load_cached(path: str, mtime_ns: int) -> dict:
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table, dict) or not isinstance(table.get("shapes"), dict):
        raise ValueError(f"{path}: speed table needs a 'shapes' object keyed by 'NxK'")
    return table


def load_speed_table(path: Path) -> Optional[dict]:
    """The table at ``path``, or None if there is no file (a malformed one raises, naming it)."""
    p = Path(path)
    if not p.is_file():
        return None
    return _load_cached(str(p), p.stat().st_mtime_ns)


def table_verdict(entry: dict, src: str, tokens: Optional[list[int]]) -> Optional[SpeedVerdict]:
    """Verdict from one shape's measured entry (``measured_m``, ``slower_than_dense_m``); None if
    the entry has no measured M. ``tokens`` None: dense only if it lost at every measured M; else
    dense if it lost at the measured M nearest (log scale) to any requested M."""
    measured = sorted(int(v) for v in entry.get("measured_m") or [])
    if not measured:
        return None
    slower = {int(v) for v in entry.get("slower_than_dense_m") or []}
    if tokens is None:
        if slower >= set(measured):
            return SpeedVerdict(True, "measured", f"{src}: dense won at every measured M {measured}")
        won = [m for m in measured if m not in slower]
        return SpeedVerdict(False, "measured", f"{src}: won at measured M {won}")
    lost = sorted({m for m in tokens if nearest_measured(measured, m) in slower})
    if lost:
        return SpeedVerdict(True, "measured", f"{src}: dense won at M={lost} (nearest measured M)")
    return SpeedVerdict(False, "measured", f"{src}: won at M={sorted(set(tokens))} (nearest measured M)")


_LOGGED: set = set()


def _log_once(profile: DeviceProfile, dtype, n: int, k: int, tokens, reason: str) -> None:
    key = (profile.kind, profile.name, str(dtype), n, k, tuple(tokens or ()), reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        where = profile.name or profile.kind
        log.info("auto, %dx%d %s on %s, tokens %s: %s", n, k, str(dtype).replace("torch.", ""), where,
                 tokens if tokens is not None else "any", reason)


def packed_arrival_note(device, dtype, out_features: int, in_features: int, backend: Backend) -> str:
    """For a layer that arrives packed and took ``backend`` by plain ``auto`` (no dense weight to
    keep): "" unless the backend's verdict for any M says dense is faster, then that verdict
    (logged at INFO once per shape), so the layer's ``backend_reason`` does not hide it."""
    profile = device_profile(device)
    verdict = backend.speed_verdict(profile, dtype, out_features, in_features, None)
    if verdict is None or not verdict.dense_faster:
        return ""
    note = (f"arrived packed, so kept sparse (a dense fallback would need a second, dense copy); "
            f"{verdict.text(backend.name)}")
    _log_once(profile, dtype, out_features, in_features, None, note)
    return "; " + note


def choose_for_speed(device, dtype: torch.dtype, out_features: int, in_features: int,
                     tokens: Optional[list[int]] = None, allow_extra_copy: bool = False) -> BackendChoice:
    """``auto``'s pick for one layer with the speed policy (module docstring): a backend, or
    ``BackendChoice(None, reason)`` when dense wins or nothing supports the layer."""
    profile = device_profile(device)
    skipped: list[str] = []
    dense_said: list[str] = []
    supported = False
    for b in list_backends():
        why = b.unavailable_reason() or b.unsupported_reason(profile.device, dtype, out_features, in_features)
        if why is None and b.copies > 1 and not allow_extra_copy:
            why = extra_copy_reason(b)
        if why is not None:
            skipped.append(f"{b.name}: {why}")
            continue
        supported = True
        verdict: Optional[SpeedVerdict] = b.speed_verdict(profile, dtype, out_features, in_features, tokens)
        if verdict is not None and verdict.dense_faster:
            dense_said.append(verdict.text(b.name))
            continue
        if verdict is None and dense_said:
            skipped.append(f"{b.name}: no measurement or prior says it beats dense")
            continue
        speed = verdict.text(b.name) if verdict is not None else "speed: no table or prior (kept sparse)"
        notes = "; ".join(dense_said + skipped)
        reason = f"{b.name} (auto; {speed}" + (f"; skipped {notes})" if notes else ")")
        _log_once(profile, dtype, out_features, in_features, tokens, reason)
        return BackendChoice(b, reason)
    if not supported:
        return BackendChoice(None, "no backend supports it: " + "; ".join(skipped))
    reason = "auto: dense (" + "; ".join(dense_said + skipped) + ")"
    _log_once(profile, dtype, out_features, in_features, tokens, reason)
    return BackendChoice(None, reason, dense_is_faster=True)

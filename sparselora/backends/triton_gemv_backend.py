"""The ``triton-gemv`` backend: the v2 decode kernel (``sparse24_gemv.py``) for x with at most
16 rows, the op ``sparselora::sparse24_linear`` (v1 Triton GEMM on CUDA) for more.

Importing this module registers the backend; it does not touch the ops' CUDA kernels (those
stay v1's, registered by ``triton_backend``). ``sparselora.backends.base._load_optional`` has to
import ``sparselora.backends.triton_gemv_backend`` for the registry to list it.

Priority 5, below ``triton`` (20): ``auto`` must not pick an unmeasured kernel over the measured
v1. The backend exists so ``benchmarks/bench_gemm.py`` (which times every registered CUDA
backend) compares it with v1 and cuBLAS on a GPU; raise its priority, or fold the kernel into
``triton``'s small-M path, only after those numbers show it wins at decode.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..format import Packed24
from ..ops import sparse24_linear
from .base import register_backend
# the M > 16 fallback is the op, whose CUDA kernel (v1) triton_backend registers on import
from . import triton_backend

try:
    import triton  # noqa: F401

    from sparselora.triton_kernels.sparse24_gemv import GEMV_MAX_M, sparse24_gemv_triton

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - triton ships with CUDA torch
    _IMPORT_ERROR = f"triton is not importable ({e})"
    GEMV_MAX_M = 16


class TritonGemvBackend(triton_backend.TritonBackend):
    """Same device/dtype/shape rules as ``triton``; only the small-M kernel differs."""

    name = "triton-gemv"
    priority = 5  # below "triton" (20) until measured on a GPU: see the module docstring

    def unavailable_reason(self) -> Optional[str]:
        return _IMPORT_ERROR or super().unavailable_reason()

    def linear(self, x: torch.Tensor, packed: Packed24, extra: dict, bias: Optional[torch.Tensor]) -> torch.Tensor:
        rows = math.prod(x.shape[:-1])
        if rows <= GEMV_MAX_M and not (torch.is_grad_enabled() and (x.requires_grad or _needs_grad(packed, bias))):
            return sparse24_gemv_triton(x, packed.values, packed.meta, bias)
        # larger M (prefill: the GEMM's regime), or autograd needed: the op carries the backward
        return sparse24_linear(x, packed.values, packed.meta, bias)


def _needs_grad(packed: Packed24, bias: Optional[torch.Tensor]) -> bool:
    return packed.values.requires_grad or (bias is not None and bias.requires_grad)


register_backend(TritonGemvBackend())

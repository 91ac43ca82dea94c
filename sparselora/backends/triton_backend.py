"""The ``triton`` backend: 2:4 GEMMs that read the canonical layout directly (no extra copy).

Importing this module (``sparselora.backends.base._load_optional`` does) registers

* the backend ``"triton"`` (priority 20) in the registry, and
* the Triton launchers as the ``cuda`` kernels of the ops ``sparselora::sparse24_linear`` and
  ``sparselora::sparse24_matmul_t``, so anything calling the ops on CUDA tensors (``SparseLinear``
  through this backend, autograd's input gradient, ``torch.compile`` graphs) runs them.

If Triton is not installed the backend still registers, reporting itself unavailable, and the
ops keep their reference kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops import reference_sparse24_linear, sparse24_linear, sparse24_matmul_t
from ..format import Packed24, SparsityError, check_packed, unpack_24
from .base import Backend, SpeedVerdict, register_backend

try:
    import triton  # noqa: F401

    from sparselora.triton_kernels.sparse24_gemm import sparse24_linear_triton, sparse24_matmul_t_triton

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - triton ships with CUDA torch
    _IMPORT_ERROR = f"triton is not importable ({e})"

#: dtypes this backend takes (the kernels also run fp32, for tests, but that is not a fast path)
DTYPES = (torch.float16, torch.bfloat16)


class TritonBackend(Backend):
    name = "triton"
    priority = 20
    weight_copies = "1 (canonical packed values + meta, read directly by the kernel)"

    def unavailable_reason(self) -> Optional[str]:
        return _IMPORT_ERROR

    def unsupported_reason(self, device, dtype, out_features, in_features) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cuda":
            return f"Triton kernels need a CUDA device (got {device.type})"
        if dtype not in DTYPES:
            return f"dtype {dtype} not supported ({self.name} takes {', '.join(str(d) for d in DTYPES)})"
        if in_features % 4:
            return f"in_features={in_features} not a multiple of 4 (the 2:4 group size)"
        return None

    def speed_verdict(self, profile, dtype, out_features, in_features, tokens=None):
        # No measured table of its own. Prior: issue 11's static analysis of the shipped configs'
        # SASS (integer-pipe bound expansion) predicts 0.6-1.0x dense at decode and ~0.5x at prefill.
        if profile.kind != "cuda":
            return None
        return SpeedVerdict(True, "prior", "no measured table; static analysis (issue 11) predicts 0.6-1.0x dense at "
                                           "decode, ~0.5x at prefill")

    def linear(self, x: torch.Tensor, packed: Packed24, extra: dict, bias: Optional[torch.Tensor]) -> torch.Tensor:
        # through the op: its cuda kernel is the Triton launcher, and it carries autograd
        return sparse24_linear(x, packed.values, packed.meta, bias)


register_backend(TritonBackend())


if _IMPORT_ERROR is None:

    @sparse24_linear.register_kernel("cuda")
    def _sparse24_linear_cuda(x, values, meta, bias=None):
        if x.dtype in DTYPES and (bias is None or bias.dtype == x.dtype):
            return sparse24_linear_triton(x, values, meta, bias)
        # other dtypes (fp32/fp64) or mixed bias: the reference, which F.linear-checks them
        return reference_sparse24_linear(x, values, meta, bias)

    @sparse24_matmul_t.register_kernel("cuda")
    def _sparse24_matmul_t_cuda(dy, values, meta):
        if dy.dtype in DTYPES and dy.dtype == values.dtype:
            return sparse24_matmul_t_triton(dy, values, meta)
        # other dtypes: the reference computation, with the reference's checks
        n, k = check_packed(values, meta, "sparse24_matmul_t")
        if dy.shape[-1] != n:
            raise SparsityError(f"sparse24_matmul_t: dy has {dy.shape[-1]} features, weight has out_features={n}")
        return dy @ unpack_24(Packed24(values, meta, (n, k)))

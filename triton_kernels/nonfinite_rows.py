"""Triton kernel: NaN over every output row whose input row holds a NaN or ±Inf.

Why: every backend computes the masked dense model, ``y = x·(W⊙M)ᵀ + b`` as a dense product
(``sparselora.ops``), where an Inf at a pruned column still gives ``inf·0 = NaN``. Kernels that
never read x at pruned columns (cuSPARSELt, the sparse tensor cores) lose that; this kernel puts
it back after them.

One program per token reads its K inputs once (``x·0`` summed: 0 when all are finite, NaN
otherwise) and stores NaN over its N outputs only when the token is non-finite: a finite token
costs one read of x and no write. The torch formulation (``isfinite(x).all(-1)`` then
``masked_fill_``) also writes a bool temporary of x's size and reads and writes all of y.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["nan_nonfinite_rows_triton", "aot_specs"]

_GPU_BLOCK, _GPU_WARPS = 1024, 4
_INTERP_BLOCK = 32  # small, so test shapes cross tile edges


@triton.jit
def _nan_nonfinite_rows_kernel(x_ptr, y_ptr, N, K, stride_xm, stride_ym, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + offs
        acc += tl.load(x_ptr + m * stride_xm + cols, mask=cols < K, other=0).to(tl.float32) * 0.0
    bad = (tl.sum(acc, axis=0) != 0.0).to(tl.int32)  # NaN != 0: a NaN/Inf input
    n_out = N * bad  # columns to overwrite: all of them or none (a finite token writes nothing)
    nan = tl.full((BLOCK,), float("nan"), tl.float32).to(y_ptr.dtype.element_ty)
    for n0 in range(0, n_out, BLOCK):
        cols = n0 + offs
        tl.store(y_ptr + m * stride_ym + cols, nan, mask=cols < n_out)


def nan_nonfinite_rows_triton(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """In place: ``y[..., :] = NaN`` for every token of ``x [..., K]`` with a NaN/Inf input;
    ``y [..., N]`` has x's leading shape and a unit inner stride. Returns ``y``."""
    lead = x.shape[:-1]
    if tuple(y.shape[:-1]) != tuple(lead) or y.device != x.device:
        raise ValueError(f"nan_nonfinite_rows: y {tuple(y.shape)} on {y.device} does not match x {tuple(x.shape)} on {x.device}")
    m, k, n = math.prod(lead), x.shape[-1], y.shape[-1]
    if m == 0 or n == 0 or k == 0:
        return y
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y2 = y.view(m, n)  # a view: the NaNs land in y (raises if y's layout has no such view)
    block = _INTERP_BLOCK if os.environ.get("TRITON_INTERPRET", "0") == "1" else _GPU_BLOCK
    _nan_nonfinite_rows_kernel[(m,)](x2, y2, n, k, x2.stride(0), y2.stride(0), BLOCK=block, num_warps=_GPU_WARPS)
    return y


def aot_specs():
    """The shipped config for each 16-bit dtype (cuSPARSELt's inputs)."""
    from sparselora.triton_kernels.aot import AotSpec, aligned_attrs

    specs = []
    for ty in ("fp16", "bf16"):
        sig = {"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
               "BLOCK": "constexpr"}
        specs.append(AotSpec(f"nan_nonfinite_rows_{ty}", _nan_nonfinite_rows_kernel, sig, {"BLOCK": _GPU_BLOCK},
                             num_warps=_GPU_WARPS, num_stages=1,
                             extra={"attrs": aligned_attrs(_nan_nonfinite_rows_kernel,
                                                           ["x_ptr", "y_ptr", "N", "K", "stride_xm", "stride_ym"])}))
    return specs

"""torch.library ops on the canonical 2:4 layout (see :mod:`sparselora.format`).

``sparselora::sparse24_linear(x, values, meta, bias) -> y = x @ W.T + bias``
``sparselora::sparse24_matmul_t(dy, values, meta) -> dy @ W`` (the input gradient)

Each op has a reference implementation (decompress, then dense matmul: works on any device
and is the numerical oracle), a fake implementation (so ``torch.compile`` traces it), and
autograd wiring. Faster device kernels register themselves for the ``cuda`` key (see
``sparselora.backends``); callers never change.

Operands: the ops validate ``(values, meta)`` from the caller once per meta tensor (and again after
an in-place change: :func:`sparselora.format.check_meta_once`); the kernels behind them trust
validated operands. Semantics on every backend are those of the masked dense model,
``y = x·(W⊙M)ᵀ + b`` as a dense product: a token (row of ``x``) with a NaN or ±Inf among its K
inputs, pruned columns included, gets a non-finite value in every one of its N outputs (the
dense product has ``inf·0 = NaN`` there), and a token with finite inputs gets finite outputs
unless the sum overflows. Whether a non-finite output is NaN or ±Inf is not specified (kernels
that skip pruned columns report such tokens as NaN: the mma.sp kernels in themselves, cuSPARSELt
through :func:`propagate_nonfinite`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .format import Packed24, SparsityError, check_meta_once, check_packed, unpack_24, _unpack_indices

__all__ = ["sparse24_linear", "sparse24_matmul_t", "reference_sparse24_linear", "check_linear_inputs",
           "propagate_nonfinite", "layer_bias"]


def check_linear_inputs(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor], name: str = "sparse24_linear") -> tuple[int, int]:
    """Validate the operands of a packed linear; return the dense weight shape (N, K)."""
    n, k = check_packed(values, meta, name)
    check_meta_once(meta, k, name)
    if x.dim() == 0:
        raise SparsityError(f"{name}: input is a 0-d tensor; expected [..., {k}] (in_features last)")
    if x.shape[-1] != k:
        raise SparsityError(f"{name}: input has {x.shape[-1]} features, weight expects in_features={k}")
    if x.device != values.device:
        raise SparsityError(f"{name}: input on {x.device}, weight on {values.device}")
    if x.dtype != values.dtype:
        raise SparsityError(f"{name}: input dtype {x.dtype} != weight dtype {values.dtype}")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise SparsityError(f"{name}: bias must be [{n}] on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    if bias is not None and bias.dtype != x.dtype:
        raise SparsityError(f"{name}: bias dtype {bias.dtype} != input dtype {x.dtype} (cast the bias)")
    return n, k


def layer_bias(bias: Optional[torch.Tensor], values: torch.Tensor, name: str) -> Optional[torch.Tensor]:
    """The bias a packed layer stores: a detached copy, ``[out_features]``, in the weight's dtype
    and on its device (as ``nn.Linear`` keeps them), so a float64 bias given with a float32 weight
    is cast once here instead of failing in every forward."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or bias.shape != (values.shape[0],):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise SparsityError(f"{name}: bias must be a [{values.shape[0]}] tensor (out_features), got {got}")
    return bias.detach().to(device=values.device, dtype=values.dtype, copy=True)


def propagate_nonfinite(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Set to NaN, in place, every output of a token (row of ``x [..., K]``) that has a NaN/Inf
    input: the masked-dense semantics for kernels that never read pruned columns (the sparse tensor
    cores, cuSPARSELt). Finite tokens are unchanged. On CUDA a Triton kernel reads ``x`` once and
    writes only the rows of non-finite tokens; elsewhere torch also reads and writes all of ``y``.
    Returns ``y``."""
    if y.is_cuda:
        try:  # one read of x, writes only for non-finite tokens
            from .triton_kernels.nonfinite_rows import nan_nonfinite_rows_triton
        except ImportError:
            pass
        else:
            return nan_nonfinite_rows_triton(y, x)
    bad = ~torch.isfinite(x).all(-1, keepdim=True)
    return y.masked_fill_(bad, float("nan"))


def reference_sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    n, k = check_linear_inputs(x, values, meta, bias)
    w = unpack_24(Packed24(values, meta, (n, k)))
    return F.linear(x, w, bias)


@torch.library.custom_op("sparselora::sparse24_linear", mutates_args=())
def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return reference_sparse24_linear(x, values, meta, bias)


@sparse24_linear.register_fake
def _(x, values, meta, bias=None):
    n, _ = check_linear_inputs(x, values, meta, bias)
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op("sparselora::sparse24_matmul_t", mutates_args=())
def sparse24_matmul_t(dy: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    n, k = check_packed(values, meta, "sparse24_matmul_t")
    if dy.dim() == 0 or dy.shape[-1] != n:
        raise SparsityError(f"sparse24_matmul_t: dy has shape {tuple(dy.shape)}, weight has out_features={n}")
    return dy @ unpack_24(Packed24(values, meta, (n, k)))


@sparse24_matmul_t.register_fake
def _(dy, values, meta):
    n, k = check_packed(values, meta, "sparse24_matmul_t")
    if dy.dim() == 0 or dy.shape[-1] != n:
        raise SparsityError(f"sparse24_matmul_t: dy has shape {tuple(dy.shape)}, weight has out_features={n}")
    return dy.new_empty(*dy.shape[:-1], k)


def _rows(t: torch.Tensor, feat: int) -> torch.Tensor:
    """``t [..., feat]`` as 2-D (an explicit row count: reshape(-1, 0) is ambiguous)."""
    return t.reshape(math.prod(t.shape[:-1]), feat)


def _setup(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, values, meta = ctx.saved_tensors
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = sparse24_matmul_t(dy, values, meta)
    if ctx.needs_input_grad[1]:
        # gradient of the kept values only: (dy^T x) gathered at the kept positions
        n, k = values.shape[0], 2 * values.shape[1]
        dw = _rows(dy, n).t() @ _rows(x, k)
        idx = _unpack_indices(meta, k // 2).reshape(n, k // 4, 2)
        dvalues = torch.gather(dw.reshape(n, k // 4, 4), -1, idx).reshape(n, k // 2)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        dbias = _rows(dy, dy.shape[-1]).sum(0)
    return dx, dvalues, None, dbias


sparse24_linear.register_autograd(_backward, setup_context=_setup)


def _setup_t(ctx, inputs, output):
    _, values, meta = inputs
    ctx.save_for_backward(values, meta)


def _backward_t(ctx, g):
    values, meta = ctx.saved_tensors
    return (sparse24_linear(g, values, meta, None) if ctx.needs_input_grad[0] else None), None, None


sparse24_matmul_t.register_autograd(_backward_t, setup_context=_setup_t)

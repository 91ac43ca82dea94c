"""torch.library ops on the canonical 2:4 layout (see :mod:`sparselora.format`).

``sparselora::sparse24_linear(x, values, meta, bias) -> y = x @ W.T + bias``
``sparselora::sparse24_matmul_t(dy, values, meta) -> dy @ W`` (the input gradient)

Each op has a reference implementation (decompress, then dense matmul: works on any device
and is the numerical oracle), a fake implementation (so ``torch.compile`` traces it), and
autograd wiring. Faster device kernels register themselves for the ``cuda`` key (see
``sparselora.backends``); callers never change.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .format import Packed24, SparsityError, check_packed, unpack_24, _unpack_indices

__all__ = ["sparse24_linear", "sparse24_matmul_t", "reference_sparse24_linear", "check_linear_inputs"]


def check_linear_inputs(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor], name: str = "sparse24_linear") -> tuple[int, int]:
    """Validate the operands of a packed linear; return the dense weight shape (N, K)."""
    n, k = check_packed(values, meta, name)
    if x.shape[-1] != k:
        raise SparsityError(f"{name}: input has {x.shape[-1]} features, weight expects in_features={k}")
    if x.device != values.device:
        raise SparsityError(f"{name}: input on {x.device}, weight on {values.device}")
    if x.dtype != values.dtype:
        raise SparsityError(f"{name}: input dtype {x.dtype} != weight dtype {values.dtype}")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise SparsityError(f"{name}: bias must be [{n}] on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    return n, k


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
    if dy.shape[-1] != n:
        raise SparsityError(f"sparse24_matmul_t: dy has {dy.shape[-1]} features, weight has out_features={n}")
    return dy @ unpack_24(Packed24(values, meta, (n, k)))


@sparse24_matmul_t.register_fake
def _(dy, values, meta):
    _, k = check_packed(values, meta, "sparse24_matmul_t")
    return dy.new_empty(*dy.shape[:-1], k)


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
        dw = dy.reshape(-1, n).t() @ x.reshape(-1, k)
        idx = _unpack_indices(meta, k // 2).reshape(n, k // 4, 2)
        dvalues = torch.gather(dw.reshape(n, k // 4, 4), -1, idx).reshape(n, k // 2)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dx, dvalues, None, dbias


sparse24_linear.register_autograd(_backward, setup_context=_setup)


def _setup_t(ctx, inputs, output):
    _, values, meta = inputs
    ctx.save_for_backward(values, meta)


def _backward_t(ctx, g):
    values, meta = ctx.saved_tensors
    return (sparse24_linear(g, values, meta, None) if ctx.needs_input_grad[0] else None), None, None


sparse24_matmul_t.register_autograd(_backward_t, setup_context=_setup_t)

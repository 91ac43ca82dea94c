"""SparseLoRA kernels: fused sparse-base + masked-LoRA forward and its backward.

Math (W frozen, 2:4 with mask M, adapter ``A [r, K]``, ``B [N, r]``, ``s = alpha / r``)::

    forward        y   = x · ((W + s·B·A) ⊙ M)ᵀ + b                      (no dropout)
                   y   = x · Wᵀ + s · xa · ((B·A) ⊙ M)ᵀ + b               (xa = dropout(x))
    input grad     dx  = dy · (W ⊙ M  [+ s·(B·A) ⊙ M  when xa is x])
                   dxa = s · dy · ((B·A) ⊙ M)                              (separate adapter input)
    adapter grads  G   = s · ((dyᵀ · xa) ⊙ M),   dB = G · Aᵀ,   dA = Bᵀ · G

None of the kernels ever holds an N×K matrix in memory: each output tile expands its [BN, BK]
slice of W from the canonical packed layout (values + 2-bit indices, see
``sparselora.format``), computes the matching [BN, BK] slice of B·A with one small ``tl.dot``
(r padded to a power of two ≥ 16), masks, and contracts. Recomputing B·A per tile costs r/BM
extra flops relative to the main product (12.5 % at BM = 128, r = 16); at small M the kernel is
bound by the weight bytes, so the extra flops are hidden. The adapter gradients compute tiles of
dyᵀ·xa on the fly, mask them and contract them with A or B immediately; partial dA / dB from
different tiles meet through fp32 atomics.

The kernels run on CUDA and on CPU under ``TRITON_INTERPRET=1`` (tests). Interpreter bugs
(PLATFORM.md): bf16 ``tl.dot`` and bf16 register arithmetic are broken there, so the launcher
sets ``UPCAST`` and every operand is upcast to fp32 before arithmetic; ``@triton.autotune``
with several configs fails there, so configs are picked by a small explicit heuristic on M
(``_regime``: decode / medium / prefill) and every shipped config is listed in :func:`aot_specs`.

Layout assumptions enforced by the launchers: all operands 2-D and contiguous (row-major),
A/B/x/xa in the weight's dtype.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from sparselora.format import check_meta_once

from .aot import AotSpec
from .launch_guard import on_tensor_device

__all__ = [
    "sparse_lora_fwd",
    "sparse_lora_dx",
    "sparse_lora_dab",
    "reference_fwd",
    "reference_dx",
    "reference_dab",
    "aot_specs",
    "MAX_RANK",
]

#: the largest adapter rank the kernels take (BR = 64 is the largest block in aot_specs); larger
#: ranks take the reference path (which materializes the N×K update)
MAX_RANK = 64


# ---------------------------------------------------------------------------------------------
# tile helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _group_pos(meta_ptr, offs_n, k0, N, K, stride_mn, BN: tl.constexpr, BK: tl.constexpr):
    """For the [BN, BK] tile at rows ``offs_n``, dense columns ``k0 .. k0+BK`` (``k0``, ``BK``
    multiples of 32, so whole meta words): boolean [BN, BK/4, 4] tensors saying which position of
    each group holds kept value 0 and kept value 1. Groups past K or rows past N keep nothing."""
    WORDS: tl.constexpr = BK // 32
    wcol = k0 // 32 + tl.arange(0, WORDS)
    words = tl.load(meta_ptr + offs_n[:, None] * stride_mn + wcol[None, :],
                    mask=(offs_n[:, None] < N) & (wcol[None, :] < (K + 31) // 32), other=0)
    # word w holds the 2-bit indices of kept values 16w .. 16w+15 at bits 0, 2, .., 30; the
    # arithmetic shift of a negative word is harmless because 2 bits are kept
    shifts = 2 * tl.arange(0, 16)
    idx = (words[:, :, None] >> shifts[None, None, :]) & 3
    i0, i1 = tl.split(tl.reshape(idx, (BN, BK // 4, 2)))
    g = k0 // 4 + tl.arange(0, BK // 4)
    valid = ((offs_n[:, None] < N) & (g[None, :] < K // 4))[:, :, None]
    pos = tl.arange(0, 4)[None, None, :]
    return (pos == i0[:, :, None]) & valid, (pos == i1[:, :, None]) & valid


@triton.jit
def _keep_tile(meta_ptr, offs_n, k0, N, K, stride_mn, BN: tl.constexpr, BK: tl.constexpr):
    """Boolean [BN, BK] tile of the 2:4 mask."""
    hit0, hit1 = _group_pos(meta_ptr, offs_n, k0, N, K, stride_mn, BN, BK)
    return tl.reshape(hit0 | hit1, (BN, BK))


@triton.jit
def _w_tile(values_ptr, meta_ptr, offs_n, k0, N, K, stride_vn, stride_mn, BN: tl.constexpr, BK: tl.constexpr):
    """fp32 [BN, BK] tile of the dense W expanded from the packed layout, and its mask tile.
    One coalesced load of the [BN, BK/2] kept values and one of the [BN, BK/32] meta words."""
    vcol = k0 // 2 + tl.arange(0, BK // 2)
    vals = tl.load(values_ptr + offs_n[:, None] * stride_vn + vcol[None, :],
                   mask=(offs_n[:, None] < N) & (vcol[None, :] < K // 2), other=0.0).to(tl.float32)
    v0, v1 = tl.split(tl.reshape(vals, (BN, BK // 4, 2)))
    hit0, hit1 = _group_pos(meta_ptr, offs_n, k0, N, K, stride_mn, BN, BK)
    w = tl.where(hit0, v0[:, :, None], tl.where(hit1, v1[:, :, None], 0.0))
    return tl.reshape(w, (BN, BK)), tl.reshape(hit0 | hit1, (BN, BK))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 tests need exact fp32 products (no tf32); 16-bit inputs ignore the precision flag
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ---------------------------------------------------------------------------------------------
# forward: y[M, N]
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    x_ptr, xa_ptr, values_ptr, meta_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, scaling,
    stride_xm, stride_xam, stride_vn, stride_mn, stride_ar, stride_bn, stride_ym,
    HAS_BIAS: tl.constexpr, SEPARATE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # N tiles vary fastest: consecutive programs share the x tile (decode: x is tiny anyway)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    offs_r = tl.arange(0, BR)
    cdt = x_ptr.dtype.element_ty

    # B tile [BN, BR] stays in registers for the whole K loop
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :],
                mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
    if UPCAST:
        b = b.to(tl.float32)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        xmask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=xmask, other=0.0)
        # W tile [BN, BK] from the packed layout, and the B·A tile for the same block
        w, keep = _w_tile(values_ptr, meta_ptr, offs_n, k0, N, K, stride_vn, stride_mn, BN, BK)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
                    mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            x = x.to(tl.float32)
        ba = _dot(b, a, IEEE) * scaling  # [BN, BK] fp32
        if SEPARATE:
            xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_k[None, :], mask=xmask, other=0.0)
            lora = tl.where(keep, ba, 0.0)
            if UPCAST:
                xa = xa.to(tl.float32)
            else:
                w = w.to(cdt)
                lora = lora.to(cdt)
            acc += _dot(x, tl.trans(w), IEEE)
            acc += _dot(xa, tl.trans(lora), IEEE)
        else:
            weff = tl.where(keep, w + ba, 0.0)
            if not UPCAST:
                weff = weff.to(cdt)
            acc += _dot(x, tl.trans(weff), IEEE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    ymask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=ymask)


# ---------------------------------------------------------------------------------------------
# input gradient: dx[M, K] = dy · ((USE_W·W + USE_LORA·s·B·A) ⊙ M)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dx_kernel(
    dy_ptr, values_ptr, meta_ptr, a_ptr, b_ptr, dx_ptr,
    M, N, K, R, scaling,
    stride_dym, stride_vn, stride_mn, stride_ar, stride_bn, stride_dxm,
    USE_W: tl.constexpr, USE_LORA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_k = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
    offs_r = tl.arange(0, BR)
    cdt = dy_ptr.dtype.element_ty

    if USE_LORA:
        # A tile [BR, BK] is fixed for this program
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
                    mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)

    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
        if USE_W:
            w, keep = _w_tile(values_ptr, meta_ptr, offs_n, pid_k * BK, N, K, stride_vn, stride_mn, BN, BK)
        else:
            keep = _keep_tile(meta_ptr, offs_n, pid_k * BK, N, K, stride_mn, BN, BK)
            w = tl.zeros((BN, BK), dtype=tl.float32)
        if USE_LORA:
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :],
                        mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            w = w + _dot(b, a, IEEE) * scaling
        weff = tl.where(keep, w, 0.0)
        if not UPCAST:
            weff = weff.to(cdt)
        acc += _dot(dy, weff, IEEE)

    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


# ---------------------------------------------------------------------------------------------
# adapter gradients: G = s·((dyᵀ·xa) ⊙ M) per [BN, BK] tile, dB += G·Aᵀ, dA += Bᵀ·G (fp32 atomics)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dab_kernel(
    dy_ptr, xa_ptr, meta_ptr, a_ptr, b_ptr, da_ptr, db_ptr,
    M, N, K, R, scaling,
    stride_dym, stride_xam, stride_mn, stride_ar, stride_bn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    offs_k = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
    offs_r = tl.arange(0, BR)
    cdt = dy_ptr.dtype.element_ty

    g = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(0, M, BM):
        # int64: row offsets m * stride reach 2**31 once M*N (dy) or M*K (xa) does
        offs_m = (m0 + tl.arange(0, BM)).to(tl.int64)
        dyt = tl.load(dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None],
                      mask=(offs_m[None, :] < M) & (offs_n[:, None] < N), other=0.0)
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_k[None, :],
                     mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            xa = xa.to(tl.float32)
        g += _dot(dyt, xa, IEEE)

    keep = _keep_tile(meta_ptr, offs_n, pid_k * BK, N, K, stride_mn, BN, BK)
    g = tl.where(keep, g * scaling, 0.0)
    if not UPCAST:
        g = g.to(cdt)  # tensor-core operand; the contraction still accumulates in fp32

    # dB[BN, BR] += G · Aᵀ
    at = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None],
                 mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
    # dA[BR, BK] += Bᵀ · G
    bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None],
                 mask=(offs_n[None, :] < N) & (offs_r[:, None] < R), other=0.0)
    if UPCAST:
        at = at.to(tl.float32)
        bt = bt.to(tl.float32)
    db = _dot(g, at, IEEE)
    da = _dot(bt, g, IEEE)
    tl.atomic_add(db_ptr + offs_n[:, None] * R + offs_r[None, :], db,
                  mask=(offs_n[:, None] < N) & (offs_r[None, :] < R))
    tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], da,
                  mask=(offs_r[:, None] < R) & (offs_k[None, :] < K))


# ---------------------------------------------------------------------------------------------
# configs and launchers
# ---------------------------------------------------------------------------------------------
# (BM, BN, BK, num_warps, num_stages) per M regime. Decode is bound by the packed weight bytes
# and needs many CTAs in flight: a short BM and narrow N tiles (BN = 32 gives N/32 CTAs, 128 for
# N = 4096); each N tile re-reads all of A from L2 (R·K·2 bytes), so narrower tiles would trade
# occupancy for L2 traffic. Prefill wants big tiles for tensor-core reuse (B·A costs r/BM extra).
_FWD_CONFIGS = {
    "small": (16, 32, 128, 4, 4),
    "medium": (64, 64, 64, 4, 3),
    "large": (128, 128, 64, 8, 3),
}
# the backward loops over N (dx) or M (dA/dB); training steps have large M
_BWD_CONFIGS = {
    "small": (16, 64, 64, 4, 4),
    "medium": (64, 64, 64, 4, 3),
    "large": (128, 128, 64, 8, 3),
}


def _regime(m: int) -> str:
    return "small" if m <= 16 else ("medium" if m <= 64 else "large")


# Some GPUs have less shared memory per block than the sm_80/sm_90 these configs are sized for
# (sm_86/sm_89: 99 KB against 163 KB/227 KB): a "large" config that needs more fails there at
# launch with OutOfResources. The launch then steps down to the next smaller regime's config
# (same kernel, smaller tiles; nothing ran, so retrying is safe) and remembers it per device.
_SMALLER = {"large": "medium", "medium": "small"}
_FITS: dict[tuple, str] = {}  # (kernel name, regime, device index) -> regime whose config fits


def _launch(kernel, name: str, table: dict, regime: str, device: torch.device, grid_of, args: tuple, **kw) -> None:
    """``kernel[grid](*args, BM=.., BN=.., BK=.., num_warps=.., num_stages=.., **kw)`` with the config
    of ``regime`` (``grid_of(bm, bn, bk)`` gives the grid), stepping down where it does not fit."""
    from triton.runtime.errors import OutOfResources

    key = (name, regime, device.index)
    regime = _FITS.get(key, regime)
    while True:
        bm, bn, bk, warps, stages = table[regime]
        try:
            kernel[grid_of(bm, bn, bk)](*args, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages, **kw)
            return
        except OutOfResources:
            if regime not in _SMALLER:
                raise
            regime = _SMALLER[regime]
            _FITS[key] = regime


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _flags(dtype: torch.dtype) -> dict:
    return {"UPCAST": _interpret() and dtype != torch.float32, "IEEE": dtype == torch.float32}


def _check(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"sparse_lora: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise TypeError(f"sparse_lora: {name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"sparse_lora: {name} is on {t.device}, expected {device}")
    return t.contiguous()


def _check_operands(values, meta, a, b, dtype, device):
    """Validate the packed weight (``values`` may be None when only the mask is read) and the
    adapter; return contiguous operands and (N, K, r)."""
    n, words = meta.shape
    r = a.shape[0]
    if not (1 <= r <= MAX_RANK):
        raise ValueError(f"sparse_lora: rank {r} outside 1..{MAX_RANK}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"sparse_lora: dtype {dtype} not supported by the Triton kernels (fp16, bf16, fp32)")
    k = a.shape[1]
    if k % 4 or -(-(k // 2) // 16) != words:
        raise ValueError(f"sparse_lora: lora_A has {k} columns, which does not match meta {tuple(meta.shape)}")
    if values is not None:
        values = _check("values", values, (n, k // 2), dtype, device)
    meta = _check("meta", meta, (n, words), torch.int32, device)
    check_meta_once(meta, k, "sparse_lora")  # kernels trust the indices: validated once per meta tensor
    a = _check("lora_A", a, (r, k), dtype, device)
    b = _check("lora_B", b, (n, r), dtype, device)
    return values, meta, a, b, n, k, r


@on_tensor_device
def sparse_lora_fwd(x: torch.Tensor, xa: Optional[torch.Tensor], values: torch.Tensor, meta: torch.Tensor,
                    a: torch.Tensor, b: torch.Tensor, scaling: float, bias: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x·((W + s·B·A) ⊙ M)ᵀ + b`` (``xa`` None) or ``x·Wᵀ + s·xa·((B·A) ⊙ M)ᵀ + b``; x is 2-D.
    ``out`` (optional, contiguous [M, N]) receives the result."""
    values, meta, a, b, n, k, r = _check_operands(values, meta, a, b, x.dtype, x.device)
    x = _check("x", x, (x.shape[0], k), x.dtype, x.device)
    m = x.shape[0]
    if xa is not None:
        xa = _check("xa", xa, (m, k), x.dtype, x.device)
    if bias is not None:
        bias = _check("bias", bias, (n,), x.dtype, x.device)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else _check("out", out, (m, n), x.dtype, x.device)
    if m == 0:
        return y
    _launch(_fwd_kernel, "fwd", _FWD_CONFIGS, _regime(m), x.device,
            lambda bm, bn, bk: (triton.cdiv(n, bn), triton.cdiv(m, bm)),
            (x, xa if xa is not None else x, values, meta, a, b, bias if bias is not None else y, y,
             m, n, k, r, float(scaling),
             x.stride(0), (xa if xa is not None else x).stride(0), values.stride(0), meta.stride(0), a.stride(0), b.stride(0),
             y.stride(0)),
            HAS_BIAS=bias is not None, SEPARATE=xa is not None, BR=_rank_block(r), **_flags(x.dtype))
    return y


@on_tensor_device
def sparse_lora_dx(dy: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scaling: float, use_w: bool = True, use_lora: bool = True,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dy · ((use_w·W + use_lora·s·B·A) ⊙ M)`` for 2-D ``dy [M, N]``; ``out`` optional [M, K]."""
    if not (use_w or use_lora):
        raise ValueError("sparse_lora_dx: nothing to compute (use_w and use_lora both False)")
    values, meta, a, b, n, k, r = _check_operands(values, meta, a, b, dy.dtype, dy.device)
    dy = _check("dy", dy, (dy.shape[0], n), dy.dtype, dy.device)
    m = dy.shape[0]
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device) if out is None else _check("out", out, (m, k), dy.dtype, dy.device)
    if m == 0:
        return dx
    _launch(_dx_kernel, "dx", _BWD_CONFIGS, _regime(m), dy.device,
            lambda bm, bn, bk: (triton.cdiv(k, bk), triton.cdiv(m, bm)),
            (dy, values, meta, a, b, dx, m, n, k, r, float(scaling),
             dy.stride(0), values.stride(0), meta.stride(0), a.stride(0), b.stride(0), dx.stride(0)),
            USE_W=use_w, USE_LORA=use_lora, BR=_rank_block(r), **_flags(dy.dtype))
    return dx


@on_tensor_device
def sparse_lora_dab(dy: torch.Tensor, xa: torch.Tensor, meta: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dA, dB)`` with ``G = s·((dyᵀ·xa) ⊙ M)``, ``dA = Bᵀ·G``, ``dB = G·Aᵀ`` (returned in A's dtype)."""
    _, meta, a, b, n, k, r = _check_operands(None, meta, a, b, dy.dtype, dy.device)
    dy = _check("dy", dy, (dy.shape[0], n), dy.dtype, dy.device)
    m = dy.shape[0]
    xa = _check("xa", xa, (m, k), dy.dtype, dy.device)
    da = torch.zeros(r, k, dtype=torch.float32, device=dy.device)
    db = torch.zeros(n, r, dtype=torch.float32, device=dy.device)
    if m > 0:
        # atomics accumulate into da/db: a launch that raises OutOfResources ran nothing, so the
        # retry with smaller tiles starts from the zeros
        _launch(_dab_kernel, "dab", _BWD_CONFIGS, _regime(m), dy.device,
                lambda bm, bn, bk: (triton.cdiv(k, bk), triton.cdiv(n, bn)),
                (dy, xa, meta, a, b, da, db, m, n, k, r, float(scaling),
                 dy.stride(0), xa.stride(0), meta.stride(0), a.stride(0), b.stride(0)),
                BR=_rank_block(r), **_flags(dy.dtype))
    return da.to(a.dtype), db.to(b.dtype)


# ---------------------------------------------------------------------------------------------
# PyTorch references (the CPU path and the oracle of the tests): they DO materialize N×K
# ---------------------------------------------------------------------------------------------
def _masked_update(a, b, mask, scaling):
    return (b.float() @ a.float()).mul_(scaling) * mask


def reference_fwd(x, xa, w, mask, a, b, scaling, bias=None):
    """``w`` dense [N, K] (zero outside ``mask``). Accumulates in fp32 (fp64 stays fp64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if xa is None:
        weff = ((w.to(acc) + (b.to(acc) @ a.to(acc)) * scaling) * mask).to(x.dtype)
        return torch.nn.functional.linear(x, weff, bias)
    upd = ((b.to(acc) @ a.to(acc)) * scaling * mask).to(x.dtype)
    y = torch.nn.functional.linear(x.to(acc), w.to(acc), None) + torch.nn.functional.linear(xa.to(acc), upd.to(acc), None)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def reference_dx(dy, w, mask, a, b, scaling, use_w=True, use_lora=True):
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    weff = torch.zeros(w.shape, dtype=acc, device=w.device)
    if use_w:
        weff = weff + w.to(acc)
    if use_lora:
        weff = weff + (b.to(acc) @ a.to(acc)) * scaling
    return (dy.to(acc) @ (weff * mask)).to(dy.dtype)


def reference_dab(dy, xa, mask, a, b, scaling):
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    rows = dy.shape[:-1].numel()  # explicit: reshape(-1, 0) is ambiguous for N = 0
    g = (dy.reshape(rows, dy.shape[-1]).to(acc).t() @ xa.reshape(rows, xa.shape[-1]).to(acc)) * mask * scaling
    return (b.to(acc).t() @ g).to(a.dtype), (g @ a.to(acc).t()).to(b.dtype)


# ---------------------------------------------------------------------------------------------
# ahead-of-time specs: every shipped config × dtype (tests/test_triton_aot.py compiles them)
# ---------------------------------------------------------------------------------------------
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specs() -> list[AotSpec]:
    from .aot import aligned_attrs

    def aligned(fn, sig):
        # pointers, N, K and strides are 16-divisible for aligned launches on VLM shapes; M and R
        # (tokens, rank) are not assumed
        return {"attrs": aligned_attrs(fn, [a for a, t in sig.items() if t.startswith("*") or a in ("N", "K") or a.startswith("stride")])}

    specs = []
    for dtype, ty in _TY.items():
        p = f"*{ty}"
        for regime, (bm, bn, bk, warps, stages) in _FWD_CONFIGS.items():
            # the largest rank block (BR = 64) is the worst case for registers/shared memory; the
            # rank block only changes the small B·A dot, so smaller ranks compile a subset of it
            for br, separate in ((64, False), (64, True)):
                if separate and regime != "large":
                    continue
                specs.append(AotSpec(
                    name=f"sparse_lora_fwd_{regime}_r{br}{'_sep' if separate else ''}_{ty}", fn=_fwd_kernel,
                    signature={"x_ptr": p, "xa_ptr": p, "values_ptr": p, "meta_ptr": "*i32", "a_ptr": p, "b_ptr": p,
                               "bias_ptr": p, "y_ptr": p, "M": "i32", "N": "i32", "K": "i32", "R": "i32", "scaling": "fp32",
                               "stride_xm": "i32", "stride_xam": "i32", "stride_vn": "i32", "stride_mn": "i32",
                               "stride_ar": "i32", "stride_bn": "i32", "stride_ym": "i32",
                               "HAS_BIAS": "constexpr", "SEPARATE": "constexpr", "BM": "constexpr", "BN": "constexpr",
                               "BK": "constexpr", "BR": "constexpr", "UPCAST": "constexpr", "IEEE": "constexpr"},
                    constexprs={"HAS_BIAS": True, "SEPARATE": separate, "BM": bm, "BN": bn, "BK": bk, "BR": br,
                                "UPCAST": False, "IEEE": False},
                    num_warps=warps, num_stages=stages))
        for regime, (bm, bn, bk, warps, stages) in _BWD_CONFIGS.items():
            for use_w, use_lora in ((True, True), (False, True)):
                if not use_w and regime != "large":
                    continue  # the dropout-input gradient: one config proves the variant builds
                specs.append(AotSpec(
                    name=f"sparse_lora_dx_{regime}_{'w' if use_w else ''}{'l' if use_lora else ''}_{ty}", fn=_dx_kernel,
                    signature={"dy_ptr": p, "values_ptr": p, "meta_ptr": "*i32", "a_ptr": p, "b_ptr": p, "dx_ptr": p,
                               "M": "i32", "N": "i32", "K": "i32", "R": "i32", "scaling": "fp32",
                               "stride_dym": "i32", "stride_vn": "i32", "stride_mn": "i32", "stride_ar": "i32",
                               "stride_bn": "i32", "stride_dxm": "i32",
                               "USE_W": "constexpr", "USE_LORA": "constexpr", "BM": "constexpr", "BN": "constexpr",
                               "BK": "constexpr", "BR": "constexpr", "UPCAST": "constexpr", "IEEE": "constexpr"},
                    constexprs={"USE_W": use_w, "USE_LORA": use_lora, "BM": bm, "BN": bn, "BK": bk, "BR": 64,
                                "UPCAST": False, "IEEE": False},
                    num_warps=warps, num_stages=stages))
            specs.append(AotSpec(
                name=f"sparse_lora_dab_{regime}_{ty}", fn=_dab_kernel,
                signature={"dy_ptr": p, "xa_ptr": p, "meta_ptr": "*i32", "a_ptr": p, "b_ptr": p,
                           "da_ptr": "*fp32", "db_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                           "scaling": "fp32", "stride_dym": "i32", "stride_xam": "i32", "stride_mn": "i32",
                           "stride_ar": "i32", "stride_bn": "i32",
                           "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "BR": "constexpr",
                           "UPCAST": "constexpr", "IEEE": "constexpr"},
                constexprs={"BM": bm, "BN": bn, "BK": bk, "BR": 64, "UPCAST": False, "IEEE": False},
                num_warps=warps, num_stages=stages))
    for spec in specs:
        spec.extra = aligned(spec.fn, spec.signature)
    return specs

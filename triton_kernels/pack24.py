"""Triton pack/unpack between a dense 2:4 weight and the canonical layout.

Bit-exact counterparts of :func:`sparselora.format.pack_24` / :func:`~sparselora.format.unpack_24`
(the reference, and the definition of the layout). The kernels move raw bits: floating tensors
are reinterpreted as same-width integers (fp16/bf16 -> int16, fp32 -> int32, fp64 -> int64),
so no value is ever rounded, -0.0 survives where it is kept, and the interpreter's bf16 bugs
cannot touch them.

Pack selection rule (the same as the reference): in each group of 4 the kept positions are the
nonzeros (``-0.0`` counts as zero) or the mask's Trues, filled up to two with the lowest
not-kept positions, stored ascending. Validation (2-D, K % 4, dtype, NaN/Inf, at most 2 per group,
nonzeros outside the mask) happens before the kernel with the reference checks, so errors name
the offending row and group exactly as ``pack_24`` does.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from sparselora.format import Packed24, SparsityError, check_packable, check_packed, unpack_24

from .launch_guard import on_tensor_device
from .sparse24_gemm import _expand_pairs, _load_pairs

__all__ = ["pack_24_triton", "unpack_24_triton", "aot_specs"]

_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
# bits that are zero exactly when the float is +-0.0 (everything but the sign)
_ABS = {torch.int16: 0x7FFF, torch.int32: 0x7FFFFFFF, torch.int64: 0x7FFFFFFFFFFFFFFF}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _pack24_kernel(w_ptr, mask_ptr, v_ptr, meta_ptr, N, K,
                   stride_wn, stride_maskn, stride_vn, stride_mn,
                   HAS_MASK: tl.constexpr, ABS_BITS: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One [BLOCK_R, BLOCK_C] dense tile (BLOCK_C a multiple of 32: whole meta words) ->
    its values [BLOCK_R, BLOCK_C/2] and meta words [BLOCK_R, BLOCK_C/32]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c0 = tl.program_id(1) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    inb = row_mask[:, None] & (cols[None, :] < K)
    w = tl.load(w_ptr + rows64[:, None] * stride_wn + cols[None, :], mask=inb, other=0)
    if HAS_MASK:
        keep = tl.load(mask_ptr + rows64[:, None] * stride_maskn + cols[None, :], mask=inb, other=0) != 0
    else:
        keep = (w & ABS_BITS) != 0
    G: tl.constexpr = BLOCK_C // 4
    pos = tl.arange(0, 4)[None, None, :]
    # distinct key per position: kept first, then lower columns first; the top two are kept
    key = tl.reshape(keep.to(tl.int32), (BLOCK_R, G, 4)) * 8 + (3 - pos)
    k1 = tl.max(key, axis=2)
    k2 = tl.max(tl.where(key == k1[:, :, None], -1, key), axis=2)
    p1 = 3 - (k1 & 7)
    p2 = 3 - (k2 & 7)
    lo = tl.minimum(p1, p2)
    hi = tl.maximum(p1, p2)
    w3 = tl.reshape(w, (BLOCK_R, G, 4))
    zero = tl.zeros((BLOCK_R, G, 4), dtype=w.dtype)
    v_lo = tl.reduce(tl.where(pos == lo[:, :, None], w3, zero), 2, _or)
    v_hi = tl.reduce(tl.where(pos == hi[:, :, None], w3, zero), 2, _or)
    vals = tl.reshape(tl.join(v_lo, v_hi), (BLOCK_R, BLOCK_C // 2))
    vcol = c0 // 2 + tl.arange(0, BLOCK_C // 2)
    tl.store(v_ptr + rows64[:, None] * stride_vn + vcol[None, :], vals,
             mask=row_mask[:, None] & (vcol[None, :] < K // 2))
    # padding values (past K/2 in the last word) get index j % 2, nibble 0b0100 per group: a valid
    # mma.sp encoding (0b0000 is not), bit-identical to format.pack_24
    idx = tl.reshape(tl.join(lo, hi), (BLOCK_R, BLOCK_C // 2))
    idx = tl.where(vcol[None, :] < K // 2, idx, vcol[None, :] % 2)
    shifts = 2 * tl.arange(0, 16)
    words = tl.reduce(tl.reshape(idx, (BLOCK_R, BLOCK_C // 32, 16)) << shifts[None, None, :], 2, _or)
    wcol = c0 // 32 + tl.arange(0, BLOCK_C // 32)
    tl.store(meta_ptr + rows64[:, None] * stride_mn + wcol[None, :], words,
             mask=row_mask[:, None] & (wcol[None, :] < (K + 31) // 32))


@triton.jit
def _unpack24_kernel(v_ptr, meta_ptr, w_ptr, bad_ptr, N, K, stride_vn, stride_mn, stride_wn,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Dense tile from values + meta; counts groups whose indices are not ascending into bad_ptr
    (corrupt meta) so the launcher can raise with the reference's precise message."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c0 = tl.program_id(1) * BLOCK_C
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    v0, v1, i0, i1 = _load_pairs(v_ptr, meta_ptr, rows64, row_mask, stride_vn, stride_mn, c0, K,
                                 BLOCK_R, BLOCK_C, False)
    g = c0 // 4 + tl.arange(0, BLOCK_C // 4)
    valid = row_mask[:, None] & (g[None, :] < K // 4)
    nbad = tl.sum(((i0 >= i1) & valid).to(tl.int32))
    tl.atomic_add(bad_ptr, nbad)
    dense = _expand_pairs(v0, v1, i0, i1, BLOCK_R, BLOCK_C)
    cols = c0 + tl.arange(0, BLOCK_C)
    tl.store(w_ptr + rows64[:, None] * stride_wn + cols[None, :], dense,
             mask=row_mask[:, None] & (cols[None, :] < K))


# (BLOCK_R, BLOCK_C, num_warps): one-off conversions, one config
_GPU_CFG = (32, 128, 4)
_INTERP_CFG = (16, 64, 4)


def _cfg():
    return _INTERP_CFG if _interpreting() else _GPU_CFG


@on_tensor_device
def pack_24_triton(w: torch.Tensor, mask: Optional[torch.Tensor] = None, name: Optional[str] = None) -> Packed24:
    """Triton :func:`sparselora.format.pack_24`: bit-identical values and meta."""
    check_packable(w, mask, name)  # the same checks and messages as format.pack_24
    n, k = w.shape
    if w.stride(-1) != 1:
        w = w.contiguous()
    itype = _BITS[w.dtype]
    values = torch.empty(n, k // 2, dtype=w.dtype, device=w.device)
    meta = torch.empty(n, -(-k // 32), dtype=torch.int32, device=w.device)
    if n == 0 or k == 0:
        return Packed24(values, meta, (n, k))
    wb = w.view(itype)
    if mask is not None:
        mb = mask.to(torch.bool)
        mb = (mb if mb.stride(-1) == 1 else mb.contiguous()).view(torch.int8)
    else:
        mb = wb  # never read when HAS_MASK is False
    br, bc, nw = _cfg()
    grid = (triton.cdiv(n, br), triton.cdiv(k, bc))
    _pack24_kernel[grid](wb, mb, values.view(itype), meta, n, k,
                         wb.stride(0), mb.stride(0), values.stride(0), meta.stride(0),
                         HAS_MASK=mask is not None, ABS_BITS=_ABS[itype],
                         BLOCK_R=br, BLOCK_C=bc, num_warps=nw)
    return Packed24(values, meta, (n, k))


@on_tensor_device
def unpack_24_triton(packed: Packed24) -> torch.Tensor:
    """Triton :func:`sparselora.format.unpack_24`: the bit-identical dense weight. Corrupt meta
    (a group whose indices are not ascending) raises like the reference."""
    n, k = check_packed(packed.values, packed.meta)
    values, meta = packed.values, packed.meta
    if values.dtype not in _BITS:
        raise SparsityError(f"packed values have dtype {values.dtype}; supported: {tuple(_BITS)}")
    if values.stride(-1) != 1:
        values = values.contiguous()
    if meta.stride(-1) != 1:
        meta = meta.contiguous()
    itype = _BITS[values.dtype]
    dense = torch.empty(n, k, dtype=values.dtype, device=values.device)
    if n == 0 or k == 0:
        return dense
    bad = torch.zeros(1, dtype=torch.int32, device=values.device)
    br, bc, nw = _cfg()
    grid = (triton.cdiv(n, br), triton.cdiv(k, bc))
    _unpack24_kernel[grid](values.view(itype), meta, dense.view(itype), bad, n, k,
                           values.stride(0), meta.stride(0), dense.stride(0),
                           BLOCK_R=br, BLOCK_C=bc, num_warps=nw)
    if int(bad.item()):
        unpack_24(Packed24(values, meta, (n, k)))  # raises naming the first bad row/group
        raise SparsityError("corrupt 2:4 meta: a group has indices that are not ascending")
    return dense


def aot_specs():
    """The shipped config for every bit width (fp16/bf16 share int16)."""
    from sparselora.triton_kernels.aot import AotSpec, aligned_attrs

    br, bc, nw = _GPU_CFG
    specs = []
    for ity in ("i16", "i32"):
        sig = {"w_ptr": f"*{ity}", "mask_ptr": "*i8", "v_ptr": f"*{ity}", "meta_ptr": "*i32", "N": "i32", "K": "i32",
               "stride_wn": "i32", "stride_maskn": "i32", "stride_vn": "i32", "stride_mn": "i32"}
        for has_mask in (False, True):
            const = {"HAS_MASK": has_mask, "ABS_BITS": 0x7FFF if ity == "i16" else 0x7FFFFFFF, "BLOCK_R": br, "BLOCK_C": bc}
            specs.append(AotSpec(f"pack24_{ity}_{'mask' if has_mask else 'nz'}", _pack24_kernel,
                                 {**sig, **{c: "constexpr" for c in const}}, const, num_warps=nw, num_stages=1,
                                 extra={"attrs": aligned_attrs(_pack24_kernel, [a for a in sig if a.endswith("_ptr") or a.startswith("stride")])}))
        sig = {"v_ptr": f"*{ity}", "meta_ptr": "*i32", "w_ptr": f"*{ity}", "bad_ptr": "*i32", "N": "i32", "K": "i32",
               "stride_vn": "i32", "stride_mn": "i32", "stride_wn": "i32"}
        const = {"BLOCK_R": br, "BLOCK_C": bc}
        specs.append(AotSpec(f"unpack24_{ity}", _unpack24_kernel, {**sig, **{c: "constexpr" for c in const}}, const,
                             num_warps=nw, num_stages=1,
                             extra={"attrs": aligned_attrs(_unpack24_kernel, [a for a in sig if a.endswith("_ptr") or a.startswith("stride")])}))
    return specs

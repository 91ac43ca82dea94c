"""A CPU emulator of warp-level ``mma.sp.sync.aligned.m16n8k32.row.col.f32.{bf16,f16}`` and of the
mma.sp linear kernel's data movement, for testing layouts without a GPU.

:func:`mma_sp_m16n8k32` takes the 32 lanes' registers as the PTX ISA distributes them (A: four
``.b32`` = 8 kept 16-bit values, B: 8 values, C: 4 floats, one metadata word, the sparsity
selector) and returns D. It rebuilds the dense 16x32 A from the kept values and the metadata
that the *selected* lanes supply, exactly as the ISA's fragment and metadata figures say, and
rejects the encodings the ISA calls undefined (``0b0000``, ``0b0101``, ``0b1010``, ``0b1111``).

:func:`emulate_linear` runs a whole ``x @ W.T + b`` from the GPU-layout buffers with the kernel's
index math (``csrc/sparse_mma/layout.h``, mirrored in :mod:`sparselora.gpu_layout`): per k-tile,
each lane's 16-byte value load, its metadata word and selector, x staged in swizzled shared memory
and read back through an emulated ``ldmatrix.x4``, split-K over the CTA's warps reduced in warp
order. A layout bug anywhere on that path changes the result, on the CPU. It also folds the
kernels' per-token non-finite flag in (``mma_sp.h``), so NaN/Inf in x give the kernels' outputs.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from . import gpu_layout as L

__all__ = ["mma_sp_m16n8k32", "emulate_linear", "InvalidMetadata"]

_INVALID_NIBBLES = (0b0000, 0b0101, 0b1010, 0b1111)


class InvalidMetadata(ValueError):
    """A metadata nibble the PTX ISA declares undefined behaviour."""


def _lane_ids(device):
    lane = torch.arange(32, device=device)
    return lane >> 2, lane & 3  # groupID, threadID_in_group


@lru_cache(maxsize=None)
def _fragment_index(selector: int) -> dict[str, torch.Tensor]:
    """The PTX ISA's fragment and metadata distribution for m16n8k32 .f16/.bf16 (g = lane >> 2,
    t = lane & 3), written from the ISA's text, not from layout.h."""
    g, t = _lane_ids("cpu")
    i = torch.arange(8)
    j = torch.arange(4)
    rows = torch.arange(16)
    grp = torch.arange(8)
    return {
        # A (as dense m16n8k16): row = g (+8 for a2,a3,a6,a7), compressed col = 2t + (i&1) (+8 for i >= 4)
        "a_rows": g[:, None] + ((i[None, :] >> 1) & 1) * 8,
        "a_cols": t[:, None] * 2 + (i[None, :] & 1) + (i[None, :] >> 2) * 8,
        # metadata: selector s -> lanes 4g + 2s + p supply rows g (bits 0..15) and g+8 (bits 16..31),
        # dense columns 16p..16p+15; nibble q of a half = group q of those columns
        "lane_of": 4 * (rows[:, None] % 8) + 2 * selector + grp[None, :] // 4,
        "shift": 16 * (rows[:, None] // 8) + 4 * (grp[None, :] % 4),
        # B: k = 2t + (i&1) + 8 (i>>1), n = g
        "b_k": t[:, None] * 2 + (i[None, :] & 1) + (i[None, :] >> 1) * 8,
        "b_n": g[:, None].expand(32, 8),
        # C/D: row = g (+8 for c2,c3), col = 2t + (i&1)
        "c_rows": g[:, None] + (j[None, :] >> 1) * 8,
        "c_cols": t[:, None] * 2 + (j[None, :] & 1),
    }


def mma_sp_m16n8k32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, e: torch.Tensor, selector: int) -> torch.Tensor:
    """D = A·B + C for one warp, batched over leading dims.

    a: [..., 32, 8] kept A values per lane (a0..a7), b: [..., 32, 8] (b0..b7), c: [..., 32, 4],
    e: [..., 32] metadata words (int), selector: 0 or 1. Computes in c's dtype (use float64 for
    exact checks). Returns d: [..., 32, 4] in the C/D fragment layout.
    """
    if selector not in (0, 1):
        raise ValueError(f"m16n8k32 .f16/.bf16 takes sparsity selector 0 or 1, got {selector}")
    dt = c.dtype
    batch = a.shape[:-2]
    ix = _fragment_index(selector)
    comp = torch.zeros(*batch, 16, 16, dtype=dt)
    comp[..., ix["a_rows"], ix["a_cols"]] = a.to(dt)
    words = e.to(torch.int64) & 0xFFFFFFFF
    lane_of, shift = ix["lane_of"], ix["shift"]
    nib = (words[..., lane_of] >> shift) & 0xF  # [..., 16, 8]
    bad = torch.zeros_like(nib, dtype=torch.bool)
    for v in _INVALID_NIBBLES:
        bad |= nib == v
    if bad.any():
        where = bad.nonzero()[0].tolist()
        r, q = where[-2], where[-1]
        raise InvalidMetadata(f"metadata nibble {int(nib[tuple(where)]):#06b} for row {r}, group {q} "
                              f"(from lane {int(lane_of[r, q])}, selector {selector}) is undefined for mma.sp")
    i0, i1 = nib & 3, nib >> 2
    if (i0 >= i1).any():  # ::ordered_metadata: indices ascending
        where = (i0 >= i1).nonzero()[0].tolist()
        raise InvalidMetadata(f"metadata indices not ascending at row {where[-2]}, group {where[-1]}")
    B = torch.zeros(*batch, 32, 8, dtype=dt)
    B[..., ix["b_k"], ix["b_n"]] = b.to(dt)
    # The sparse tensor core multiplies each kept A value only by the B row its metadata selects:
    # B at a pruned position is never read (an Inf there does not reach D; a dense A·B would
    # give 0·Inf = NaN, which the hardware does not). Kept value 2q+h of a row pairs with B row
    # 4q + (i0, i1)[h].
    kidx = torch.stack((i0, i1), dim=-1) + 4 * torch.arange(8).view(8, 1)  # [..., 16, 8, 2]
    kidx = kidx.reshape(*batch, 16, 16)
    bsel = torch.gather(B.unsqueeze(-3).expand(*batch, 16, 32, 8), -2, kidx.unsqueeze(-1).expand(*batch, 16, 16, 8))
    C = torch.zeros(*batch, 16, 8, dtype=dt)
    C[..., ix["c_rows"], ix["c_cols"]] = c
    D = (comp.unsqueeze(-1) * bsel).sum(-2) + C
    return D[..., ix["c_rows"], ix["c_cols"]]


@lru_cache(maxsize=None)
def _ldm_addresses(row_base: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    addr_row = row_base + torch.tensor([L.ldm_row(l) for l in range(32)])
    addr_chunk = torch.tensor([L.x_smem_chunk(int(r), j * 4 + L.ldm_matrix(l)) for l, r in zip(range(32), addr_row)])
    return addr_row, addr_chunk


def _ldmatrix_x4(smem: torch.Tensor, row_base: int, j: int) -> torch.Tensor:
    """Emulated ``ldmatrix.sync.aligned.m8n8.x4.shared.b16`` of k-tile ``j`` of a staged x block.

    smem: [..., rows, 32 chunks, 8] (swizzled). Lane l supplies the address of row ldm_row(l) of
    matrix ldm_matrix(l); register q of lane l receives row l//4, elements 2(l%4), 2(l%4)+1 of
    matrix q. Returns [..., 32, 8] (r0 lo, r0 hi, r1 lo, ...)."""
    lane = torch.arange(32)
    addr_row, addr_chunk = _ldm_addresses(row_base, j)
    mats = smem[..., addr_row, addr_chunk, :]  # [..., 32 addresses, 8 elements]
    out = []
    for q in range(4):
        rows_of_q = mats[..., 8 * q: 8 * q + 8, :]  # matrix q: its 8 row addresses
        sel = rows_of_q[..., lane // 4, :]  # [..., 32, 8]
        col = 2 * (lane % 4)
        out += [sel[..., lane, col], sel[..., lane, col + 1]]
    return torch.stack(out, dim=-1)


def emulate_linear(x: torch.Tensor, gpu: "L.GpuPacked24", bias: Optional[torch.Tensor] = None, *,
                   warps_k: int = 4, tokens_per_cta: int = 8, acc_dtype: torch.dtype = torch.float64,
                   flip_selector: bool = False, fold_nonfinite: bool = True) -> torch.Tensor:
    """``x @ W.T + bias`` computed through :func:`mma_sp_m16n8k32` with the kernel's data movement.

    x: [M, K]; returns [M, N] in ``acc_dtype``. ``warps_k``: warps of a CTA splitting K (warp w
    takes k-blocks w, w + warps_k, ...); ``tokens_per_cta``: 8 NT (NT token tiles per CTA).
    ``flip_selector`` deliberately breaks the kernel's selector choice (for the tests).

    Non-finite x (the masked-dense rule of :mod:`sparselora.ops`): like the kernels, each warp
    flags the tokens whose x fragments it loaded hold a NaN/Inf (``nonfinite_halves``) and sets
    their accumulators to NaN before the split-K sum (``nan_flagged_tokens``), so such a token
    gets NaN in every output, also when its only non-finite input sits at a pruned column.
    ``fold_nonfinite=False`` leaves the fold out (the bare ``mma.sp`` result, for the tests)."""
    n, k = gpu.shape
    m = x.shape[0]
    Mt, KT, KQ = L.gpu_layout_sizes(n, k)
    NT = tokens_per_cta // 8
    n_ctas = -(-m // tokens_per_cta)
    values, meta = gpu.values, gpu.meta
    if k % 8:
        raise ValueError(f"mma.sp linear stages x in 16-byte chunks: in_features={k} must be a multiple of 8")
    if tokens_per_cta % 8 or not 8 <= tokens_per_cta <= 64:
        raise ValueError(f"tokens_per_cta must be a multiple of 8 in 8..64, got {tokens_per_cta}")
    out = torch.empty(m, n, dtype=acc_dtype)
    # x zero-filled past M and K, as the kernel's cp.async with src-size 0 does
    xp = torch.zeros(n_ctas * tokens_per_cta, KQ * 256, dtype=x.dtype)
    xp[:m, :k] = x
    rows_t = torch.arange(tokens_per_cta)
    swz = torch.tensor([[L.x_smem_chunk(r, c) for c in range(32)] for r in range(tokens_per_cta)])
    c_tok = torch.tensor([[L.c_col(l, i) for i in range(4)] for l in range(32)])  # token (in its tile) of acc[l, i]
    for cta in range(n_ctas):  # grid.y; grid.x (row tiles) is batched
        tok0 = cta * tokens_per_cta
        acc = torch.zeros(warps_k, Mt, NT, 32, 4, dtype=acc_dtype)
        nf = torch.zeros(warps_k, NT, 32, dtype=torch.bool)  # per warp and lane: a non-finite x fragment seen
        for kq in range(KQ):
            w = kq % warps_k
            # stage x: rows = tokens, 32 chunks of 8 columns, zero-filled past M and K; swizzled
            blk = xp[tok0: tok0 + tokens_per_cta, kq * 256: (kq + 1) * 256].reshape(tokens_per_cta, 32, 8)
            smem = torch.empty_like(blk)
            smem[rows_t[:, None], swz] = blk  # chunk c of row r lands at x_smem_chunk(r, c)
            mwords = meta[:, kq]  # [Mt, 32, 4]: one 16-byte load per lane
            for jj in range(L.STAGE_KTILES):
                kt = kq * L.STAGE_KTILES + jj
                if kt >= KT:
                    break
                a = values[:, kt]  # [Mt, 32, 8]: one 16-byte load per lane
                sel = (jj & 1) ^ int(flip_selector)
                e = mwords[:, :, jj >> 1]  # word w = jj // 2 serves k-tiles 2w + s
                for nt in range(NT):
                    b = _ldmatrix_x4(smem, nt * 8, jj)  # [32, 8]
                    if fold_nonfinite:  # mma_sp.h nonfinite_halves: an all-ones exponent in the lane's b
                        nf[w, nt] |= ~torch.isfinite(b).all(-1)
                    acc[w, :, nt] = mma_sp_m16n8k32(a, b.expand(Mt, 32, 8), acc[w, :, nt], e, sel)
        if fold_nonfinite:
            # mma_sp.h nan_flagged_tokens, per warp before the split-K sum: the 4 lanes of a group
            # hold the same token (ldmatrix row lane // 4); a flagged token's accumulators become
            # NaN, so the sum over warps and the bias keep it NaN (the masked-dense rule: mma.sp
            # alone never sees x at pruned columns)
            tok_flag = nf.view(warps_k, NT, 8, 4).any(-1)  # [warps, NT, token in tile]
            flagged = tok_flag[:, :, c_tok]  # [warps, NT, 32, 4]
            acc = acc.masked_fill(flagged.unsqueeze(1), float("nan"))
        total = acc[0]
        for w in range(1, warps_k):  # the kernel's in-CTA split-K reduction order
            total = total + acc[w]
        lane = torch.arange(32)
        for nt in range(NT):
            for i in range(4):
                rows = torch.arange(Mt)[:, None] * 16 + torch.tensor([L.c_row(l, i) for l in range(32)])[None, :]
                toks = tok0 + nt * 8 + torch.tensor([L.c_col(l, i) for l in range(32)])
                ok = (rows < n) & (toks[None, :] < m)
                vals = total[:, nt, :, i]
                if bias is not None:
                    vals = vals + bias.to(acc_dtype)[rows.clamp(max=n - 1)]
                out[toks[None, :].expand_as(rows)[ok], rows[ok]] = vals[ok]
    return out

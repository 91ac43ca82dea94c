"""The GPU layout of the mma.sp kernels: a reversible reorder of the canonical 2:4 layout.

``csrc/sparse_mma/layout.h`` defines it (read its diagram first); this module builds the same
index tables in Python and uses them for the offline reorder and its exact inverse. A test
compiles the header on the host and compares its tables with :func:`lane_tables` for all 32
lanes, so the kernel, the reorder and the emulator (:mod:`sparselora.mma_sp_emulator`) cannot
drift apart.

* values ``[Mt, KT, 32, 8]``: lane ``l``'s A registers ``a0..a7`` of k-tile ``kt`` of row tile
  ``mt`` (one 16-byte load per lane per k-tile), zero-padded to ``Mt * 16`` rows and ``KT * 32``
  dense columns (``KT`` even).
* meta ``[Mt, KQ, 32, 4]`` int32: word ``w`` of lane ``l`` is its ``mma.sp`` metadata register for
  k-tile ``8 kq + 2 w + s(l)`` under selector ``s(l) = (l % 4) // 2``; padded with ``0x44444444``.

Values are a pure permutation of the (padded) canonical values; meta a pure permutation of the
canonical words' 16-bit halves. Padding is the only extra: at most 63 columns and 15 rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .format import Packed24, SparsityError, check_packed

__all__ = ["LAYOUT", "GpuPacked24", "to_gpu_layout", "from_gpu_layout", "lane_tables", "gpu_layout_sizes"]

#: Tag of this layout; a buffer carries it, and a reorder of a tagged buffer raises.
LAYOUT = "mma_sp_m16n8k32_v1"
WARP, TILE_M, TILE_N, TILE_K, TILE_KC, VALS_PER_LANE, STAGE_KTILES, K_ALIGN = 32, 16, 8, 32, 16, 8, 8, 64
PAD_META_WORD = 0x44444444


# --- the index functions of layout.h, one for one -------------------------------------------
def a_row(lane, i): return (lane >> 2) + ((i >> 1) & 1) * 8
def a_col(lane, i): return (lane & 3) * 2 + (i & 1) + (i >> 2) * 8
def b_k(lane, i): return (lane & 3) * 2 + (i & 1) + (i >> 1) * 8
def b_n(lane, i): return lane >> 2
def c_row(lane, i): return (lane >> 2) + (i >> 1) * 8
def c_col(lane, i): return (lane & 3) * 2 + (i & 1)
def meta_selector(lane): return (lane & 3) >> 1
def meta_chunk(lane): return (lane & 3) & 1
def meta_row(lane, half): return (lane >> 2) + half * 8
def meta_word_ktile(lane, w): return 2 * w + meta_selector(lane)
def x_smem_chunk(row, chunk): return chunk ^ (row & 7)
def ldm_row(lane): return lane & 7
def ldm_matrix(lane): return lane >> 3


def gpu_layout_sizes(n: int, k: int) -> tuple[int, int, int]:
    """(Mt, KT, KQ): row tiles, k-tiles (even), k-blocks of 8 k-tiles, as in layout.h."""
    mt = -(-n // TILE_M)
    kt = -(-k // K_ALIGN) * (K_ALIGN // TILE_K)
    return mt, kt, -(-kt // STAGE_KTILES)


@lru_cache(maxsize=None)
def lane_tables() -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per-lane tables (32 rows) of every index function: what the host-compiled header dumps."""
    lanes = range(WARP)
    return {
        "a_row": tuple(tuple(a_row(l, i) for i in range(8)) for l in lanes),
        "a_col": tuple(tuple(a_col(l, i) for i in range(8)) for l in lanes),
        "b_k": tuple(tuple(b_k(l, i) for i in range(8)) for l in lanes),
        "b_n": tuple(tuple(b_n(l, i) for i in range(8)) for l in lanes),
        "c_row": tuple(tuple(c_row(l, i) for i in range(4)) for l in lanes),
        "c_col": tuple(tuple(c_col(l, i) for i in range(4)) for l in lanes),
        "meta": tuple((meta_selector(l), meta_chunk(l), meta_row(l, 0), meta_row(l, 1)) for l in lanes),
        "meta_ktile": tuple(tuple(meta_word_ktile(l, w) for w in range(4)) for l in lanes),
        "ldm": tuple((ldm_row(l), ldm_matrix(l), x_smem_chunk(l, 5)) for l in lanes),
    }


@dataclass(frozen=True)
class GpuPacked24:
    """A weight in the GPU layout (see the module docstring); ``shape`` is the dense (N, K)."""

    values: torch.Tensor  # [Mt, KT, 32, 8]
    meta: torch.Tensor  # [Mt, KQ, 32, 4] int32
    shape: tuple[int, int]
    layout: str = LAYOUT

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel() * 4


def _value_index(device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.tensor(lane_tables()["a_row"], device=device)  # [32, 8]
    cols = torch.tensor(lane_tables()["a_col"], device=device)
    return rows, cols


def _half_index(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For (lane, word, half): row in tile, k-tile in stage, 16-bit chunk of the canonical word."""
    t = lane_tables()
    row = torch.tensor([[[t["meta"][l][2 + h] for h in range(2)] for _ in range(4)] for l in range(WARP)], device=device)
    ktile = torch.tensor([[[t["meta_ktile"][l][w]] * 2 for w in range(4)] for l in range(WARP)], device=device)
    chunk = torch.tensor([[[t["meta"][l][1]] * 2 for _ in range(4)] for l in range(WARP)], device=device)
    return row, ktile, chunk  # each [32, 4, 2]


def to_gpu_layout(packed: Packed24) -> GpuPacked24:
    """Reorder a canonical 16-bit :class:`Packed24` into the kernel's GPU layout (pure permutation
    plus padding). Raises on anything that is not a canonical 2-D pair, including a buffer that is
    already in the GPU layout (a second reorder would scramble it)."""
    if isinstance(packed, GpuPacked24) or getattr(packed, "layout", None) == LAYOUT:
        raise SparsityError(f"weight is already in the GPU layout {LAYOUT!r}; reorder only canonical Packed24")
    if not isinstance(packed, Packed24):
        raise TypeError(f"to_gpu_layout needs a canonical Packed24, got {type(packed).__name__}")
    n, k = check_packed(packed.values, packed.meta)
    if (n, k) != tuple(packed.shape):
        raise SparsityError(f"packed weight: values/meta describe {(n, k)} but shape says {tuple(packed.shape)}")
    if packed.values.element_size() != 2:
        raise SparsityError(f"the mma.sp GPU layout holds 16-bit values (fp16/bf16), got {packed.values.dtype}")
    dev = packed.values.device
    Mt, KT, KQ = gpu_layout_sizes(n, k)
    # values: pad to [Mt*16, KT*16] (bit views: the reorder never touches a value's bits)
    v = packed.values.view(torch.int16)
    vp = torch.zeros(Mt * TILE_M, KT * TILE_KC, dtype=torch.int16, device=dev)
    vp[:n, : k // 2] = v
    vp = vp.reshape(Mt, TILE_M, KT, TILE_KC).permute(0, 2, 1, 3)  # [Mt, KT, 16, 16]
    rows, cols = _value_index(dev)
    gv = vp[:, :, rows, cols].contiguous().view(packed.values.dtype)  # [Mt, KT, 32, 8]
    # meta: canonical words are one per (row, k-tile); split them into 16-bit halves
    words = packed.meta.to(torch.int64) & 0xFFFFFFFF
    wp = torch.full((Mt * TILE_M, KQ * STAGE_KTILES), PAD_META_WORD, dtype=torch.int64, device=dev)
    wp[:n, : words.shape[1]] = words
    halves = torch.stack([wp & 0xFFFF, wp >> 16], dim=-1)  # [rows, kt, chunk]
    halves = halves.reshape(Mt, TILE_M, KQ, STAGE_KTILES, 2).permute(0, 2, 1, 3, 4)  # [Mt, KQ, 16, 8, 2]
    row, ktile, chunk = _half_index(dev)
    h = halves[:, :, row, ktile, chunk]  # [Mt, KQ, 32, 4, 2]
    gm = h[..., 0] | (h[..., 1] << 16)
    gm = torch.where(gm >= 2**31, gm - 2**32, gm).to(torch.int32).contiguous()
    return GpuPacked24(gv, gm, (n, k))


def from_gpu_layout(gpu: GpuPacked24) -> Packed24:
    """The exact inverse of :func:`to_gpu_layout`: the canonical :class:`Packed24`, bit for bit.
    Raises if ``gpu`` is not a tagged GPU-layout buffer or its padding is not the reorder's."""
    if not isinstance(gpu, GpuPacked24) or gpu.layout != LAYOUT:
        raise SparsityError(f"from_gpu_layout needs a GpuPacked24 in layout {LAYOUT!r}, got {type(gpu).__name__}")
    n, k = gpu.shape
    Mt, KT, KQ = gpu_layout_sizes(n, k)
    if tuple(gpu.values.shape) != (Mt, KT, WARP, VALS_PER_LANE) or tuple(gpu.meta.shape) != (Mt, KQ, WARP, 4):
        raise SparsityError(
            f"GPU-layout buffers of a {n}x{k} weight must be values {(Mt, KT, WARP, VALS_PER_LANE)} and meta "
            f"{(Mt, KQ, WARP, 4)}, got {tuple(gpu.values.shape)} and {tuple(gpu.meta.shape)}")
    if gpu.meta.dtype != torch.int32:
        raise SparsityError(f"GPU-layout meta must be int32, got {gpu.meta.dtype}")
    dev = gpu.values.device
    rows, cols = _value_index(dev)
    vp = torch.empty(Mt, KT, TILE_M, TILE_KC, dtype=torch.int16, device=dev)
    vp[:, :, rows, cols] = gpu.values.view(torch.int16)
    vp = vp.permute(0, 2, 1, 3).reshape(Mt * TILE_M, KT * TILE_KC)
    values = vp[:n, : k // 2].contiguous().view(gpu.values.dtype)
    gm = gpu.meta.to(torch.int64) & 0xFFFFFFFF
    h = torch.stack([gm & 0xFFFF, gm >> 16], dim=-1)  # [Mt, KQ, 32, 4, 2]
    row, ktile, chunk = _half_index(dev)
    halves = torch.empty(Mt, KQ, TILE_M, STAGE_KTILES, 2, dtype=torch.int64, device=dev)
    halves[:, :, row, ktile, chunk] = h
    wp = halves.permute(0, 2, 1, 3, 4).reshape(Mt * TILE_M, KQ * STAGE_KTILES, 2)
    wp = wp[..., 0] | (wp[..., 1] << 16)
    nwords = -(-(k // 2) // 16)
    if (vp[n:] != 0).any() or (vp[:, k // 2:] != 0).any() or (wp[n:] != PAD_META_WORD).any() \
            or (wp[:, nwords:] != PAD_META_WORD).any():
        raise SparsityError("GPU-layout buffers have non-padding bits in their padding: not produced by to_gpu_layout")
    words = wp[:n, :nwords]
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    return Packed24(values, words, (n, k))

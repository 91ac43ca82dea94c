"""The canonical 2:4 layout of sparselora, and N:M masks in general.

This module is the one place where the packed layout is defined. Every backend layout
(Triton, cuSPARSELt, checkpoints) is derived from it.

Canonical 2:4 layout of a weight ``W`` of shape ``[N, K]`` (``N`` = out_features,
``K`` = in_features, sparsity along ``K``):

* ``K`` is split into ``K / 4`` groups of 4 consecutive columns. Each group keeps exactly
  two positions ``i0 < i1`` (in ``0..3``).
* ``values``: ``[N, K / 2]``, same dtype as ``W``. Kept value ``2g`` is ``W[n, 4g + i0]``,
  kept value ``2g + 1`` is ``W[n, 4g + i1]``. A kept position may hold 0.0 (the mask, not
  the value, decides what is kept: SparseLoRA needs that).
* ``meta``: ``[N, ceil(K / 32)]`` int32. Kept value ``j`` of a row has its 2-bit in-group
  index at bits ``2 * (j % 16)`` of ``meta[n, j // 16]``. The padding past ``K / 2`` values
  (when ``K % 32 != 0``) holds the nibble ``0b0100`` (indices 0 and 1) per padded group, a valid
  ``mma.sp`` encoding (``0b0000`` is undefined behaviour on sparse tensor cores), so a kernel may
  feed whole words to the hardware. 16 indices per word means one word covers 32 dense columns,
  which is one natural K-slice of a GPU tile, and the nibble of group ``g`` is exactly
  ``mma.sp``'s metadata for that group (low 2 bits: first kept index).

For 16-bit types the packed weight takes ``K + K/8`` bytes per row instead of ``2K``:
9/16 of the dense bytes (exactly, when ``K % 32 == 0``).

Validation and trust: packed operands are validated where they *enter* the library: the
``SparseLinear`` / ``SparseLoRALinear`` constructors, checkpoint loads, :func:`unpack_24`,
:func:`mask_from_meta` and every public op taking ``(values, meta)`` from a caller
(:func:`validate_packed`, :func:`check_meta`: shapes, dtypes, ``i0 < i1`` in every group, and at
construction/load finite values). The check is a few integer operations per 32-bit meta word (1/16
of the kept values), and the ops remember a validated meta tensor (:func:`check_meta_once`, keyed
by the tensor and its version counter), so a layer's forward does not re-check, or sync the GPU,
on every call. Kernels trust validated operands: they do not re-check indices (a corrupt group
would make them read the wrong columns). Writes that bypass the version counter
(``tensor.data.copy_(...)``) are not seen; validate again with :func:`check_meta` after them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

try:  # tensors under torch.compile tracing hold no data either
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # pragma: no cover - present in every supported torch
    def _is_fake(t):
        return False

__all__ = [
    "SparsityError",
    "Packed24",
    "nm_mask",
    "check_nm",
    "validate_24",
    "pack_24",
    "unpack_24",
    "mask_from_meta",
    "packed_nbytes",
    "check_packable",
    "check_meta",
    "check_meta_once",
    "validate_packed",
    "SUPPORTED_DTYPES",
]

#: dtypes the packed format accepts (kernels may accept fewer, see the backend registry).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_IDX_PER_WORD = 16


class SparsityError(ValueError):
    """A tensor does not have the sparsity pattern, shape or dtype an operation needs."""


@dataclass(frozen=True)
class Packed24:
    """A weight in the canonical 2:4 layout (see the module docstring)."""

    values: torch.Tensor  # [N, K/2]
    meta: torch.Tensor  # [N, ceil(K/32)] int32
    shape: tuple[int, int]  # (N, K) of the dense weight

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to_dense(self) -> torch.Tensor:
        return unpack_24(self)

    def mask(self) -> torch.Tensor:
        return mask_from_meta(self.meta, self.shape)

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel() * 4

    def to(self, *args, **kwargs) -> "Packed24":
        """Move/cast like ``Tensor.to``; the int32 meta only moves, it is never cast."""
        values = self.values.to(*args, **kwargs)
        return Packed24(values, self.meta.to(values.device), self.shape)


def _name(name: str | None) -> str:
    return f"'{name}'" if name else "tensor"


def _has_data(t: torch.Tensor) -> bool:
    """False for tensors without readable data (meta device, fake tensors of a torch.compile
    trace): value checks are skipped for them (shape checks still run), as the ops' fake kernels do."""
    return t.device.type != "meta" and not _is_fake(t)


def _check_matrix(w: torch.Tensor, m: int, name: str | None) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{_name(name)} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise SparsityError(f"{_name(name)} must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if w.shape[1] % m != 0:
        raise SparsityError(
            f"{_name(name)} has in_features={w.shape[1]}, not divisible by the group size {m}; "
            f"pad the layer or leave it dense"
        )


def check_finite(w: torch.Tensor, name: str | None = None) -> None:
    """Raise if ``w`` holds NaN or Inf, naming the first bad (row, column)."""
    if not _has_data(w):
        return
    bad = ~torch.isfinite(w)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise SparsityError(f"{_name(name)} contains NaN/Inf (first at index {tuple(idx)}): {w[tuple(idx)].item()}")


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4, name: str | None = None) -> torch.Tensor:
    """Boolean mask keeping the ``n`` highest-scoring of every ``m`` consecutive inputs.

    ``scores`` is ``[out, in]`` (e.g. ``|W|`` for magnitude, ``|W| * ||x||`` for Wanda).
    Ties break towards the lower column, so the mask is deterministic.
    """
    if not (0 < n <= m):
        raise SparsityError(f"N:M pattern needs 0 < N <= M, got {n}:{m}")
    _check_matrix(scores, m, name)
    check_finite(scores, name)
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m).to(torch.float64)
    # stable sort: equal scores keep column order, so ties go to the lower column
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(rows, cols)


def check_nm(w: torch.Tensor, n: int = 2, m: int = 4, name: str | None = None) -> None:
    """Raise :class:`SparsityError` unless every group of ``m`` inputs has at most ``n`` nonzeros
    (or, for a boolean tensor, at most ``n`` True). The message names the first bad row/group."""
    _check_matrix(w, m, name)
    if not _has_data(w):
        return
    nz = (w != 0).reshape(w.shape[0], w.shape[1] // m, m).sum(-1)
    bad = nz > n
    if bad.any():
        row, group = bad.nonzero()[0].tolist()
        raise SparsityError(
            f"{_name(name)} is not {n}:{m} sparse: row {row}, group {group} "
            f"(columns {group * m}..{group * m + m - 1}) has {int(nz[row, group])} nonzeros "
            f"({int(bad.sum())} bad groups in all)"
        )


def validate_24(w: torch.Tensor, name: str | None = None) -> None:
    """Raise unless ``w`` is a finite 2-D tensor that is 2:4 sparse along its inputs."""
    check_nm(w, 2, 4, name)
    check_finite(w, name)


def _kept_index(w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[N, K/4, 2] ascending in-group indices of the kept positions."""
    rows, cols = w.shape
    if mask is None:
        keep = w != 0
    else:
        keep = mask.to(torch.bool)
    keep = keep.reshape(rows, cols // 4, 4)
    # prefer kept positions, then the lowest columns (fills groups with < 2 nonzeros)
    pos = torch.arange(4, device=w.device)
    key = keep.to(torch.int8) * 8 + (3 - pos).to(torch.int8)
    idx = torch.topk(key, 2, dim=-1).indices
    return torch.sort(idx, dim=-1).values


def check_packable(w: torch.Tensor, mask: torch.Tensor | None = None, name: str | None = None) -> None:
    """Every check :func:`pack_24` makes before packing (shared by the Triton packer, so both
    reject the same inputs with the same messages)."""
    _check_matrix(w, 4, name)
    if w.dtype not in SUPPORTED_DTYPES:
        raise SparsityError(f"{_name(name)} has dtype {w.dtype}; supported: {SUPPORTED_DTYPES}")
    check_finite(w, name)
    if mask is not None:
        if mask.shape != w.shape:
            raise SparsityError(f"mask of {_name(name)} has shape {tuple(mask.shape)}, weight {tuple(w.shape)}")
        if mask.device != w.device:
            raise SparsityError(f"mask of {_name(name)} is on {mask.device}, weight on {w.device}")
        check_nm(mask.to(torch.bool), 2, 4, f"mask of {name}" if name else "mask")
        outside = (w != 0) & ~mask.to(torch.bool)
        if _has_data(outside) and outside.any():
            r, c = outside.nonzero()[0].tolist()
            raise SparsityError(
                f"{_name(name)} has nonzeros outside its mask (first at row {r}, column {c}); "
                f"apply the mask first (w * mask)"
            )
    else:
        check_nm(w, 2, 4, name)


def pack_24(w: torch.Tensor, mask: torch.Tensor | None = None, name: str | None = None) -> Packed24:
    """Pack a 2:4-sparse ``[N, K]`` weight into the canonical layout.

    With ``mask`` (boolean ``[N, K]``, at most 2 True per group), the kept positions are the
    mask's, and ``w`` must be zero outside it; without, the nonzeros of ``w`` are kept.
    """
    check_packable(w, mask, name)
    rows, cols = w.shape
    idx = _kept_index(w, mask)  # [N, K/4, 2]
    values = torch.gather(w.reshape(rows, cols // 4, 4), -1, idx).reshape(rows, cols // 2)
    return Packed24(values.contiguous(), _pack_indices(idx.reshape(rows, cols // 2)), (rows, cols))


def _pack_indices(idx: torch.Tensor) -> torch.Tensor:
    rows, nvals = idx.shape
    words = -(-nvals // _IDX_PER_WORD)
    # padding value j gets index j % 2: nibble 0b0100 per padded group (nvals is even)
    padded = (torch.arange(words * _IDX_PER_WORD, dtype=torch.int64, device=idx.device) % 2).repeat(rows, 1)
    padded[:, :nvals] = idx
    shifts = 2 * torch.arange(_IDX_PER_WORD, device=idx.device, dtype=torch.int64)
    word = (padded.reshape(rows, words, _IDX_PER_WORD) << shifts).sum(-1)
    # reinterpret the unsigned 32-bit word as int32 (two's complement)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32).contiguous()


def _unpack_indices(meta: torch.Tensor, nvals: int) -> torch.Tensor:
    shifts = 2 * torch.arange(_IDX_PER_WORD, device=meta.device, dtype=torch.int32)
    idx = (meta.unsqueeze(-1) >> shifts) & 3  # arithmetic shift is fine: we mask 2 bits
    # explicit width: reshape(rows, -1) is ambiguous for a layer with 0 rows
    return idx.reshape(meta.shape[0], meta.shape[1] * _IDX_PER_WORD)[:, :nvals].to(torch.int64)


def check_packed(values: torch.Tensor, meta: torch.Tensor, name: str | None = None) -> tuple[int, int]:
    """Check a (values, meta) pair is consistent; return the dense shape (N, K)."""
    if values.dim() != 2 or meta.dim() != 2:
        raise SparsityError(f"packed {_name(name)}: values and meta must be 2-D, got {tuple(values.shape)}, {tuple(meta.shape)}")
    if meta.dtype != torch.int32:
        raise SparsityError(f"packed {_name(name)}: meta must be int32, got {meta.dtype}")
    if values.device != meta.device:
        raise SparsityError(f"packed {_name(name)}: values on {values.device} but meta on {meta.device}")
    rows, half = values.shape
    if half % 2 != 0:
        raise SparsityError(f"packed {_name(name)}: values has {half} columns, must be K/2 with K % 4 == 0")
    if meta.shape != (rows, -(-half // _IDX_PER_WORD)):
        raise SparsityError(
            f"packed {_name(name)}: meta shape {tuple(meta.shape)} does not match values {tuple(values.shape)} "
            f"(expected {(rows, -(-half // _IDX_PER_WORD))})"
        )
    return rows, 2 * half


# SWAR check of the 8 groups of a meta word: group p holds i0 at bits 4p..4p+1, i1 at 4p+2..4p+3.
_I0_BITS = 0x33333333  # i0 of every group (and, shifted right by 2, i1)
_GUARD = 0x44444444  # a 1 above each 2-bit field: the subtraction below never borrows across groups
_LOW_BIT = 0x11111111  # bit 4p of every group
#: meta tensors already validated, with (version counter, K) they were validated at
_VALIDATED = WeakIdKeyDictionary()


#: meta words checked per step: the scratch is bounded (~0.6 MB), whatever the layer's size
_CHUNK_WORDS = 1 << 16


def _need(words: int, groups: int, device) -> torch.Tensor:
    """Per word, the group bits that must be set: every group, except padding in the last word."""
    need = torch.full((words,), _LOW_BIT, dtype=torch.int32, device=device)
    tail = groups - 8 * (words - 1)  # groups in the last word; the rest of it is padding
    if words and tail < 8:
        need[-1] = _LOW_BIT & ((1 << (4 * tail)) - 1)
    return need


def _bad_words_into(meta, need, a, b, out) -> None:
    """``out`` (bool, meta's shape) = the word holds a group whose indices are not ascending.
    Integer ops on the words only, written into the scratch ``a``/``b``: nothing is allocated.
    Takes numpy arrays (host) or torch tensors (devices) alike."""
    if isinstance(meta, np.ndarray):
        and_, shr, ne = np.bitwise_and, np.right_shift, np.not_equal
    else:
        and_, shr, ne = torch.bitwise_and, torch.bitwise_right_shift, torch.ne
    and_(meta, _I0_BITS, out=a)  # i0 of each group
    shr(meta, 2, out=b)  # arithmetic: the copied sign bits fall outside the mask
    b &= _I0_BITS  # i1 of each group
    b |= _GUARD
    b -= a  # per group: 4 + i1 - i0 in 1..7, >= 5 exactly when i1 > i0
    shr(b, 1, out=a)
    a |= b  # bit 4p: bit 0 or bit 1 of group p
    b >>= 2  # bit 4p: bit 2 of group p
    b &= a
    b &= need
    ne(b, need, out=out)


def _any_bad_word(meta: torch.Tensor, groups: int) -> bool:
    """Whether any word of ``meta`` holds a bad group; row chunks through fixed scratch buffers, one
    host sync at the end. Host tensors go through numpy (single-threaded: torch's threaded small
    ops crawl on a busy machine; a 1B-parameter load measured 60 s)."""
    rows, words = meta.shape
    step = max(1, _CHUNK_WORDS // words)
    size = min(step, rows) * words
    need = _need(words, groups, meta.device)
    if meta.device.type == "cpu":
        meta, need = meta.numpy(), need.numpy()
        a, b, flag = np.empty(size, np.int32), np.empty(size, np.int32), np.empty(size, np.bool_)
        bad = False
    else:
        a, b = (torch.empty(size, dtype=torch.int32, device=meta.device) for _ in range(2))
        flag = torch.empty(size, dtype=torch.bool, device=meta.device)
        bad = torch.zeros((), dtype=torch.bool, device=meta.device)
    for r0 in range(0, rows, step):
        chunk = meta[r0:r0 + step]
        n, shape = chunk.shape[0] * words, chunk.shape
        _bad_words_into(chunk, need, a[:n].reshape(shape), b[:n].reshape(shape), flag[:n].reshape(shape))
        bad = bad | flag[:n].any()
    return bool(bad)


def _version(t: torch.Tensor) -> int:
    """The version counter (bumped by in-place writes); -1 for inference tensors, which have none
    (an in-place write to one inside ``torch.inference_mode`` is not seen: validate again)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def check_meta(meta: torch.Tensor, cols: int, name: str | None = None) -> None:
    """Raise :class:`SparsityError` unless every group of the ``[N, ceil(K/32)]`` int32 ``meta`` of
    a ``K = cols``-column weight has ascending indices ``i0 < i1``; the message names the first bad
    row and group and counts them. Padding bits past ``K/2`` values are not read. Vectorised: a few
    integer operations per meta word. Tensors without data (meta device, fake) are not read."""
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int32 or meta.dim() != 2:
        what = f"{meta.dtype} {tuple(meta.shape)}" if isinstance(meta, torch.Tensor) else type(meta).__name__
        raise SparsityError(f"meta of {_name(name)} must be a 2-D int32 tensor, got {what}")
    if cols % 4 or meta.shape[1] != -(-(cols // 2) // _IDX_PER_WORD):
        raise SparsityError(f"meta of {_name(name)} has {meta.shape[1]} words per row, which does not fit "
                            f"in_features={cols} (expected {-(-(cols // 2) // _IDX_PER_WORD)}, K % 4 == 0)")
    if not _has_data(meta):
        return
    if meta.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # reading the result would sync inside a CUDA graph capture: validated before it
    groups = cols // 4
    if meta.numel() and _any_bad_word(meta, groups):
        rows = meta.shape[0]
        idx = _unpack_indices(meta, cols // 2).reshape(rows, groups, 2)
        bad = idx[..., 0] >= idx[..., 1]
        r, g = bad.nonzero()[0].tolist()
        raise SparsityError(
            f"{_name(name)}: corrupt 2:4 meta: row {r}, group {g} (columns {4 * g}..{4 * g + 3}) has indices "
            f"{idx[r, g].tolist()} (need i0 < i1; {int(bad.sum())} bad groups in all)")
    _VALIDATED[meta] = (_version(meta), cols)


def check_meta_once(meta: torch.Tensor, cols: int, name: str | None = None) -> None:
    """:func:`check_meta`, skipped for a tensor already validated at its current version: the
    per-call form for ops (a dictionary lookup instead of a pass over meta and a GPU sync)."""
    if _VALIDATED.get(meta) == (_version(meta), cols):
        return
    check_meta(meta, cols, name)


def _sum_is_finite(values: torch.Tensor, chunk: int = 1 << 20) -> bool:
    flat = values.reshape(-1)
    sums = torch.stack([c.sum(dtype=torch.float64) for c in flat.split(chunk)])
    return bool(torch.isfinite(sums.sum()))


def validate_packed(values: torch.Tensor, meta: torch.Tensor, name: str | None = None, finite: bool = True) -> tuple[int, int]:
    """Every check on a packed ``(values, meta)`` pair entering from outside: shapes and dtypes
    (:func:`check_packed`), ascending indices in every group (:func:`check_meta`) and, with
    ``finite``, no NaN/Inf among the values (the message gives the packed index and the dense
    column). Returns the dense shape ``(N, K)``."""
    rows, cols = check_packed(values, meta, name)
    check_meta_once(meta, cols, name)
    # a float64 sum is finite exactly when every value is (no overflow below float64); summed in
    # 1M-element chunks because sum(dtype=float64) first converts its whole input (a values-sized
    # float copy per layer: on a 1B load those temporaries fragmented the heap, +0.25x the checkpoint);
    # one sync for all chunks. Only a non-finite sum pays for locating the first bad value
    if finite and _has_data(values) and values.numel() and not _sum_is_finite(values):
        bad = ~torch.isfinite(values)
        if bad.any():
            r, j = bad.nonzero()[0].tolist()
            col = 4 * (j // 2) + int(_unpack_indices(meta[r:r + 1], cols // 2)[0, j])
            raise SparsityError(f"{_name(name)}: packed values contain NaN/Inf: values[{r}, {j}] = "
                                f"{values[r, j].item()} (weight row {r}, column {col}; {int(bad.sum())} in all)")
    return rows, cols


def unpack_24(packed: Packed24) -> torch.Tensor:
    """Dense ``[N, K]`` weight from the canonical layout: the bit-exact inverse of :func:`pack_24`
    (pruned positions come back as +0.0, also where they held -0.0)."""
    rows, cols = check_packed(packed.values, packed.meta)
    check_meta_once(packed.meta, cols)
    idx = _unpack_indices(packed.meta, cols // 2).reshape(rows, cols // 4, 2)
    dense = torch.zeros(rows, cols // 4, 4, dtype=packed.values.dtype, device=packed.values.device)
    dense.scatter_(-1, idx, packed.values.reshape(rows, cols // 4, 2))
    return dense.reshape(rows, cols)


def mask_from_meta(meta: torch.Tensor, shape: tuple[int, int], name: str | None = None) -> torch.Tensor:
    """Boolean ``[N, K]`` mask of the kept positions (exactly 2 per group; corrupt meta raises)."""
    rows, cols = shape
    if meta.dim() != 2 or meta.shape[0] != rows:
        raise SparsityError(f"meta of {_name(name)} has shape {tuple(meta.shape)}, expected {rows} rows for a {rows}x{cols} weight")
    check_meta_once(meta, cols, name)
    idx = _unpack_indices(meta, cols // 2).reshape(rows, cols // 4, 2)
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=meta.device)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def packed_nbytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes of a packed ``[rows, cols]`` weight: values plus meta."""
    elt = torch.empty((), dtype=dtype).element_size()
    return rows * (cols // 2) * elt + rows * (-(-(cols // 2) // _IDX_PER_WORD)) * 4

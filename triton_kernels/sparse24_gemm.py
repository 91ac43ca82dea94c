"""Triton 2:4 sparse GEMMs on the canonical layout (see :mod:`sparselora.format`).

* ``sparse24_linear_triton(x, values, meta, bias)``: ``y = x @ W.T + bias``  ([M, K] -> [M, N])
* ``sparse24_matmul_t_triton(dy, values, meta)``:   ``dx = dy @ W``         ([M, N] -> [M, K])

How the kernels work
--------------------
Each program loads a tile of kept values ``[R, C/2]`` and the int32 meta words ``[R, C/32]``
that describe it, expands them in registers to the dense ``[R, C]`` tile (one ``tl.where`` per
candidate position of each group of 4), and feeds that to ``tl.dot`` with fp32 accumulation.
The weight is read from memory in packed form only: 9/16 of the dense bytes for 16-bit types,
which is the whole point at small M, where a linear layer is bound by streaming its weight.

Roles are swapped with respect to a textbook GEMM: the weight tile is the *left* operand and the
program computes the transposed output tile ``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile.T``. At
decode (M <= 16) the token count is the small ``tl.dot`` dimension (16, the minimum) while the
weight rows fill the large one, and on sm_90 the register-resident expanded weight can be the
``wgmma`` A operand without a trip through shared memory.

Small M: split-K. With few output tiles the grid would leave most SMs idle, so the K loop is
split over a second grid axis; each split adds its fp32 partial into a zeroed fp32 workspace
(relaxed atomics, i.e. the summation order, and so the last bits, may vary run to run), and a
small kernel adds the bias and casts. Large M: one program per output tile, bias and cast fused.

Under ``TRITON_INTERPRET=1`` (CPU tests) the bf16 operands are upcast to fp32 before any register
arithmetic (the interpreter's bf16 dot/arithmetic is broken), and a single small config is used.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from sparselora.format import SparsityError, check_meta_once, check_packed
from sparselora.ops import check_linear_inputs

from . import launch_guard
from .launch_guard import on_tensor_device

__all__ = ["sparse24_linear_triton", "sparse24_matmul_t_triton", "KERNEL_DTYPES", "aot_specs"]

#: dtypes the kernels take (fp32 is exact-ish via IEEE dot and exists for tests; the backend
#: advertises fp16/bf16 only).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: at or below this many rows of x the split-K path is used (the memory-bound regime).
SPLIT_MAX_M = 64
#: upper bound of K splits (more only adds atomic traffic).
MAX_SPLITS = 32


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_pairs(v_ptr, meta_ptr, rows, row_mask, stride_vn, stride_mn, k0, K,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """Kept values and in-group indices of W's rows ``rows``, dense columns ``k0 .. k0+BLOCK_C``:
    four ``[BLOCK_R, BLOCK_C/4]`` tensors (v0, v1, i0, i1), one entry per group of 4.

    ``k0`` and ``BLOCK_C`` are multiples of 32, so the tile covers whole meta words. Groups past
    ``K`` (and masked rows) load values 0 (and indices 0), so they expand to zeros.
    """
    HALF: tl.constexpr = BLOCK_C // 2
    WORDS: tl.constexpr = BLOCK_C // 32
    vcol = k0 // 2 + tl.arange(0, HALF)
    vals = tl.load(v_ptr + rows[:, None] * stride_vn + vcol[None, :],
                   mask=row_mask[:, None] & (vcol[None, :] < K // 2), other=0)
    if UPCAST:
        vals = vals.to(tl.float32)
    wcol = k0 // 32 + tl.arange(0, WORDS)
    words = tl.load(meta_ptr + rows[:, None] * stride_mn + wcol[None, :],
                    mask=row_mask[:, None] & (wcol[None, :] < (K + 31) // 32), other=0)
    # word w holds the 2-bit indices of values 16w .. 16w+15 at bits 0, 2, .., 30
    shifts = 2 * tl.arange(0, 16)
    idx = (words[:, :, None] >> shifts[None, None, :]) & 3  # arithmetic shift: masked to 2 bits
    i0, i1 = tl.split(tl.reshape(idx, (BLOCK_R, BLOCK_C // 4, 2)))
    v0, v1 = tl.split(tl.reshape(vals, (BLOCK_R, BLOCK_C // 4, 2)))
    return v0, v1, i0, i1


@triton.jit
def _expand_pairs(v0, v1, i0, i1, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Dense ``[BLOCK_R, BLOCK_C]`` tile: position p of group g holds v0 if p == i0, v1 if
    p == i1, else zero (of the values' own type, so this also moves raw integer bits)."""
    pos = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros((BLOCK_R, BLOCK_C // 4, 4), dtype=v0.dtype)
    dense = tl.where(pos == i0[:, :, None], v0[:, :, None], tl.where(pos == i1[:, :, None], v1[:, :, None], zero))
    return tl.reshape(dense, (BLOCK_R, BLOCK_C))


@triton.jit
def _dense_tile(v_ptr, meta_ptr, rows, row_mask, stride_vn, stride_mn, k0, K,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """Dense ``[BLOCK_R, BLOCK_C]`` tile of W (rows ``rows``, columns ``k0 .. k0+BLOCK_C``)."""
    v0, v1, i0, i1 = _load_pairs(v_ptr, meta_ptr, rows, row_mask, stride_vn, stride_mn, k0, K, BLOCK_R, BLOCK_C, UPCAST)
    return _expand_pairs(v0, v1, i0, i1, BLOCK_R, BLOCK_C)


@triton.jit
def _tile_ids(pid, num_a, num_b, GROUP_A: tl.constexpr):
    """Grouped launch order: GROUP_A consecutive tiles along `a` share each tile along `b`,
    so the weight tiles of a group stay in L2 while the token tiles go by."""
    width = GROUP_A * num_b
    group = pid // width
    first_a = group * GROUP_A
    size = tl.minimum(num_a - first_a, GROUP_A)
    pid_a = first_a + (pid % width) % size
    pid_b = (pid % width) // size
    return pid_a, pid_b


@triton.jit
def _store_output_tile(out, acc, out_mask, b_ptr, offs_n, n_mask, HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr):
    """Epilogue of the forward kernels (the GEMM's and the GEMV's), acc[BLOCK_N, BLOCK_M] holding
    the output transposed: fp32 atomics into the split-K workspace, or bias + cast + store
    (after a split, ``_finalize`` adds the bias and casts)."""
    if SPLIT_OUT:
        tl.atomic_add(out, acc, mask=out_mask, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None]
        tl.store(out, acc.to(out.dtype.element_ty), mask=out_mask)


@triton.jit
def _sparse24_linear_kernel(
    x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr,
    M, N, K, M_KEY,
    stride_xm, stride_vn, stride_mn, stride_ym,
    HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """y[M, N] = x[M, K] @ W[N, K].T; axis 1 of the grid splits K (SPLIT_OUT: fp32 atomics into
    y_ptr, a zeroed workspace; else y_ptr is the output, bias and cast fused)."""
    pid_n, pid_m = _tile_ids(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_iters = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_iters, tl.num_programs(1))
    start = tl.program_id(1) * per_split
    end = tl.minimum(start + per_split, k_iters)

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(start, end):
        k0 = it * BLOCK_K
        w = _dense_tile(v_ptr, meta_ptr, w_rows, n_mask, stride_vn, stride_mn, k0, K, BLOCK_N, BLOCK_K, UPCAST)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0)
        if UPCAST:
            xt = xt.to(tl.float32)
        if IEEE:
            acc = tl.dot(w, tl.trans(xt), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(xt), acc)

    out = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    _store_output_tile(out, acc, out_mask, b_ptr, offs_n, n_mask, HAS_BIAS, SPLIT_OUT)


@triton.jit
def _sparse24_matmul_t_kernel(
    dy_ptr, v_ptr, meta_ptr, dx_ptr,
    M, N, K, M_KEY,
    stride_dym, stride_vn, stride_mn, stride_dxm,
    SPLIT_OUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
):
    """dx[M, K] = dy[M, N] @ W[N, K]; the reduction runs over N (BLOCK_N), grid axis 1 splits it.
    The output tile is computed transposed, acc[BLOCK_K, BLOCK_M], like the forward."""
    pid_k, pid_m = _tile_ids(tl.program_id(0), tl.cdiv(K, BLOCK_K), tl.cdiv(M, BLOCK_M), GROUP_K)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_mask = offs_k < K
    m_mask = offs_m < M
    n_iters = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_iters, tl.num_programs(1))
    start = tl.program_id(1) * per_split
    end = tl.minimum(start + per_split, n_iters)

    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for it in range(start, end):
        offs_n = it * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w = _dense_tile(v_ptr, meta_ptr, offs_n.to(tl.int64), n_mask, stride_vn, stride_mn,
                        pid_k * BLOCK_K, K, BLOCK_N, BLOCK_K, UPCAST)  # [BLOCK_N, BLOCK_K]
        g = tl.load(dy_rows + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0)
        if UPCAST:
            g = g.to(tl.float32)
        if IEEE:
            acc = tl.dot(tl.trans(w), tl.trans(g), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(w), tl.trans(g), acc)

    out = dx_ptr + offs_m.to(tl.int64)[None, :] * stride_dxm + offs_k[:, None]
    out_mask = k_mask[:, None] & m_mask[None, :]
    if SPLIT_OUT:
        tl.atomic_add(out, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _finalize_kernel(ws_ptr, b_ptr, y_ptr, total, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = (ws + bias).to(y.dtype) over contiguous [M, N] buffers (end of the split-K path)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.load(ws_ptr + offs, mask=mask, other=0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The expanded weight tile lives in
# registers, so it is kept to <= 16K elements per 4 warps (64 per thread) to avoid spills.
# forward: BLOCK_N = weight rows (output features), BLOCK_K = reduction
_LINEAR_SPLIT = [
    (16, 64, 256, 4, 3),
    (16, 128, 128, 4, 4),
    (16, 128, 256, 8, 3),
    (32, 128, 128, 4, 3),
    (64, 64, 128, 4, 3),
    (64, 128, 128, 8, 3),
]
_LINEAR_DIRECT = [
    (16, 64, 256, 4, 3),  # small M on wide layers (enough output tiles without splitting)
    (16, 128, 128, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
]
# transposed: BLOCK_N = reduction (weight rows), BLOCK_K = output columns (input features)
_MATMUL_T_SPLIT = [
    (16, 128, 64, 4, 3),
    (16, 64, 128, 4, 3),
    (64, 64, 128, 4, 3),
]
_MATMUL_T_DIRECT = [
    (16, 64, 128, 4, 3),
    (64, 64, 128, 4, 4),
    (128, 64, 128, 8, 3),
    (128, 128, 128, 8, 3),
]
# under the interpreter: one small config per path (multi-config autotune fails there)
_INTERP = {
    ("linear", True): (16, 32, 64, 4, 1),
    ("linear", False): (32, 32, 32, 4, 1),
    ("matmul_t", True): (16, 32, 32, 4, 1),
    ("matmul_t", False): (32, 32, 64, 4, 1),
}
_GPU = {
    ("linear", True): _LINEAR_SPLIT,
    ("linear", False): _LINEAR_DIRECT,
    ("matmul_t", True): _MATMUL_T_SPLIT,
    ("matmul_t", False): _MATMUL_T_DIRECT,
}
# sm_8x (mma.sync: accumulators and the expanded weight tile share the register file) spills
# on these configs; cuobjdump/ptxas on the AOT build show it (benchmarks/results/triton_static.md,
# regenerated by `python -m sparselora.triton_kernels.aot --report ...`). The replacements were
# found the same way and spill nothing with triton 3.6 (the GPU machine's) nor 3.7 (CI's); sm_90
# (wgmma) keeps the originals, which do not spill.
_SM80_REPLACE = {
    ("linear", (128, 256, 64, 8, 3)): (128, 256, 32, 8, 3),  # 176 B spilled
    ("linear", (256, 128, 64, 8, 3)): (256, 128, 32, 8, 3),  # 40 B
    ("matmul_t", (16, 128, 64, 4, 3)): (16, 128, 64, 8, 3),  # 8 B (capped at 96 registers)
    ("matmul_t", (16, 64, 128, 4, 3)): (16, 64, 64, 8, 3),  # 16-24 B (16x64x128 at 8 warps: 8 B with triton 3.6)
}
_GROUP = 8


def gpu_table(kind: str, split: bool, arch: int) -> list[tuple]:
    """The shipped (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) list of one path for ``sm_<arch>``."""
    table = _GPU[(kind, split)]
    if arch < 90:
        table = [_SM80_REPLACE.get((kind, c), c) for c in table]
    return table


@functools.lru_cache(maxsize=None)
def _arch_of(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _arch(device: torch.device) -> int:
    # cached per device: this runs on every launch, and decode launches take microseconds
    if device.type != "cuda":
        return 90  # interpreter: the table is _INTERP anyway
    return _arch_of(device.index if device.index is not None else torch.cuda.current_device())


def _configs(kind: str, split: bool, arch: int) -> list[triton.Config]:
    table = [_INTERP[(kind, split)]] if _interpreting() else gpu_table(kind, split, arch)
    group = "GROUP_N" if kind == "linear" else "GROUP_K"
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, group: _GROUP}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in table
    ]


def _prune_by_m(configs, nargs, **kwargs):
    # a token tile much larger than M only multiplies wasted MMA work; keep the tiles that fit
    m = nargs["M"]
    fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    if fit:
        return fit
    smallest = min(c.kwargs["BLOCK_M"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_M"] == smallest]


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, split: bool, arch: int):
    """The autotuned launcher of one kernel, path and GPU architecture (built lazily: the config
    set depends on the architecture and on whether the interpreter is on)."""
    fn = _sparse24_linear_kernel if kind == "linear" else _sparse24_matmul_t_kernel
    out = "y_ptr" if kind == "linear" else "dx_ptr"
    return triton.autotune(
        configs=_configs(kind, split, arch),
        key=["M_KEY", "N", "K"],
        prune_configs_by={"early_config_prune": _prune_by_m},
        # the split path accumulates into its output: benchmark runs must start from zero
        reset_to_zero=[out] if split else None,
    )(fn)


# Autotune keys that were tuned outside any CUDA-graph capture: (kind, split, device index,
# M_KEY, N, K, dtype). Autotuning times configs with host syncs, which a capture forbids.
_TUNED: set = set()
_log = logging.getLogger("sparselora.triton")


def _launch_tuned(kind: str, split: bool, device: torch.device, mnk: tuple, grid, *args, **kwargs) -> None:
    """``_tuned(kind, split, arch)[grid](*args, **kwargs)``, safe inside a CUDA-graph capture.

    A key first seen during a capture cannot be autotuned there: this capture gets the first
    config that fits M, launched directly, and the autotuner's cache is left untouched, so the
    first call outside a capture still tunes (a capture-time default is never remembered as the
    tuned choice). Warm every M bucket up before capturing to capture the tuned config."""
    tuner = _tuned(kind, split, _arch(device))
    m, n, k = mnk
    key = (kind, split, device.index, _m_key(m), n, k, args[0].dtype)
    if key in _TUNED or not launch_guard.capturing():
        tuner[grid](*args, **kwargs)
        _TUNED.add(key)
        return
    cfg = _prune_by_m(tuner.configs, {"M": m})[0]
    _log.warning("sparselora: Triton %s kernel: M=%d (N=%d, K=%d) first seen inside a CUDA-graph capture, where "
                 "autotuning cannot run; this capture uses an untuned config. Run the layer once with this M "
                 "before capturing.", kind, m, n, k)
    tuner.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a tiny "GPU", so small test shapes still take the split path
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _num_splits(tiles: int, iters: int, requested: Optional[int], sms: int) -> int:
    """Splits of the reduction loop: enough programs for ~2 waves unless requested; never an
    empty split (each split gets cdiv(iters, splits) iterations, the last maybe fewer)."""
    if requested is None:
        want = -(-2 * sms // max(tiles, 1))
        requested = min(want, MAX_SPLITS)
    s = max(1, min(requested, iters))
    per = -(-iters // s)
    return -(-iters // per)


def _use_split(m: int, out_features: int, sms: int) -> bool:
    """Split the reduction only in the memory-bound regime (small M) and only when even
    128-wide output tiles would leave SMs idle; otherwise one launch, no fp32 workspace."""
    return m <= SPLIT_MAX_M and triton.cdiv(out_features, 128) * triton.cdiv(m, 64) < sms


def _m_key(m: int) -> int:
    # autotune once per power-of-two bucket of M, not per M
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _check_kernel_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise SparsityError(f"{name}: dtype {t.dtype} not supported by the Triton kernels (supported: {KERNEL_DTYPES})")


def _check_split_k(split_k, name: str) -> None:
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"{name}: split_k must be None or an int >= 1, got {split_k!r}")


def _check_forward_inputs(x, values, meta, bias, split_k, name: str) -> tuple[int, int]:
    """The input checks every Triton forward launcher (GEMM, GEMV) shares; returns (N, K)."""
    n, k = check_linear_inputs(x, values, meta, bias, name)
    _check_kernel_dtype(x, name)
    if bias is not None and bias.dtype != x.dtype:
        raise SparsityError(f"{name}: bias dtype {bias.dtype} != input dtype {x.dtype}")
    _check_split_k(split_k, name)
    return n, k


def _rows(t: torch.Tensor, feat: int) -> torch.Tensor:
    t2 = t.reshape(math.prod(t.shape[:-1]), feat)
    # a unit inner stride lets Triton use wide vector loads; other strides are copied once
    return t2 if t2.stride(-1) == 1 or t2.shape[0] == 0 else t2.contiguous()


def _packed_rows(values: torch.Tensor, meta: torch.Tensor):
    if values.stride(-1) != 1:
        values = values.contiguous()
    if meta.stride(-1) != 1:
        meta = meta.contiguous()
    return values, meta


def _out_buffer(out: Optional[torch.Tensor], shape: tuple, like: torch.Tensor, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise SparsityError(f"{name}: out must be a contiguous {list(shape)} {like.dtype} tensor on {like.device}, "
                            f"got {list(out.shape)} {out.dtype} on {out.device} (contiguous={out.is_contiguous()})")
    return out


def _finalize(ws: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor) -> None:
    total, n = ws.numel(), ws.shape[1]
    block = 1024
    _finalize_kernel[(triton.cdiv(total, block),)](
        ws, bias if bias is not None else ws, y, total, n, HAS_BIAS=bias is not None, BLOCK=block)


def _no_kernel_output(y: torch.Tensor, lead: tuple, k: int, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The result of ``y = x @ W.T + bias`` when no kernel needs to run (no rows, no output
    features, or K == 0: bias only); None otherwise. ``y`` is the [M, N] output buffer."""
    m, n = y.shape
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    if k == 0:
        y.zero_()
        if bias is not None:
            y += bias
        return y.reshape(*lead, n)
    return None


@on_tensor_device
def sparse24_linear_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                           bias: Optional[torch.Tensor] = None, *, split_k: Optional[int] = None,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` in the canonical 2:4 layout ``(values, meta)``.

    ``x``: ``[..., K]`` (any strides), fp16/bf16/fp32 like ``values``; returns ``[..., N]`` in
    that dtype. ``split_k``: None picks the path (split-K when ``M <= SPLIT_MAX_M`` and the
    output tiles alone would not fill the GPU), 1 forces the direct path, ``s > 1`` the split path with at most ``s`` splits. ``out``: optional
    contiguous ``[M, N]`` result buffer (M = rows of ``x``), every element of which is written.
    """
    name = "sparse24_linear (triton)"
    n, k = _check_forward_inputs(x, values, meta, bias, split_k, name)
    lead = x.shape[:-1]
    x2 = _rows(x, k)
    values, meta = _packed_rows(values, meta)
    m = x2.shape[0]
    y = _out_buffer(out, (m, n), x, name)
    trivial = _no_kernel_output(y, lead, k, bias)
    if trivial is not None:
        return trivial

    sms = _sm_count(x.device)
    split = _use_split(m, n, sms) if split_k is None else split_k > 1
    upcast = _interpreting() and x.dtype == torch.bfloat16
    ieee = x.dtype == torch.float32
    dummy_bias = bias if bias is not None else values  # never read when HAS_BIAS is False
    if split:
        ws = torch.zeros(m, n, dtype=torch.float32, device=x.device)

        def grid(meta_):
            tiles = triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"])
            return (tiles, _num_splits(tiles, triton.cdiv(k, meta_["BLOCK_K"]), split_k, sms))

        _launch_tuned("linear", True, x.device, (m, n, k), grid,
            x2, values, meta, dummy_bias, ws, m, n, k, _m_key(m),
            x2.stride(0), values.stride(0), meta.stride(0), ws.stride(0),
            HAS_BIAS=False, SPLIT_OUT=True, UPCAST=upcast, IEEE=ieee)
        _finalize(ws, bias, y)
    else:
        def grid(meta_):
            return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]), 1)

        _launch_tuned("linear", False, x.device, (m, n, k), grid,
            x2, values, meta, dummy_bias, y, m, n, k, _m_key(m),
            x2.stride(0), values.stride(0), meta.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, SPLIT_OUT=False, UPCAST=upcast, IEEE=ieee)
    return y.reshape(*lead, n)


@on_tensor_device
def sparse24_matmul_t_triton(dy: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                             *, split_k: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dy @ W`` (``[..., N] -> [..., K]``): the gradient of a 2:4 linear w.r.t. its input.
    ``split_k`` as in :func:`sparse24_linear_triton` (here the reduction runs over N)."""
    name = "sparse24_matmul_t (triton)"
    n, k = check_packed(values, meta, name)
    check_meta_once(meta, k, name)
    if not isinstance(dy, torch.Tensor):
        raise TypeError(f"{name}: dy must be a torch.Tensor, got {type(dy).__name__}")
    if dy.shape[-1] != n:
        raise SparsityError(f"{name}: dy has {dy.shape[-1]} features, weight has out_features={n}")
    if dy.device != values.device:
        raise SparsityError(f"{name}: dy on {dy.device}, weight on {values.device}")
    if dy.dtype != values.dtype:
        raise SparsityError(f"{name}: dy dtype {dy.dtype} != weight dtype {values.dtype}")
    _check_kernel_dtype(dy, name)
    _check_split_k(split_k, name)
    lead = dy.shape[:-1]
    g2 = _rows(dy, n)
    values, meta = _packed_rows(values, meta)
    m = g2.shape[0]
    dx = _out_buffer(out, (m, k), dy, name)
    if m == 0 or k == 0:
        return dx.reshape(*lead, k)
    if n == 0:
        return dx.zero_().reshape(*lead, k)

    sms = _sm_count(dy.device)
    split = _use_split(m, k, sms) if split_k is None else split_k > 1
    upcast = _interpreting() and dy.dtype == torch.bfloat16
    ieee = dy.dtype == torch.float32
    acc = torch.zeros(m, k, dtype=torch.float32, device=dy.device) if split else dx

    def grid(meta_):
        tiles = triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(k, meta_["BLOCK_K"])
        splits = _num_splits(tiles, triton.cdiv(n, meta_["BLOCK_N"]), split_k, sms) if split else 1
        return (tiles, splits)

    _launch_tuned("matmul_t", split, dy.device, (m, n, k), grid,
        g2, values, meta, acc, m, n, k, _m_key(m),
        g2.stride(0), values.stride(0), meta.stride(0), acc.stride(0),
        SPLIT_OUT=split, UPCAST=upcast, IEEE=ieee)
    if split:
        _finalize(acc, None, dx)
    return dx.reshape(*lead, k)


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile specs (tests/test_triton_aot.py)
# ----------------------------------------------------------------------------------------------
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specs():
    """Every shipped GPU config x dtype of both GEMMs (and the finalize kernel)."""
    from sparselora.triton_kernels.aot import AotSpec, aligned_attrs

    def per_arch(kind, split):
        # each config with the architectures that ship it (sm_80 replaces some, see _SM80_REPLACE)
        archs: dict[tuple, tuple] = {}
        for arch in (80, 90):
            for c in gpu_table(kind, split, arch):
                archs[c] = archs.get(c, ()) + (arch,)
        return archs.items()

    specs = []
    for dt, ty in _TY.items():
        for split in (True, False):
            out_ty = "*fp32" if split else f"*{ty}"
            for (bm, bn, bk, w, s), archs in per_arch("linear", split):
                sig = {"x_ptr": f"*{ty}", "v_ptr": f"*{ty}", "meta_ptr": "*i32", "b_ptr": f"*{ty}", "y_ptr": out_ty,
                       "M": "i32", "N": "i32", "K": "i32", "M_KEY": "i32",
                       "stride_xm": "i32", "stride_vn": "i32", "stride_mn": "i32", "stride_ym": "i32"}
                const = {"HAS_BIAS": not split, "SPLIT_OUT": split, "UPCAST": False, "IEEE": False,
                         "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_N": _GROUP}
                sig.update({c: "constexpr" for c in const})
                attrs = aligned_attrs(_sparse24_linear_kernel, ["x_ptr", "v_ptr", "meta_ptr", "b_ptr", "y_ptr", "N", "K",
                                                           "stride_xm", "stride_vn", "stride_mn", "stride_ym"])
                specs.append(AotSpec(f"linear_{'split' if split else 'direct'}_{ty}_m{bm}n{bn}k{bk}w{w}s{s}",
                                     _sparse24_linear_kernel, sig, const, num_warps=w, num_stages=s, archs=archs,
                                     extra={"attrs": attrs}))
            for (bm, bn, bk, w, s), archs in per_arch("matmul_t", split):
                sig = {"dy_ptr": f"*{ty}", "v_ptr": f"*{ty}", "meta_ptr": "*i32", "dx_ptr": out_ty,
                       "M": "i32", "N": "i32", "K": "i32", "M_KEY": "i32",
                       "stride_dym": "i32", "stride_vn": "i32", "stride_mn": "i32", "stride_dxm": "i32"}
                const = {"SPLIT_OUT": split, "UPCAST": False, "IEEE": False,
                         "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_K": _GROUP}
                sig.update({c: "constexpr" for c in const})
                attrs = aligned_attrs(_sparse24_matmul_t_kernel, ["dy_ptr", "v_ptr", "meta_ptr", "dx_ptr", "N", "K",
                                                             "stride_dym", "stride_vn", "stride_mn", "stride_dxm"])
                specs.append(AotSpec(f"matmul_t_{'split' if split else 'direct'}_{ty}_m{bm}n{bn}k{bk}w{w}s{s}",
                                     _sparse24_matmul_t_kernel, sig, const, num_warps=w, num_stages=s, archs=archs,
                                     extra={"attrs": attrs}))
        sig = {"ws_ptr": "*fp32", "b_ptr": f"*{ty}", "y_ptr": f"*{ty}", "total": "i32", "N": "i32",
               "HAS_BIAS": "constexpr", "BLOCK": "constexpr"}
        specs.append(AotSpec(f"finalize_{ty}", _finalize_kernel, sig, {"HAS_BIAS": True, "BLOCK": 1024}, num_warps=4, num_stages=1,
                             extra={"attrs": aligned_attrs(_finalize_kernel, ["ws_ptr", "b_ptr", "y_ptr"])}))
    return specs

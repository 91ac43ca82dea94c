"""Triton 2:4 decode kernel (v2 candidate): ``y = x @ W.T + bias`` for 1 <= M <= 16 rows of x,
reading the canonical layout (:mod:`sparselora.format`) without ever building a dense tile.

Why a second kernel
-------------------
At decode a linear layer is bound by streaming its weight; the packed weight is 9/16 of the dense
bytes, so the limit over dense cuBLAS is ~1.78x. The v1 kernel (``sparse24_gemm.py``) expands each
packed tile to a dense ``[BLOCK_N, BLOCK_K]`` tile (several selects per element, a register ->
shared -> register trip before the MMA) and runs ``tl.dot`` with the token count padded to 16.
At M <= 16 the MMA buys nothing; the expansion is pure overhead on the critical path.

How this kernel works
---------------------
Each program owns ``BLOCK_N`` output rows (features) and, with split-K, a contiguous slice of the
reduction. Per iteration it loads, with wide contiguous loads,

* the kept values ``[BLOCK_N, BLOCK_KV]`` (``BLOCK_KV`` kept values = ``2 * BLOCK_KV`` dense
  columns) and
* the meta words ``[BLOCK_N, BLOCK_KV / 16]`` describing them,

decodes the 2-bit index of kept value ``j`` (bits ``2 * (j % 16)`` of word ``j // 16``), computes
its dense column ``4 * (j // 2) + idx`` and **gathers x at those columns** (x is a few KB, so the
gathers hit L1/L2), multiplies in fp32 and reduces along the kept-value axis with ``tl.sum``. No
``tl.dot``, no dense tile, every weight byte is read exactly once: the loop over the M tokens is a
compile-time-unrolled loop *inside* the program, reusing the loaded weight registers for every token.

Split-K: with few row blocks (``N / BLOCK_N`` programs well short of two waves) the reduction is
split over grid axis 1; each split atomically adds its fp32 partial into a zeroed fp32 workspace
and v1's finalize kernel adds the bias and casts (relaxed atomics: summation order, and so the
last bits, may vary run to run). Without a split the bias and the cast are fused into the store.

Under ``TRITON_INTERPRET=1`` (CPU tests) one small config is used and every operand is upcast to
fp32 right after its load (the interpreter's bf16 register arithmetic is broken; on a GPU the
upcast is what we want anyway: fp32 products and accumulation).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

# one definition of the shared launch helpers (input checks, output buffer rules, finalize
# kernel): both kernel families must behave identically at their API boundary
from sparselora.triton_kernels.launch_guard import on_tensor_device
from sparselora.triton_kernels.sparse24_gemm import (
    KERNEL_DTYPES,
    _check_forward_inputs,
    _finalize,
    _out_buffer,
    _no_kernel_output,
    _packed_rows,
    _sm_count,
    _store_output_tile,
)

__all__ = ["sparse24_gemv_triton", "GEMV_MAX_M", "KERNEL_DTYPES", "aot_specs"]

#: most rows of x this kernel takes (the token loop is unrolled BLOCK_M = next_pow2(M) times)
GEMV_MAX_M = 16
#: upper bound of K splits (more only adds atomic traffic)
MAX_SPLITS = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sparse24_gemv_kernel(
    x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_vn, stride_mn, stride_ym,
    HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KV: tl.constexpr,
):
    """y[M, N] = x[M, K] @ W[N, K].T for M <= BLOCK_M; grid (row blocks, K splits).
    SPLIT_OUT: fp32 atomics into y_ptr (a zeroed workspace); else y_ptr is the output and the
    bias and cast are fused. ``BLOCK_KV`` is a multiple of 16, so a tile covers whole meta words."""
    WORDS: tl.constexpr = BLOCK_KV // 16
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)

    KV = K // 2  # kept values per row
    n_words = (K + 31) // 32
    iters = tl.cdiv(KV, BLOCK_KV)
    per_split = tl.cdiv(iters, tl.num_programs(1))
    start = tl.program_id(1) * per_split
    end = tl.minimum(start + per_split, iters)

    shifts = 2 * tl.arange(0, 16)
    tok = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # masked-dense semantics (sparselora.ops): x * 0 over every dense column of this K slice,
    # pruned ones included, is 0 for a finite input and NaN for NaN/Inf; summed per token and
    # added to every output of the token below. The columns are those the gathers just touched.
    # Up to BLOCK_M = 8 an elementwise accumulator, reduced once after the loop (no shuffles or
    # barriers in the loop; ptxas sm_90: +0..8 registers); at 16 it would double the registers
    # (64 -> 128), so that tile reduces per iteration instead (72).
    nonfinite = tl.zeros((BLOCK_M, 2 * BLOCK_KV), dtype=tl.float32)
    nonfinite_tok = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for it in range(start, end):
        dcol = it * (2 * BLOCK_KV) + tl.arange(0, 2 * BLOCK_KV)
        xs = tl.load(x_ptr + tok[:, None] * stride_xm + dcol[None, :],
                     mask=(tok[:, None] < M) & (dcol[None, :] < K), other=0).to(tl.float32)
        if BLOCK_M >= 16:
            nonfinite_tok += tl.sum(xs * 0.0, axis=1)
        else:
            nonfinite += xs * 0.0
        j = it * BLOCK_KV + tl.arange(0, BLOCK_KV)  # kept-value index along the row
        j_mask = j < KV
        vals = tl.load(v_ptr + rows[:, None] * stride_vn + j[None, :],
                       mask=n_mask[:, None] & j_mask[None, :], other=0).to(tl.float32)
        wcol = it * WORDS + tl.arange(0, WORDS)
        words = tl.load(meta_ptr + rows[:, None] * stride_mn + wcol[None, :],
                        mask=n_mask[:, None] & (wcol[None, :] < n_words), other=0)
        # word w holds the indices of kept values 16w .. 16w+15 at bits 0, 2, .., 30 (the
        # arithmetic shift of bit 31 is harmless: the & 3 keeps two bits)
        idx = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 3, (BLOCK_N, BLOCK_KV))
        col = 4 * (j // 2)[None, :] + idx  # dense column of each kept value
        # masked rows/values load 0 and index 0; their gather is masked too (no OOB address)
        g_mask = n_mask[:, None] & j_mask[None, :]
        for mi in tl.static_range(BLOCK_M):
            xg = tl.load(x_ptr + mi * stride_xm + col, mask=g_mask & (mi < M), other=0).to(tl.float32)
            part = tl.sum(vals * xg, axis=1)  # [BLOCK_N]
            acc += tl.where(tok[None, :] == mi, part[:, None], 0.0)

    acc += (nonfinite_tok + tl.sum(nonfinite, axis=1))[None, :]  # +0 per finite token, NaN per non-finite one
    out = y_ptr + tok.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
    out_mask = n_mask[:, None] & (tok[None, :] < M)
    _store_output_tile(out, acc, out_mask, b_ptr, offs_n, n_mask, HAS_BIAS, SPLIT_OUT)


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
# (BLOCK_N, BLOCK_KV, num_warps, num_stages), picked by BLOCK_M (no autotuner: decode launches
# must be cheap and CUDA-graph friendly, and the right tile follows from M alone).
# Why one tile for every M: Triton lays the [BLOCK_N, BLOCK_KV] values tile out for 16-byte
# loads (8 bf16 per thread along K), so a warp's gather instruction spans 32 threads' columns.
# With BLOCK_KV = 64 a warp covers 4 rows x 8 threads x 8 kept values = 128 dense columns of x
# (256 bytes, 2 L1 lines shared by the 4 rows); the first draft's BLOCK_KV = 256 spanned 1 KB
# (8 lines) per gather instruction. Each row still reads 128 contiguous bytes of values per
# iteration (a whole line). ptxas -v (sm_90a, bf16, Triton 3.7.1): 32 / 48 / 56 / 72 / 64
# registers at BLOCK_M 1 / 2 / 4 / 8 / 16, no spills (the first draft, 32 x 128 tiles at
# BLOCK_M >= 8, hit the 255-register cap and spilled). The loop is not cp.async-pipelined (a
# gather cannot be), so latency is hidden by occupancy: 8-16 resident programs per SM keep
# 16-32 KB of weight loads in flight, above the ~14 KB per SM that 3 TB/s x ~600 ns needs on an
# H100. BLOCK_N = 16 gives 256 programs for N = 4096, ~2 waves of 132 SMs, so LLaVA-size
# layers take the fused (no split-K) path. These are first choices from register counts, not
# from timings: `config=` of the launcher overrides them for a sweep on a GPU.
_GPU_CONFIGS = {bm: (16, 64, 4, 3) for bm in (1, 2, 4, 8, 16)}
# under the interpreter: one small config (few programs, tiles cross every edge of test shapes)
_INTERP_CONFIG = (8, 32, 4, 1)


def _block_m(m: int) -> int:
    return triton.next_power_of_2(max(m, 1))


def _config(block_m: int) -> tuple:
    return _INTERP_CONFIG if _interpreting() else _GPU_CONFIGS[block_m]


def _check_config(config, name: str) -> None:
    def pow2(v, lo):
        return isinstance(v, int) and v >= lo and v & (v - 1) == 0

    ok = isinstance(config, tuple) and len(config) == 4 and all(isinstance(v, int) for v in config)
    if not ok or not (pow2(config[0], 1) and pow2(config[1], 16) and pow2(config[2], 1) and config[3] >= 1):
        raise ValueError(f"{name}: config must be (BLOCK_N power of 2, BLOCK_KV power of 2 >= 16, "
                         f"num_warps power of 2, num_stages >= 1), got {config!r}")


def _num_splits(programs: int, iters: int, requested: Optional[int], sms: int) -> int:
    """K splits: None -> enough programs for ~2 waves (rounded to the nearest whole split, so a
    grid that is already ~2 waves is not split for a few % more programs); never an empty split."""
    if requested is None:
        requested = min(max(1, round(2 * sms / max(programs, 1))), MAX_SPLITS)
    s = max(1, min(requested, iters))
    per = -(-iters // s)
    return -(-iters // per)


@on_tensor_device
def sparse24_gemv_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, split_k: Optional[int] = None,
                         out: Optional[torch.Tensor] = None, config: Optional[tuple] = None) -> torch.Tensor:
    """``x @ W.T + bias`` for at most :data:`GEMV_MAX_M` rows of ``x`` (leading dims flattened),
    ``W`` in the canonical 2:4 layout ``(values, meta)``.

    ``x``: ``[..., K]`` (any strides), fp16/bf16/fp32 like ``values``; returns ``[..., N]`` in that
    dtype. ``split_k``: None picks the number of K splits (~2 waves of programs), 1 forces one
    launch with bias and cast fused, ``s > 1`` at most ``s`` splits. ``out``: optional contiguous
    ``[M, N]`` result buffer, every element of which is written. ``config``: optional
    ``(BLOCK_N, BLOCK_KV, num_warps, num_stages)`` overriding the shipped tile (for tuning sweeps;
    BLOCK_N a power of 2, BLOCK_KV a power of 2 >= 16 so a tile covers whole meta words).
    """
    name = "sparse24_gemv (triton)"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    n, k = _check_forward_inputs(x, values, meta, bias, split_k, name)
    if config is not None:
        _check_config(config, name)
    lead = x.shape[:-1]
    m = math.prod(lead)
    if m > GEMV_MAX_M:
        raise ValueError(f"{name}: x has {m} rows (leading dims {tuple(lead)} flattened); this decode "
                         f"kernel takes at most {GEMV_MAX_M} (use sparse24_linear for more)")
    # the gather addresses columns directly, so x needs a unit inner stride; it is tiny (<= 16
    # rows), copying a strided one costs less than a strided gather
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1 and m > 0:
        x2 = x2.contiguous()
    values, meta = _packed_rows(values, meta)
    y = _out_buffer(out, (m, n), x, name)
    trivial = _no_kernel_output(y, lead, k, bias)
    if trivial is not None:
        return trivial

    block_m = _block_m(m)
    bn, bkv, warps, stages = config if config is not None else _config(block_m)
    programs = triton.cdiv(n, bn)
    iters = triton.cdiv(k // 2, bkv)
    splits = _num_splits(programs, iters, split_k, _sm_count(x.device))
    dummy_bias = bias if bias is not None else values  # never read when HAS_BIAS is False
    if splits > 1:
        ws = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        _sparse24_gemv_kernel[(programs, splits)](
            x2, values, meta, dummy_bias, ws, m, n, k,
            x2.stride(0), values.stride(0), meta.stride(0), ws.stride(0),
            HAS_BIAS=False, SPLIT_OUT=True, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_KV=bkv,
            num_warps=warps, num_stages=stages)
        _finalize(ws, bias, y)
    else:
        _sparse24_gemv_kernel[(programs, 1)](
            x2, values, meta, dummy_bias, y, m, n, k,
            x2.stride(0), values.stride(0), meta.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, SPLIT_OUT=False, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_KV=bkv,
            num_warps=warps, num_stages=stages)
    return y.reshape(*lead, n)


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile specs (tests/test_triton_aot.py)
# ----------------------------------------------------------------------------------------------
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specs():
    """Every shipped config (one per BLOCK_M bucket) x dtype x {split, fused} path. The finalize
    kernel of the split path is v1's and is listed by sparse24_gemm.aot_specs."""
    from sparselora.triton_kernels.aot import AotSpec, aligned_attrs

    specs = []
    attrs = aligned_attrs(_sparse24_gemv_kernel, ["x_ptr", "v_ptr", "meta_ptr", "b_ptr", "y_ptr", "N", "K",
                                             "stride_xm", "stride_vn", "stride_mn", "stride_ym"])
    for dt, ty in _TY.items():
        for split in (True, False):
            for block_m, (bn, bkv, w, s) in _GPU_CONFIGS.items():
                sig = {"x_ptr": f"*{ty}", "v_ptr": f"*{ty}", "meta_ptr": "*i32", "b_ptr": f"*{ty}",
                       "y_ptr": "*fp32" if split else f"*{ty}", "M": "i32", "N": "i32", "K": "i32",
                       "stride_xm": "i32", "stride_vn": "i32", "stride_mn": "i32", "stride_ym": "i32"}
                const = {"HAS_BIAS": not split, "SPLIT_OUT": split,
                         "BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_KV": bkv}
                sig.update({c: "constexpr" for c in const})
                specs.append(AotSpec(f"gemv_{'split' if split else 'fused'}_{ty}_m{block_m}n{bn}kv{bkv}w{w}s{s}",
                                     _sparse24_gemv_kernel, sig, const, num_warps=w, num_stages=s,
                                     extra={"attrs": attrs}))
    return specs

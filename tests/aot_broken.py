"""Configs that must NOT pass the AOT check (used by tests/test_triton_aot.py)."""
import triton
import triton.language as tl

from sparselora.triton_kernels.aot import AotSpec


@triton.jit
def bad_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)  # BLOCK=48 below is not a power of two: tl.arange rejects it
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2)


@triton.jit
def huge_tile(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, 4096, BK):
        a = tl.load(a_ptr + rm[:, None] * 4096 + k + rk[None, :])
        b = tl.load(b_ptr + (k + rk[:, None]) * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc.to(tl.float16))


def aot_specs():
    sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
    return [
        AotSpec("bad-arange", bad_kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 48}, archs=(90,)),
        AotSpec("huge-tile", huge_tile, sig, {"BM": 256, "BN": 256, "BK": 256}, num_warps=8, num_stages=4, archs=(80,)),
    ]

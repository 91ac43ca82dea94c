"""The warp-level mma.sp emulator, and a whole GEMM fed from the GPU-layout buffers with the kernel's
index math, against float64 (CPU). Each check is shown to fail on a deliberately broken input."""
import pytest
import torch

from sparselora.format import nm_mask, pack_24, unpack_24
from sparselora.gpu_layout import GpuPacked24, to_gpu_layout
from sparselora.mma_sp_emulator import InvalidMetadata, emulate_linear, mma_sp_m16n8k32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small_int(shape, dtype):
    # |v| <= 8: every product and sum is exact in fp32 and float64, so results compare with ==
    return torch.randint(-8, 9, shape).to(dtype)


def _weight(n, k, dtype):
    return _small_int((n, k), dtype) * nm_mask(torch.rand(n, k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k,m,tokens,warps", [(16, 64, 1, 8, 4), (33, 328, 13, 16, 4), (20, 520, 9, 8, 2),
                                                  (48, 256, 17, 16, 1), (40, 136, 37, 32, 1)])
def test_gemm_through_the_kernel_index_math_is_exact(seed, dtype, n, k, m, tokens, warps):
    w = _weight(n, k, dtype)
    x, b = _small_int((m, k), dtype), _small_int((n,), dtype)
    g = to_gpu_layout(pack_24(w))
    y = emulate_linear(x, g, b, warps_k=warps, tokens_per_cta=tokens)
    ref = x.double() @ w.double().T + b.double()
    assert torch.equal(y, ref), f"max err {(y - ref).abs().max()} (first bad (token,row) {(y != ref).nonzero()[0].tolist()})"


def test_gemm_random_values_float64(seed):
    n, k, m = 24, 200, 5
    w = (torch.randn(n, k) * nm_mask(torch.rand(n, k))).bfloat16()
    x = torch.randn(m, k).bfloat16()
    y = emulate_linear(x, to_gpu_layout(pack_24(w)), None)
    ref = x.double() @ w.double().T
    assert ((y - ref).norm() / ref.norm()).item() < 1e-12


def _case(dtype=torch.float16):
    torch.manual_seed(0)
    n, k, m = 32, 128, 8
    w = _weight(n, k, dtype)
    x = _small_int((m, k), dtype)
    return w, x, to_gpu_layout(pack_24(w)), x.double() @ w.double().T


def test_flipped_selector_is_caught():
    w, x, g, ref = _case()
    assert torch.equal(emulate_linear(x, g), ref)
    assert not torch.equal(emulate_linear(x, g, flip_selector=True), ref)


@pytest.mark.parametrize("lanes", [(0, 1), (0, 2), (4, 8)])
def test_swapped_meta_lanes_are_caught(lanes):
    w, x, g, ref = _case()
    a, b = lanes
    meta = g.meta.clone()
    meta[:, :, [a, b]] = meta[:, :, [b, a]]
    assert not torch.equal(emulate_linear(x, GpuPacked24(g.values, meta, g.shape)), ref)


def test_swapped_value_registers_are_caught():
    w, x, g, ref = _case()
    vals = g.values.clone()
    vals[..., [0, 2]] = vals[..., [2, 0]]  # a0 <-> a2: row g and row g+8 exchanged
    assert not torch.equal(emulate_linear(x, GpuPacked24(vals, g.meta, g.shape)), ref)


def test_single_mma_one_hot():
    # A = one kept value at (row 9, dense col 22), B = ones: D[9, :] == value, elsewhere 0
    # row 9 -> g = 1, half 1 (a2/a3 or a6/a7); dense col 22 -> group 5 -> kept cols 10, 11 -> a6/a7 of t = 1
    a = torch.zeros(32, 8)
    e = torch.full((32,), 0x44444444, dtype=torch.int64)  # every group keeps indices (0, 1)
    lane, reg = 4 * 1 + 1, 6  # a6 holds kept col 2t + 8 = 10 -> group 5, first kept index
    a[lane, reg] = 3.0
    # its index: 2 (dense col 20 + 2 = 22). Row 9's metadata comes from lane 4 * (9 % 8) + 2s + p,
    # p = group // 4 = 1, selector 0 -> lane 5, half 1 (bits 16..31), nibble group % 4 = 1 -> bits 20..23
    e[5] = (0x44444444 & ~(0xF << 20)) | (0b1110 << 20)  # i0 = 2, i1 = 3
    b = torch.zeros(32, 8)
    # B: k = 2t + (i&1) + 8 (i>>1); put 1 at k = 22 for token n = g: lanes with 2t + 8j + {0,1} = 22 -> t = 3, j = 2, i = 4
    for g in range(8):
        b[4 * g + 3, 4] = float(g + 1)  # token g gets weight g + 1
    d = mma_sp_m16n8k32(a, b, torch.zeros(32, 4, dtype=torch.float64), e, 0)
    D = torch.zeros(16, 8, dtype=torch.float64)
    for l in range(32):
        for i in range(4):
            D[(l >> 2) + (i >> 1) * 8, (l & 3) * 2 + (i & 1)] = d[l, i]
    want = torch.zeros(16, 8, dtype=torch.float64)
    want[9] = 3.0 * torch.arange(1, 9, dtype=torch.float64)
    assert torch.equal(D, want)
    # under selector 1 the metadata comes from other lanes (which say (0, 1)): col 20 * B[20] = 0
    d1 = mma_sp_m16n8k32(a, b, torch.zeros(32, 4, dtype=torch.float64), e, 1)
    assert not torch.equal(d1, d)


@pytest.mark.parametrize("nibble", [0b0000, 0b0101, 0b1010, 0b1111, 0b0001])
def test_undefined_or_unordered_metadata_raises(nibble):
    e = torch.full((32,), 0x44444444, dtype=torch.int64)
    e[6] = (0x44444444 & ~0xF) | nibble
    with pytest.raises(InvalidMetadata, match="row 1, group 0|not ascending"):
        mma_sp_m16n8k32(torch.zeros(32, 8), torch.zeros(32, 8), torch.zeros(32, 4, dtype=torch.float64), e, 1)


def test_b_at_pruned_positions_is_never_read():
    # every group keeps dense indices (0, 1): B rows 2, 3 of each group of 4 are pruned positions
    e = torch.full((32,), 0x44444444, dtype=torch.int64)
    a = torch.ones(32, 8)
    b = torch.ones(32, 8)
    b[4 * 2 + 1, 1] = float("inf")  # lane 9 (t = 1), b1: k = 3 (pruned), token g = 2
    d = mma_sp_m16n8k32(a, b, torch.zeros(32, 4, dtype=torch.float64), e, 0)
    assert torch.isfinite(d).all()  # a dense A·B would give 0·Inf = NaN in every row of token 2
    b[4 * 2 + 1, 1], b[4 * 2 + 0, 0] = 1.0, float("inf")  # lane 8, b0: k = 0 (kept), token 2
    d = mma_sp_m16n8k32(a, b, torch.zeros(32, 4, dtype=torch.float64), e, 0)
    tokens = torch.tensor([[(l & 3) * 2 + (i & 1) for i in range(4)] for l in range(32)])
    assert torch.isinf(d[tokens == 2]).all() and torch.isfinite(d[tokens != 2]).all()


@pytest.mark.parametrize("tokens,warps", [(8, 4), (16, 2), (32, 1)])
def test_nonfinite_x_gives_the_reference_backends_semantics(seed, tokens, warps):
    """The kernels' in-kernel fold (mma_sp.h nonfinite_halves / nan_flagged_tokens), emulated: a
    token with NaN/Inf anywhere in x, pruned columns included, is non-finite in every output, exactly
    where the reference backend's is; finite tokens are unchanged; the emulator's (like the
    kernels') non-finite outputs are NaN."""
    from sparselora.backends import get_backend

    n, k, m = 40, 328, 37  # 2 k-blocks (split over the warps), 2..5 CTAs of tokens, M not a multiple
    w = torch.randn(n, k)
    w[:, 300] = 0  # column 300 (k-block 1) is pruned in every row: mma.sp never reads x there
    w[:, 40] = 0  # and column 40 (k-block 0)
    w = (w * nm_mask(w.abs())).bfloat16()
    assert (w[:, 300] == 0).all() and (w[:, 40] == 0).all()
    x, b = torch.randn(m, k).bfloat16(), torch.randn(n).bfloat16()
    kept = int((w[0] != 0).nonzero()[0])
    x[1, 300] = float("inf")  # only at a pruned column, in the k-block warp 1 reads (warps > 1)
    x[9, 40] = float("-inf")  # pruned column, k-block 0
    x[17, kept] = float("nan")  # a kept column
    x[36, 300], x[36, 301] = float("nan"), float("inf")  # the last token, past a whole tile
    bad = {1, 9, 17, 36}
    packed = pack_24(w)
    # the reference backend on the same values in float32: torch 2.13's CPU bf16 GEMM leaks a NaN
    # row into its neighbour for K % 16 == 8 and M >= 17 (measured here), which is not the rule
    ref = get_backend("reference").linear(x.float(), pack_24(w.float()), {}, b.float())
    y = emulate_linear(x, to_gpu_layout(packed), b, warps_k=warps, tokens_per_cta=tokens)
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref)), "non-finite pattern differs from the reference backend"
    assert {int(t) for t in (~torch.isfinite(y)).any(1).nonzero()} == bad
    assert torch.isnan(y[sorted(bad)]).all()  # every output of a flagged token: NaN, as the kernels write
    good = [t for t in range(m) if t not in bad]
    ref64 = x[good].double() @ w.double().T + b.double()
    assert ((y[good] - ref64).norm() / ref64.norm()).item() < 1e-12
    # the bare mma.sp result (no fold) misses the tokens whose only non-finite input is pruned
    raw = emulate_linear(x, to_gpu_layout(packed), b, warps_k=warps, tokens_per_cta=tokens, fold_nonfinite=False)
    assert torch.isfinite(raw[1]).all() and torch.isfinite(raw[9]).all()
    assert not torch.equal(torch.isfinite(raw), torch.isfinite(ref))

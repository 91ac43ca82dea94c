"""Triton pack/unpack (``sparselora.triton_kernels.pack24``) are bit-exact with the reference
``format.pack_24`` / ``unpack_24``: same values bits, same meta words, same dense bits back."""
import pytest
import torch

from helpers import random_24
from sparselora.format import Packed24, SparsityError, nm_mask, pack_24, unpack_24
from sparselora.triton_kernels.pack24 import pack_24_triton, unpack_24_triton

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# K % 32 != 0 (partial last meta word), N not a multiple of the row tile, one-group rows
SHAPES = [(1, 4), (17, 40), (8, 100), (20, 64)]


def _bits(t):
    return t.view(torch.uint8)


def _assert_same(p, r):
    assert p.shape == r.shape
    assert torch.equal(p.meta, r.meta), "meta words differ from the reference"
    assert torch.equal(_bits(p.values), _bits(r.values)), "values bits differ from the reference"


def _tricky(n, k, dtype):
    """A 2:4 weight with the cases the selection rule must get right: empty groups, one-nonzero
    groups, -0.0 (counts as zero), and a kept zero through the mask."""
    w, mask, _ = random_24(n, k, dtype, bias=False)
    w[0, :4] = 0  # no nonzero: keeps positions 0, 1
    if k >= 8:
        w[-1, 4:8] = torch.tensor([0.0, -0.0, 0.0, 3.0], dtype=dtype)  # one nonzero at 3
    return w, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", SHAPES)
def test_pack_unpack_bit_exact(seed, dtype, n, k):
    w, mask = _tricky(n, k, dtype)
    r = pack_24(w)
    p = pack_24_triton(w)
    _assert_same(p, r)
    d = unpack_24_triton(r)
    assert torch.equal(_bits(d), _bits(unpack_24(r)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_pack_with_mask_keeps_masked_zeros(seed, dtype):
    n, k = 12, 72
    w, mask = _tricky(n, k, dtype)
    mask = mask.clone()
    mask[0, :4] = torch.tensor([False, True, False, True])  # kept positions that hold zeros
    w = w * mask
    w[1][mask[1]] = -0.0  # kept -0.0 must survive bit-exactly
    r = pack_24(w, mask)
    p = pack_24_triton(w, mask)
    _assert_same(p, r)
    back = unpack_24_triton(p)
    assert torch.equal(_bits(back), _bits(unpack_24(r)))
    assert (torch.signbit(back[1][mask[1]])).all()


def test_roundtrip_random_values_never_zero(seed):
    # dense random weights pruned by magnitude: unpack(pack(w)) == w, bit for bit (pruned
    # positions come back as +0.0, as documented, so -0.0 from w * mask is normalized first)
    w = torch.randn(33, 96, dtype=torch.float64)
    w = (w * nm_mask(w.abs())).to(torch.bfloat16)
    w = torch.where(w == 0, torch.zeros_like(w), w)
    assert torch.equal(_bits(unpack_24_triton(pack_24_triton(w))), _bits(w))


def test_corrupt_meta_raises_like_reference():
    w, _, _ = random_24(4, 32, torch.float16, bias=False)
    r = pack_24(w)
    meta = r.meta.clone()
    meta[2, 0] = 0  # every group of row 2 now claims indices (0, 0)
    with pytest.raises(SparsityError, match="corrupt 2:4 meta: row 2, group 0"):
        unpack_24_triton(Packed24(r.values, meta, r.shape))


def test_bad_inputs_raise_like_reference():
    dense = torch.randn(4, 8)
    with pytest.raises(SparsityError, match="not 2:4 sparse: row 0, group 0"):
        pack_24_triton(dense, name="layer.q")
    with pytest.raises(SparsityError, match="not divisible by the group size 4"):
        pack_24_triton(torch.zeros(4, 6))
    w, mask, _ = random_24(4, 8, torch.float32, bias=False)
    bad = w.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(SparsityError, match="NaN/Inf"):
        pack_24_triton(bad)
    with pytest.raises(SparsityError, match="dtype"):
        pack_24_triton(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(SparsityError, match="nonzeros outside its mask"):
        pack_24_triton(w, ~mask & (torch.arange(8) % 4 < 2))
    with pytest.raises(SparsityError, match="mask .* has shape"):
        pack_24_triton(w, mask[:, :4])
    with pytest.raises(TypeError, match="torch.Tensor"):
        pack_24_triton([[1.0]])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_gpu_pack_unpack_bit_exact(seed, dtype):
    w, mask, _ = random_24(1000, 4100, dtype, device="cuda", bias=False)
    r = pack_24(w.cpu())
    p = pack_24_triton(w)
    _assert_same(Packed24(p.values.cpu(), p.meta.cpu(), p.shape), r)
    assert torch.equal(_bits(unpack_24_triton(p).cpu()), _bits(w.cpu()))


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 40), k4=st.integers(1, 30), dtype=st.sampled_from(DTYPES), use_mask=st.booleans(),
       seed_=st.integers(0, 2**31 - 1))
def test_property_pack_unpack_bit_exact(n, k4, dtype, use_mask, seed_):
    torch.manual_seed(seed_)
    k = 4 * k4
    w, mask, _ = random_24(n, k, dtype, bias=False)
    # random extra zeros: groups with fewer than two nonzeros exercise the fill rule
    w = w * (torch.rand(n, k) > 0.3).to(dtype)
    m = mask if use_mask else None
    r = pack_24(w, m)
    p = pack_24_triton(w, m)
    _assert_same(p, r)
    assert torch.equal(_bits(unpack_24_triton(p)), _bits(unpack_24(r)))

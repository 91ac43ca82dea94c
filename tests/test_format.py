import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparselora.format import (
    Packed24, SparsityError, check_nm, mask_from_meta, nm_mask, pack_24, packed_nbytes, unpack_24, validate_24,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), groups=st.integers(1, 40), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_bit_exact(n, groups, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = 4 * groups
    w = torch.randn(n, k, generator=g).to(dtype)
    w = torch.where(nm_mask(w.abs()), w, torch.zeros((), dtype=dtype))  # +0.0 where pruned
    p = pack_24(w)
    assert p.values.shape == (n, k // 2) and p.meta.shape == (n, -(-k // 32)) and p.meta.dtype == torch.int32
    back = unpack_24(p)
    assert back.dtype == dtype
    assert torch.equal(back.view(torch.uint8) if dtype != torch.float64 else back, w.view(torch.uint8) if dtype != torch.float64 else w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_bytes_at_most_9_16(dtype):
    n, k = 64, 4096
    w = torch.randn(n, k).to(dtype)
    p = pack_24(w * nm_mask(w.abs()))
    dense = n * k * w.element_size()
    assert p.nbytes() == packed_nbytes(n, k, dtype)
    assert p.nbytes() <= dense * 9 / 16


def test_mask_is_kept_even_for_zero_values():
    # a kept position may be 0.0: the mask, not the value, decides (SparseLoRA depends on it)
    w = torch.tensor([[0.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0]])
    mask = torch.tensor([[True, True, False, False, False, False, True, True]])
    with pytest.raises(SparsityError, match="outside its mask"):
        pack_24(w, mask)
    mask = torch.tensor([[True, True, False, False, True, False, False, True]])
    p = pack_24(w, mask)
    assert torch.equal(p.mask(), mask)
    assert torch.equal(p.to_dense(), w)


def test_groups_with_fewer_than_two_nonzeros_pack():
    w = torch.zeros(3, 8)
    w[1, 5] = 2.0
    p = pack_24(w)
    assert torch.equal(p.to_dense(), w)
    assert (p.mask().reshape(3, 2, 4).sum(-1) == 2).all()


def test_nm_mask_patterns_and_ties():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0, 5, 4, 3, 2]])
    assert nm_mask(s, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]
    m = nm_mask(torch.rand(16, 64), 4, 8)
    assert (m.reshape(16, 8, 8).sum(-1) == 4).all()
    check_nm(m, 4, 8)
    with pytest.raises(SparsityError, match="not 2:4"):
        check_nm(m, 2, 4)


def test_meta_layout_is_documented_layout():
    # value j of a row: 2-bit index at bits 2*(j%16) of word j//16
    w = torch.zeros(1, 64)
    cols = []
    for g in range(16):
        i0, i1 = [(0, 1), (0, 3), (1, 2), (2, 3), (1, 3), (0, 2)][g % 6]
        w[0, 4 * g + i0] = 1.0
        w[0, 4 * g + i1] = 2.0
        cols += [i0, i1]
    p = pack_24(w)
    words = p.meta[0].tolist()
    for j, idx in enumerate(cols):
        word = words[j // 16] & 0xFFFFFFFF
        assert (word >> (2 * (j % 16))) & 3 == idx


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.ones(4, 8), r"row 0, group 0 \(columns 0..3\) has 4 nonzeros"),
        (lambda: torch.zeros(4, 6), "not divisible by the group size 4"),
        (lambda: torch.zeros(8), "must be 2-D"),
    ],
)
def test_bad_weights_name_the_problem(make, match):
    with pytest.raises(SparsityError, match=match):
        pack_24(make(), name="layers.0.q_proj")
    with pytest.raises(SparsityError, match="layers.0.q_proj"):
        validate_24(make(), name="layers.0.q_proj")


def test_bad_row_and_group_are_reported():
    w = torch.randn(6, 16)
    w = w * nm_mask(w.abs())
    w[4, 9] = w[4, 8] = w[4, 10] = 1.0
    with pytest.raises(SparsityError, match="row 4, group 2"):
        validate_24(w, "fc1")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_rejected(bad):
    w = torch.zeros(2, 8)
    w[1, 4] = bad
    with pytest.raises(SparsityError, match=r"NaN/Inf \(first at index \(1, 4\)\)"):
        pack_24(w, name="fc")


def test_wrong_dtype_rejected():
    with pytest.raises(SparsityError, match="dtype torch.int32"):
        pack_24(torch.zeros(2, 8, dtype=torch.int32))


def test_mask_on_wrong_device_rejected():
    w = torch.zeros(2, 8)
    mask = torch.zeros(2, 8, dtype=torch.bool, device="meta")
    with pytest.raises(SparsityError, match="mask of 'fc' is on meta"):
        pack_24(w, mask, name="fc")


def test_corrupt_meta_detected():
    w = torch.randn(2, 8)
    p = pack_24(w * nm_mask(w.abs()))
    bad = Packed24(p.values, torch.zeros_like(p.meta), p.shape)  # all indices 0: i0 == i1
    with pytest.raises(SparsityError, match="corrupt 2:4 meta"):
        unpack_24(bad)
    with pytest.raises(SparsityError, match="meta must be int32"):
        unpack_24(Packed24(p.values, p.meta.long(), p.shape))
    with pytest.raises(SparsityError, match="meta shape"):
        unpack_24(Packed24(p.values, p.meta[:, :0], p.shape))


def test_mask_from_meta_matches_mask():
    w = torch.randn(5, 40)
    m = nm_mask(w.abs())
    p = pack_24(w * m, m)
    assert torch.equal(mask_from_meta(p.meta, p.shape), m)


@pytest.mark.parametrize("k", [4, 8, 36, 72, 100])
def test_meta_padding_is_a_valid_mma_sp_encoding(k):
    # Groups past K/4 in the last word hold 0b0100 (indices 0, 1): mma.sp treats 0b0000 (and
    # 0b0101, 0b1010, 0b1111) as undefined, and a kernel feeds whole words to the hardware.
    torch.manual_seed(k)
    w = torch.randn(3, k) * nm_mask(torch.rand(3, k))
    p = pack_24(w)
    words = p.meta.to(torch.int64) & 0xFFFFFFFF
    groups = k // 4
    for r in range(3):
        for g in range(words.shape[1] * 8):
            nib = int(words[r, g // 8] >> (4 * (g % 8))) & 0xF
            if g >= groups:
                assert nib == 0b0100, (r, g, bin(nib))
            else:
                assert nib & 3 < nib >> 2, (r, g, bin(nib))  # i0 < i1: a valid encoding
    assert torch.equal(unpack_24(p), w)

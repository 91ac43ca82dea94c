"""The GPU layout of the mma.sp kernels (sparselora.gpu_layout): a bit-exact, reversible reorder."""
import pytest
import torch

from sparselora.format import Packed24, SparsityError, nm_mask, pack_24, unpack_24
from sparselora import gpu_layout as L
from sparselora.gpu_layout import GpuPacked24, from_gpu_layout, to_gpu_layout

DTYPES = (torch.float16, torch.bfloat16)


def _bits(t):
    return t.view(torch.int16)




@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(1, 8), (16, 64), (17, 72), (40, 136), (33, 520), (64, 512)])
def test_round_trip_bit_exact(seed, dtype, n, k):
    mask = nm_mask(torch.rand(n, k))
    w = (torch.randn(n, k).to(dtype) * mask)
    w[mask & (torch.rand(n, k) < 0.1)] = -0.0  # kept -0.0 values: only a bit view sees them
    p = pack_24(w, mask)
    g = to_gpu_layout(p)
    mt, kt, kq = L.gpu_layout_sizes(n, k)
    assert g.values.shape == (mt, kt, 32, 8) and g.meta.shape == (mt, kq, 32, 4) and g.layout == L.LAYOUT
    back = from_gpu_layout(g)
    assert torch.equal(_bits(back.values), _bits(p.values)) and torch.equal(back.meta, p.meta) and back.shape == p.shape
    # a pure permutation plus padding: the multiset of value bits is preserved
    pad = g.values.numel() - p.values.numel()
    got = torch.sort(_bits(g.values).flatten()).values
    want = torch.sort(torch.cat([_bits(p.values).flatten(), torch.zeros(pad, dtype=torch.int16)])).values
    assert torch.equal(got, want)


def test_one_hot_value_lands_in_its_lane_and_register():
    # one kept value at (row r, kept column c): it must sit at the lane/register of layout.h's table
    n, k = 48, 256
    for r, c in [(0, 0), (5, 3), (9, 2), (13, 10), (20, 17), (47, 127), (31, 64 + 9)]:
        vals = torch.zeros(n, k // 2, dtype=torch.float16)
        vals[r, c] = 1.0
        meta = pack_24(torch.zeros(n, k)).meta  # indices 0,1 everywhere (valid)
        g = to_gpu_layout(Packed24(vals, meta, (n, k)))
        hit = (g.values != 0).nonzero().tolist()
        assert len(hit) == 1
        mt, kt, lane, i = hit[0]
        assert (mt, kt) == (r // 16, c // 16)
        assert (L.a_row(lane, i), L.a_col(lane, i)) == (r % 16, c % 16), (r, c, lane, i)


def test_one_hot_meta_half_lands_in_its_lane():
    # a distinctive nibble pattern in canonical word (row r, k-tile kt), half p: the lane that
    # supplies it under selector kt % 2 carries it in word (kt % 8) // 2, half r // 8
    n, k = 32, 512
    base = pack_24(torch.zeros(n, k)).meta
    for r, kt, half in [(0, 0, 0), (3, 1, 1), (11, 6, 0), (15, 7, 1), (17, 12, 1)]:
        meta = base.clone()
        word = meta[r, kt].item() & 0xFFFFFFFF
        word = (word & ~(0xFFFF << (16 * half))) | (0x9E4D << (16 * half))  # nibbles 0xD,0x4,0xE,0x9: valid
        meta[r, kt] = word - 2**32 if word >= 2**31 else word
        g = to_gpu_layout(Packed24(torch.zeros(n, k // 2, dtype=torch.bfloat16), meta, (n, k)))
        words = g.meta.to(torch.int64) & 0xFFFFFFFF
        lo, hi = words & 0xFFFF, words >> 16
        hits = ((lo == 0x9E4D).nonzero().tolist(), (hi == 0x9E4D).nonzero().tolist())
        (h, found), = [(h, f) for h, f in enumerate(hits) if f]
        assert len(found) == 1
        mt, kq, lane, w = found[0]
        assert mt == r // 16 and h == (r % 16) // 8 and L.meta_row(lane, h) == r % 16
        assert kq * 8 + L.meta_word_ktile(lane, w) == kt and L.meta_selector(lane) == kt % 2
        assert L.meta_chunk(lane) == half


def test_padding_meta_is_valid_and_checked():
    p = pack_24(torch.zeros(20, 72, dtype=torch.float16))
    g = to_gpu_layout(p)
    nib = [(int(w) & 0xFFFFFFFF) >> (4 * q) & 0xF for w in g.meta.flatten() for q in range(8)]
    assert set(nib) == {0b0100}  # all-zero weight: every nibble, padding included, is (0, 1)
    bad = g.meta.clone()
    bad[-1, -1, 0, 3] = 0  # a padding word (k-tile past K) altered
    with pytest.raises(SparsityError, match="padding"):
        from_gpu_layout(GpuPacked24(g.values, bad, g.shape))


def test_second_reorder_and_wrong_inputs_raise():
    p = pack_24((torch.randn(16, 64) * nm_mask(torch.rand(16, 64))).half())
    g = to_gpu_layout(p)
    with pytest.raises(SparsityError, match="already in the GPU layout"):
        to_gpu_layout(g)
    with pytest.raises(SparsityError, match="needs a GpuPacked24"):
        from_gpu_layout(p)
    with pytest.raises(SparsityError, match="16-bit values"):
        to_gpu_layout(pack_24(torch.zeros(16, 64)))
    with pytest.raises(SparsityError, match="must be values"):
        from_gpu_layout(GpuPacked24(g.values[:, :1], g.meta, g.shape))


def test_round_trip_through_bytes_count():
    # resident bytes: 9/16 of dense for aligned shapes, padding only otherwise
    p = pack_24(torch.zeros(256, 1024, dtype=torch.bfloat16))
    g = to_gpu_layout(p)
    assert g.nbytes() == p.nbytes() == 256 * 1024 * 2 * 9 // 16

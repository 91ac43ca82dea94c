"""Packed operands are validated wherever they enter (issue 12, items 3 and 6).

Corrupt meta (a group whose two indices are equal or descending) is rejected by the constructors,
``mask_from_meta``, every public op and the Triton launchers, with the tensor's name and the first
bad row and group; the vectorised word check (``format._bad_words_into``) agrees with unpacking on
random words; validated meta is re-checked after an in-place write. Edge shapes: a 0-d input,
zero output features, modules on the meta device, a float64 bias with a float32 weight.
"""
import pytest
import torch
import torch.nn as nn

from helpers import assert_linear, random_24
from sparselora import SparseLinear
import sparselora.format as fmt
from sparselora.format import (Packed24, SparsityError, _unpack_indices, check_meta, mask_from_meta, pack_24,
                               validate_packed)
from sparselora.lora import SparseLoRALinear, sparse_lora_linear, use_triton_on_cpu
from sparselora.ops import sparse24_linear, sparse24_matmul_t
from sparselora.triton_kernels.sparse24_gemm import sparse24_linear_triton, sparse24_matmul_t_triton
from sparselora.triton_kernels.sparse24_gemv import sparse24_gemv_triton


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _set_group(meta: torch.Tensor, row: int, group: int, i0: int, i1: int) -> torch.Tensor:
    """A copy of ``meta`` with group ``group`` of ``row`` holding indices (i0, i1)."""
    words = meta.to(torch.int64) & 0xFFFFFFFF
    w, field = divmod(group, 8)
    words[row, w] = (words[row, w] & ~(0xF << (4 * field))) | ((i0 | (i1 << 2)) << (4 * field))
    return _to_int32(words)


def _corrupt(n=6, k=72, row=3, group=13, i0=2, i1=2, dtype=torch.float32):
    w, _, b = random_24(n, k, dtype)
    p = pack_24(w)
    return w, b, p, _set_group(p.meta, row, group, i0, i1)


def test_word_check_agrees_with_unpacking(seed):
    # random words hit all 16 index pairs of every group; padding groups past K/2 values are ignored
    for k in (128, 72, 4):
        meta = _to_int32(torch.randint(0, 2**32, (64, -(-(k // 2) // 16)), dtype=torch.int64))
        idx = _unpack_indices(meta, k // 2).reshape(64, k // 4, 2)
        want = (idx[..., 0] >= idx[..., 1]).reshape(64, -1)
        words = torch.zeros(64, meta.shape[1], dtype=torch.bool)
        for g in range(k // 4):
            words[:, g // 8] |= want[:, g]
        out = torch.empty(meta.shape, dtype=torch.bool)
        fmt._bad_words_into(meta, fmt._need(meta.shape[1], k // 4, "cpu"), torch.empty_like(meta), torch.empty_like(meta), out)
        assert torch.equal(out, words), k
        assert fmt._any_bad_word(meta, k // 4) == bool(words.any())


def test_chunked_check_sees_every_chunk(monkeypatch):
    # 3 words per step: rows are checked a few at a time through the same scratch buffers
    monkeypatch.setattr(fmt, "_CHUNK_WORDS", 3)
    _, _, p, _ = _corrupt(n=7, k=136)  # 5 words per row: one row per step
    check_meta(p.meta, 136, "fc")
    for row in (0, 3, 6):
        with pytest.raises(SparsityError, match=f"row {row}, group 9"):
            check_meta(_set_group(p.meta, row, 9, 1, 1), 136, "fc")
    _, _, p, _ = _corrupt(n=9, k=8, row=0, group=0)  # 1 word per row: 3 rows per step, the last step partial
    with pytest.raises(SparsityError, match="row 8, group 1"):
        check_meta(_set_group(p.meta, 8, 1, 2, 0), 8, "fc")


@pytest.mark.parametrize("i0,i1", [(2, 2), (0, 0), (3, 3), (3, 1), (1, 0)])
def test_check_meta_names_first_bad_row_and_group(i0, i1):
    _, _, p, bad = _corrupt(i0=i0, i1=i1)
    bad = _set_group(bad, 5, 17, i0, i1)  # a second bad group, later
    with pytest.raises(SparsityError, match=rf"'fc1': corrupt 2:4 meta: row 3, group 13 \(columns 52..55\) "
                                            rf"has indices \[{i0}, {i1}\].*2 bad groups"):
        check_meta(bad, 72, "fc1")
    check_meta(p.meta, 72, "fc1")  # the packer's own meta passes, padding included


def test_padding_bits_are_not_read():
    # K = 72: 36 values, the last word holds 2 groups; its 6 padding groups may hold anything
    _, _, p, _ = _corrupt()
    check_meta(_set_group(p.meta, 0, 23, 3, 3), 72, "fc")


def test_constructors_reject_corrupt_meta():
    _, b, p, bad = _corrupt()
    packed = Packed24(p.values, bad, p.shape)
    with pytest.raises(SparsityError, match="'blocks.0.fc'.*corrupt 2:4 meta: row 3, group 13"):
        SparseLinear(packed, b, name="blocks.0.fc")
    with pytest.raises(SparsityError, match="'blocks.0.fc'.*corrupt 2:4 meta: row 3, group 13"):
        SparseLoRALinear(packed, b, r=2, name="blocks.0.fc")
    with pytest.raises(SparsityError, match="corrupt 2:4 meta: row 3, group 13"):
        mask_from_meta(bad, p.shape)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_constructors_reject_non_finite_values(bad_value):
    w, b, p, _ = _corrupt()
    values = p.values.clone()
    values[4, 9] = bad_value
    col = 4 * 4 + int(_unpack_indices(p.meta[4:5], 36)[0, 9])
    with pytest.raises(SparsityError, match=rf"'fc2': packed values contain NaN/Inf: values\[4, 9\].*column {col}"):
        SparseLinear(Packed24(values, p.meta, p.shape), b, name="fc2")
    with pytest.raises(SparsityError, match=r"'fc2': packed values contain NaN/Inf: values\[4, 9\]"):
        SparseLoRALinear(Packed24(values, p.meta, p.shape), b, r=2, name="fc2")


def test_constructor_rejects_shape_that_does_not_fit():
    _, b, p, _ = _corrupt()
    with pytest.raises(SparsityError, match="do not fit the stated shape"):
        SparseLinear(Packed24(p.values, p.meta, (6, 68)), None, name="fc")


def test_ops_reject_corrupt_meta():
    w, b, p, bad = _corrupt()
    x = torch.randn(5, 72)
    a, bb = torch.randn(2, 72), torch.randn(6, 2)
    with pytest.raises(SparsityError, match="corrupt 2:4 meta: row 3, group 13"):
        sparse24_linear(x, p.values, bad, b)
    with pytest.raises(SparsityError, match="corrupt 2:4 meta: row 3, group 13"):
        sparse24_matmul_t(torch.randn(5, 6), p.values, bad)
    # the reference path of the fused op used to shift the bad row's values into later rows
    with pytest.raises(SparsityError, match="corrupt 2:4 meta: row 3, group 13"):
        sparse_lora_linear(x, p.values, bad, a, bb, 2.0, b)
    with use_triton_on_cpu(), pytest.raises(SparsityError, match="corrupt 2:4 meta: row 3, group 13"):
        sparse_lora_linear(x, p.values, bad, a, bb, 2.0, b)


def test_triton_launchers_reject_corrupt_meta():
    w, b, p, bad = _corrupt()
    x = torch.randn(3, 72)
    for fn in (lambda: sparse24_linear_triton(x, p.values, bad, b), lambda: sparse24_gemv_triton(x, p.values, bad, b),
               lambda: sparse24_matmul_t_triton(torch.randn(3, 6), p.values, bad)):
        with pytest.raises(SparsityError, match="corrupt 2:4 meta: row 3, group 13"):
            fn()


def test_validated_meta_is_checked_again_after_an_in_place_write():
    w, b, p, bad = _corrupt()
    layer = SparseLinear(pack_24(w), b, name="fc")
    x = torch.randn(4, 72)
    assert_linear(layer(x), x, w, b)
    layer.meta.copy_(bad)  # bumps the version counter: the op validates again
    with pytest.raises(SparsityError, match="corrupt 2:4 meta: row 3, group 13"):
        layer(x)


def test_validation_skips_tensors_without_data():
    values = torch.empty(8, 8, device="meta")
    meta = torch.empty(8, 1, dtype=torch.int32, device="meta")
    assert validate_packed(values, meta, "fc") == (8, 16)
    with pytest.raises(SparsityError, match="words per row"):
        check_meta(meta, 64, "fc")  # shapes are still checked


# --- edge shapes ------------------------------------------------------------------------------
def test_zero_d_input_is_a_clear_error():
    w, b, p, _ = _corrupt()
    x = torch.tensor(1.0)
    with pytest.raises(SparsityError, match="'?fc'?: input is a 0-d tensor"):
        SparseLinear(p, b, name="fc")(x)
    with pytest.raises(SparsityError, match="fc: input is a 0-d tensor"):
        SparseLoRALinear(p, b, r=2, name="fc")(x)
    with pytest.raises(SparsityError, match="input is a 0-d tensor"):
        sparse24_linear(x, p.values, p.meta, b)


@pytest.mark.parametrize("bias", [True, False])
def test_zero_output_features(bias):
    lin = nn.Linear(16, 0, bias=bias)
    layer = SparseLinear.from_linear(lin, name="empty")
    x = torch.randn(3, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(3, 16))
    lora = SparseLoRALinear(pack_24(torch.zeros(0, 16)), torch.zeros(0) if bias else None, r=2)
    assert lora(torch.randn(2, 5, 16)).shape == (2, 5, 0)
    assert mask_from_meta(layer.meta, (0, 16)).shape == (0, 16)


def test_meta_device_needs_no_data():
    lin = nn.Linear(64, 32, device="meta")
    layer = SparseLinear.from_linear(lin, name="fc")
    assert layer.values.is_meta and layer.values.shape == (32, 32) and layer.meta.shape == (32, 2)
    y = layer(torch.empty(2, 5, 64, device="meta"))
    assert y.is_meta and y.shape == (2, 5, 32)
    mask = torch.empty(32, 64, dtype=torch.bool, device="meta")
    lora = SparseLoRALinear.from_linear(lin, mask, r=4, name="fc")
    assert lora(torch.empty(3, 64, device="meta")).shape == (3, 32)


def test_float64_bias_with_float32_weight(seed):
    # decision: the constructors store the bias in the weight's dtype (as nn.Linear does)
    w, _, _ = random_24(8, 32)
    b64 = torch.randn(8, dtype=torch.float64)
    layer = SparseLinear(pack_24(w), b64, name="fc")
    assert layer.bias.dtype == torch.float32
    x = torch.randn(4, 32)
    assert_linear(layer(x), x, w, b64.float())
    lora = SparseLoRALinear(pack_24(w), b64, r=2, name="fc")
    assert lora.bias.dtype == torch.float32
    assert_linear(lora(x), x, w, b64.float())  # B = 0: the base layer
    # a bias swapped in later, or given to the op, is an error naming the bias
    layer.bias = nn.Parameter(b64)
    with pytest.raises(SparsityError, match="fc: bias dtype torch.float64 != input dtype torch.float32"):
        layer(x)
    with pytest.raises(SparsityError, match="bias dtype torch.float64 != input dtype torch.float32"):
        sparse24_linear(x, layer.values, layer.meta, b64)
    with pytest.raises(SparsityError, match=r"fc: bias must be a \[8\] tensor"):
        SparseLinear(pack_24(w), torch.zeros(7), name="fc")

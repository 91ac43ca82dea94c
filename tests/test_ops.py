"""The torch.library ops and SparseLinear on CPU: numerics, autograd, torch.compile, errors."""
import pytest
import torch
import torch.nn as nn

import sparselora as sl
from sparselora.format import SparsityError, pack_24
from sparselora.ops import sparse24_linear, sparse24_matmul_t
from helpers import assert_linear, random_24


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,bias", [(1, 8, 64, True), (7, 24, 40, False), (33, 64, 128, True)])
def test_linear_matches_float64(seed, dtype, m, n, k, bias):
    w, mask, b = random_24(n, k, dtype, bias=bias)
    x = torch.randn(m, k).to(dtype)
    p = pack_24(w)
    y = sparse24_linear(x, p.values, p.meta, b)
    assert y.dtype == dtype
    assert_linear(y, x, w, b, dtype=dtype)


def test_batched_and_noncontiguous_input(seed):
    w, _, b = random_24(16, 64)
    p = pack_24(w)
    x = torch.randn(3, 64, 5).transpose(1, 2)  # [3, 5, 64], non-contiguous
    assert not x.is_contiguous()
    y = sparse24_linear(x, p.values, p.meta, b)
    assert_linear(y, x, w, b)


def test_gradients_match_dense(seed):
    w, mask, b = random_24(12, 32, torch.float64)
    p = pack_24(w)
    vals = p.values.clone().requires_grad_()
    b = b.clone().requires_grad_()
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, v, bb: sparse24_linear(x, v, p.meta, bb), (x, vals, b))
    # the value gradient is the dense gradient at the kept positions
    wd = w.clone().requires_grad_()
    (x @ wd.t()).pow(2).sum().backward()
    sparse24_linear(x.detach(), vals, p.meta, None).pow(2).sum().backward()
    assert torch.allclose(pack_24(wd.grad * mask, mask).values, vals.grad)


def test_matmul_t_and_double_backward(seed):
    w, _, _ = random_24(12, 32, torch.float64, bias=False)
    p = pack_24(w)
    dy = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(sparse24_matmul_t(dy, p.values, p.meta), dy @ w)
    torch.autograd.gradcheck(lambda d: sparse24_matmul_t(d, p.values, p.meta), (dy,))


def test_op_errors_name_the_problem():
    w, _, _ = random_24(8, 32)
    p = pack_24(w)
    with pytest.raises(SparsityError, match="input has 16 features, weight expects in_features=32"):
        sparse24_linear(torch.randn(2, 16), p.values, p.meta, None)
    with pytest.raises(SparsityError, match="input dtype torch.float16"):
        sparse24_linear(torch.randn(2, 32).half(), p.values, p.meta, None)
    with pytest.raises(SparsityError, match="bias must be"):
        sparse24_linear(torch.randn(2, 32), p.values, p.meta, torch.zeros(3))
    with pytest.raises(SparsityError, match="input on meta"):
        sparse24_linear(torch.randn(2, 32, device="meta"), p.values, p.meta, None)


def test_sparse_linear_from_pruned_linear(seed):
    lin = nn.Linear(64, 32)
    with pytest.raises(SparsityError, match="'blocks.0.fc' is not 2:4 sparse"):
        sl.SparseLinear.from_linear(lin, name="blocks.0.fc")
    mask = sl.nm_mask(lin.weight.detach().abs())
    s = sl.SparseLinear.from_linear(lin, mask=mask, name="blocks.0.fc")
    x = torch.randn(4, 64)
    assert_linear(s(x), x, lin.weight.detach() * mask, lin.bias.detach())
    assert torch.equal(s.mask(), mask)
    back = s.to_linear()
    assert torch.equal(back.weight, lin.weight.detach() * mask)
    assert s.backend.name == "reference" and "auto" in s.backend_reason
    with pytest.raises(SparsityError, match="input has 63 features"):
        s(torch.randn(2, 63))


def test_sparse_linear_state_dict_round_trip(seed):
    w, mask, b = random_24(16, 32)
    s = sl.SparseLinear(pack_24(w), b)
    sd = s.state_dict()
    assert set(sd) == {"values", "meta", "bias"}
    s2 = sl.SparseLinear(pack_24(torch.zeros(16, 32)), torch.zeros(16))
    s2.load_state_dict(sd)
    x = torch.randn(3, 32)
    assert torch.equal(s(x), s2(x))


def test_torch_compile_traces_the_op(seed):
    w, mask, b = random_24(32, 64)
    s = sl.SparseLinear(pack_24(w), b)
    model = nn.Sequential(s, nn.GELU())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 64)
    # inductor's vectorized erf differs from eager's by ~1e-4 relative near GELU's tail,
    # so both are checked against float64 rather than bit-compared with each other
    ref64 = torch.nn.functional.gelu(x.double() @ w.double().t() + b.double())
    with torch.no_grad():
        out_c, out_e = compiled(x), model(x)
    for out in (out_c, out_e):
        assert torch.isfinite(out).all()
        rel = (out.double() - ref64).norm() / ref64.norm()
        assert rel < 1e-5, f"relative error {rel:.2e}"


def test_backend_registry():
    names = [b.name for b in sl.list_backends()]
    assert "reference" in names
    with pytest.raises(KeyError, match="unknown backend 'nope'"):
        sl.get_backend("nope")
    with pytest.raises(ValueError, match="cannot run a 8x6"):
        sl.choose_backend("cpu", torch.float32, 8, 6, "reference")
    c = sl.choose_backend("cpu", torch.float32, 8, 6)
    assert c.backend is None and "not a multiple of 4" in c.reason


def test_custom_backend_plugs_in_without_edits(seed):
    calls = []

    class Doubling(sl.Backend):
        name, priority = "test-plugin", 99

        def unsupported_reason(self, device, dtype, n, k):
            return None if dtype == torch.float64 else "float64 only"

        def linear(self, x, packed, extra, bias):
            calls.append(x.shape)
            return torch.nn.functional.linear(x, packed.to_dense(), bias)

    sl.register_backend(Doubling())
    try:
        w, _, b = random_24(8, 16, torch.float64)
        s = sl.SparseLinear(pack_24(w), b)  # auto picks the highest-priority supporting backend
        assert s.backend.name == "test-plugin"
        s(torch.randn(2, 16, dtype=torch.float64))
        assert calls == [torch.Size([2, 16])]
        s32 = sl.SparseLinear(pack_24(w.float()), b.float())
        assert s32.backend.name == "reference"
    finally:
        from sparselora.backends.base import _REGISTRY

        _REGISTRY.pop("test-plugin")

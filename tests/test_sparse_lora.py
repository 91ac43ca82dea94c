"""SparseLoRA: Triton kernels (interpreter on CPU), ops + autograd, module, merge, model helpers,
distillation. Every numeric check is against a float64 reference built from the same rounded inputs."""
import copy

import pytest
import torch
import torch.nn as nn

from helpers import assert_close, assert_linear, assert_matmul, random_24
from sparselora.distill import distill
from sparselora.format import SparsityError, check_nm, nm_mask, pack_24
from sparselora.lora import (SparseLoRALinear, add_sparse_lora, lora_parameters, merge_sparse_lora,
                             sparse_lora_linear, use_triton_on_cpu)
from sparselora.modules import SparseLinear
from sparselora.triton_kernels import sparse_lora as K

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, K, r): M = 1, odd M, K not a multiple of the 64-wide tile, r = 1, r not a multiple of 16, r = 64
SHAPES = [(1, 64, 64, 1), (7, 40, 136, 20), (33, 72, 96, 16), (3, 24, 32, 64)]


def _operands(m, n, k, r, dtype, bias=True):
    w, mask, b = random_24(n, k, dtype, bias=bias)
    a = (torch.randn(r, k, dtype=torch.float64) / k**0.5).to(dtype)
    bb = torch.randn(n, r, dtype=torch.float64).to(dtype)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    return w, mask, b, a, bb, x


def _ref64(x, xa, w, mask, a, b, s, bias):
    """float64 y = x·(W⊙M)ᵀ + s·xa·((B·A)⊙M)ᵀ + bias from the rounded operands, and the
    magnitude Σ|terms| of each output (the oracle's element-wise scale)."""
    d = lambda t: t.double() if t is not None else None
    upd = (d(b) @ d(a)) * s * mask
    xa = x if xa is None else xa
    y = d(x) @ d(w).t() + d(xa) @ upd.t()
    mag = d(x).abs() @ d(w).abs().t() + d(xa).abs() @ upd.abs().t()
    if bias is not None:
        y, mag = y + d(bias), mag + d(bias).abs()
    return y, mag


def _check_fwd(y, operands, dtype, what):
    """A SparseLoRA forward against float64: the GPU kernel rounds its W + s·B·A tile to dtype."""
    ref, mag = _ref64(*operands)
    assert_close(y, ref, what, dtype=dtype, mag=mag, inner=dtype)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("separate", [False, True], ids=["fused", "dropout-input"])
def test_fwd_kernel_vs_float64(seed, dtype, shape, separate):
    m, n, k, r = shape
    w, mask, bias, a, b, x = _operands(m, n, k, r, dtype)
    xa = torch.randn(m, k, dtype=torch.float64).to(dtype) if separate else None
    p = pack_24(w, mask)
    out = torch.full((m, n), float("nan"), dtype=dtype)  # poison: every element must be written
    y = K.sparse_lora_fwd(x, xa, p.values, p.meta, a, b, 0.75, bias, out=out)
    assert y.data_ptr() == out.data_ptr()
    _check_fwd(y, (x, xa, w, mask, a, b, 0.75, bias), dtype, "sparse_lora forward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
@pytest.mark.parametrize("use", [(True, True), (True, False), (False, True)], ids=["w+lora", "w", "lora"])
def test_dx_kernel_vs_float64(seed, dtype, shape, use):
    m, n, k, r = shape
    w, mask, _, a, b, _ = _operands(m, n, k, r, dtype, bias=False)
    dy = torch.randn(m, n, dtype=torch.float64).to(dtype)
    p = pack_24(w, mask)
    out = torch.full((m, k), float("nan"), dtype=dtype)
    dx = K.sparse_lora_dx(dy, p.values, p.meta, a, b, 1.5, *use, out=out)
    weff = (w.double() if use[0] else 0) + ((b.double() @ a.double()) * 1.5 if use[1] else 0)
    assert_matmul(dx, dy, weff * mask, "sparse_lora dx", dtype=dtype, inner=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dab_kernel_vs_float64(seed, dtype, shape):
    m, n, k, r = shape
    w, mask, _, a, b, x = _operands(m, n, k, r, dtype, bias=False)
    dy = torch.randn(m, n, dtype=torch.float64).to(dtype)
    p = pack_24(w, mask)
    da, db = K.sparse_lora_dab(dy, x, p.meta, a, b, 0.5)
    g = (dy.double().t() @ x.double()) * mask * 0.5
    # dA/dB pass through a [BN, BK] tile of G rounded to the input dtype (inner)
    assert_matmul(da, b.t(), g, "dA", dtype=dtype, inner=dtype)
    assert_matmul(db, g, a.t(), "dB", dtype=dtype, inner=dtype)


def test_kernels_reject_bad_operands():
    w, mask, _, a, b, x = _operands(4, 32, 64, 4, torch.float32)
    p = pack_24(w, mask)
    with pytest.raises(ValueError, match="x has shape"):
        K.sparse_lora_fwd(x[:, :32], None, p.values, p.meta, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        K.sparse_lora_fwd(x, None, p.values, p.meta, a, b[:, :3], 1.0)
    with pytest.raises(ValueError, match="rank"):
        K.sparse_lora_fwd(x, None, p.values, p.meta, a[:0], b[:, :0], 1.0)
    with pytest.raises(ValueError, match="rank"):
        K.sparse_lora_fwd(x, None, p.values, p.meta, torch.zeros(65, 64), torch.zeros(32, 65), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        K.sparse_lora_fwd(x.half(), None, p.values, p.meta, a, b, 1.0)


# ---------------------------------------------------------------------------------------------
# op + autograd (Triton path under the interpreter, and the reference path)
# ---------------------------------------------------------------------------------------------
def _grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("triton_path", [True, False], ids=["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("separate", [False, True], ids=["fused", "dropout-input"])
def test_op_gradients_vs_float64(seed, triton_path, dtype, separate):
    n, k, r, s = 40, 72, 5, 1.7
    w, mask, bias, a, b, _ = _operands(1, n, k, r, dtype)
    x = torch.randn(2, 3, k, dtype=torch.float64).to(dtype)  # 3-D input, M = 6
    xa = torch.randn(2, 3, k, dtype=torch.float64).to(dtype) if separate else None
    dy = torch.randn(2, 3, n, dtype=torch.float64).to(dtype)
    p = pack_24(w, mask)

    def ours(x_, xa_, a_, b_, bias_):
        return sparse_lora_linear(x_, p.values, p.meta, a_, b_, s, bias_, xa_)

    def ref(x_, xa_, a_, b_, bias_):
        weff_upd = (b_ @ a_) * s * mask
        return x_ @ w.double().t() + (x_ if xa_ is None else xa_) @ weff_upd.t() + bias_

    with use_triton_on_cpu(triton_path):
        y, grads = _grads(ours, [x, xa, a, b, bias], dy)
    y64, grads64 = _grads(ref, [t.double() if t is not None else None for t in (x, xa, a, b, bias)], dy.double())
    assert_close(y, y64, "y", dtype=dtype, mag=_ref64(x, xa, w, mask, a, b, s, bias)[1], inner=dtype)
    for name, g, g64 in zip(["x", "xa", "A", "B", "bias"], grads, grads64):
        if g64 is None:
            assert g is None
            continue
        assert_close(g, g64, f"grad {name}", dtype=dtype)


def test_reference_op_gradcheck_and_opcheck():
    # float64 reference path: finite-difference gradcheck and torch.library's own consistency checks
    n, k, r = 8, 16, 3
    w, mask, bias, a, b, x = _operands(5, n, k, r, torch.float64)
    p = pack_24(w, mask)
    args = [t.requires_grad_() for t in (x.clone(), a.clone(), b.clone(), bias.clone())]
    assert torch.autograd.gradcheck(lambda x_, a_, b_, c_: sparse_lora_linear(x_, p.values, p.meta, a_, b_, 0.9, c_), args)
    xa = torch.randn_like(x).requires_grad_()
    assert torch.autograd.gradcheck(lambda xa_, a_, b_: sparse_lora_linear(x, p.values, p.meta, a_, b_, 0.9, None, xa_), [xa, args[1], args[2]])
    torch.library.opcheck(torch.ops.sparselora.sparse_lora_linear.default, (x, None, p.values, p.meta, a, b, 0.9, bias))


# ---------------------------------------------------------------------------------------------
# module, merge, model helpers
# ---------------------------------------------------------------------------------------------
def _pruned_linear(n, k, dtype=torch.float32, buffer=True):
    w, mask, b = random_24(n, k, dtype)
    lin = nn.Linear(k, n, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    if buffer:
        lin.register_buffer("sparse_mask", mask, persistent=False)
    return lin, mask


def _trained(mod):
    with torch.no_grad():
        mod.lora_B.normal_()
    return mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_forward_merge_unmerge(seed, dtype):
    lin, mask = _pruned_linear(48, 64, dtype)
    mod = _trained(SparseLoRALinear.from_linear(lin, r=6, alpha=12, name="layer"))
    x = torch.randn(3, 64, dtype=dtype)
    y = mod(x)
    weff = (lin.weight.double() + (mod.lora_B.double() @ mod.lora_A.double()) * 2.0) * mask
    assert_linear(y, x, weff, lin.bias, "module forward", dtype=dtype, inner=dtype)
    meta0, values0 = mod.meta.clone(), mod.values.clone()
    mod.merge()
    assert torch.equal(mod.meta, meta0), "merge changed the 2:4 mask"
    assert torch.equal(mod.mask(), mask)
    assert not torch.equal(mod.values, values0)
    check_nm(mod.merged_weight())
    assert_linear(mod(x), x, weff, lin.bias, "merged forward", dtype=dtype, inner=dtype)
    mod.unmerge()
    assert torch.equal(mod.values, values0), "unmerge is not exact"
    mod.merge(keep_original=False)
    mod.unmerge()
    assert_close(mod.values, values0.double(), "unmerge by subtraction", dtype=dtype)


def test_to_linear_and_to_sparse_linear(seed):
    lin, mask = _pruned_linear(32, 64)
    mod = _trained(SparseLoRALinear.from_linear(lin, r=4))
    x = torch.randn(5, 64)
    y = mod(x).detach()
    dense = mod.to_linear()
    assert torch.equal(dense.sparse_mask, mask) and not mod.merged
    assert torch.equal((dense.weight != 0) & ~mask, torch.zeros_like(mask))
    assert_close(dense(x), y.double(), "to_linear")
    sl = mod.to_sparse_linear()
    assert isinstance(sl, SparseLinear) and torch.equal(sl.mask(), mask)
    assert_close(sl(x), y.double(), "to_sparse_linear")


def test_dropout_path_trains_adapter_on_dropped_input(seed):
    lin, _ = _pruned_linear(16, 32)
    mod = _trained(SparseLoRALinear.from_linear(lin, r=2, dropout=0.5))
    x = torch.randn(8, 32)
    mod.eval()
    y_eval = mod(x)
    mod.train()
    torch.manual_seed(1)
    y_train = mod(x)
    torch.manual_seed(1)
    xa = nn.functional.dropout(x, 0.5, True)
    ref, mag = _ref64(x, xa, lin.weight.detach(), mod.mask(), mod.lora_A.detach(), mod.lora_B.detach(), mod.scaling, lin.bias.detach())
    assert_close(y_train, ref, "train-mode forward", mag=mag)
    assert not torch.allclose(y_train, y_eval)
    y_train.sum().backward()
    assert mod.lora_A.grad is not None and mod.bias.grad is None  # the base stays frozen


def test_add_and_merge_sparse_lora_on_a_model(seed):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    pruned_buf, _ = _pruned_linear(64, 32)
    pruned_nobuf, mask2 = _pruned_linear(32, 64, buffer=False)  # mask derived from the nonzeros
    model[0], model[2] = pruned_buf, pruned_nobuf
    names = add_sparse_lora(model, r=4, alpha=8)
    assert names == ["0", "2"] and isinstance(model[4], nn.Linear)  # the dense head is left alone
    assert len(lora_parameters(model)) == 4
    for i in (0, 2):
        _trained(model[i])
    x = torch.randn(6, 32)
    y = model(x).detach()
    merge_sparse_lora(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert torch.equal(model[2].sparse_mask, mask2)
    for i in (0, 2):
        check_nm(model[i].weight)
        assert not ((model[i].weight != 0) & ~model[i].sparse_mask).any()
    assert_close(model(x), y.double(), "merged model")


def test_names_filter_and_bad_inputs():
    model = nn.Sequential(_pruned_linear(16, 32)[0], nn.Linear(16, 16))
    with pytest.raises(SparsityError, match="1.weight"):
        add_sparse_lora(copy.deepcopy(model), names=["1"])  # explicitly named, not 2:4
    assert add_sparse_lora(copy.deepcopy(model), names=lambda n, m: n == "0") == ["0"]
    with pytest.raises(ValueError, match="rank"):
        add_sparse_lora(copy.deepcopy(model), r=0)
    bad = _pruned_linear(16, 32)[0]
    bad.sparse_mask[0, :3] = True  # 3 kept in a group of 4
    with pytest.raises(SparsityError, match="not 2:4"):
        SparseLoRALinear.from_linear(bad, name="bad")
    lin = _pruned_linear(16, 32)[0]
    with pytest.raises(ValueError, match="rank"):
        SparseLoRALinear.from_linear(lin, r=0)
    mod = SparseLoRALinear.from_linear(lin, r=2, name="m")
    with pytest.raises(SparsityError, match="m: input has 31 features"):
        mod(torch.randn(2, 31))
    p = pack_24(lin.weight.detach(), lin.sparse_mask)
    with pytest.raises(ValueError, match="lora_A"):
        sparse_lora_linear(torch.randn(2, 32), p.values, p.meta, torch.randn(2, 16), torch.randn(16, 2), 1.0)


def test_distill_lowers_the_loss(seed):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    student = copy.deepcopy(teacher)
    for lin in (student[0], student[2]):
        mask = nm_mask(lin.weight.detach().abs())
        with torch.no_grad():
            lin.weight.mul_(mask)
        lin.register_buffer("sparse_mask", mask, persistent=False)
    add_sparse_lora(student, r=8, alpha=16)
    batches = [torch.randn(16, 32) for _ in range(4)]
    hist = distill(student, teacher, batches, steps=60, lr=1e-2, loss="mse", progress=False)
    assert len(hist["loss"]) == 60
    first, last = sum(hist["loss"][:4]) / 4, sum(hist["loss"][-4:]) / 4
    assert last < 0.6 * first, f"distillation did not reduce the loss enough: {first:.4g} -> {last:.4g}"
    assert all(not p.requires_grad for n, p in student.named_parameters() if "lora_" not in n and "bias" in n)
    merge_sparse_lora(student)
    for lin in (student[0], student[2]):
        check_nm(lin.weight)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 16, 300], ids=str)
def test_gpu_forward_backward_vs_float64(seed, dtype, m):
    n, k, r, s = 768, 1024, 16, 2.0
    w, mask, bias, a, b, _ = _operands(1, n, k, r, dtype)
    w, mask, bias, a, b = (t.cuda() for t in (w, mask, bias, a, b))
    x = torch.randn(m, k, device="cuda", dtype=torch.float64).to(dtype)
    dy = torch.randn(m, n, device="cuda", dtype=torch.float64).to(dtype)
    p = pack_24(w, mask)
    y, (dx, _, da, db, dbias) = _grads(lambda x_, xa_, a_, b_, c_: sparse_lora_linear(x_, p.values, p.meta, a_, b_, s, c_),
                                       [x, None, a, b, bias], dy)
    upd = (b.double() @ a.double()) * s * mask
    weff = w.double() + upd
    assert_linear(y, x, weff, bias, "y", dtype=dtype, inner=dtype)
    assert_matmul(dx, dy, weff, "dx", dtype=dtype, inner=dtype)
    g = (dy.double().t() @ x.double()) * mask * s
    assert_matmul(da, b.t(), g, "dA", dtype=dtype, inner=dtype)
    assert_matmul(db, g, a.t(), "dB", dtype=dtype, inner=dtype)
    # merged forward through the packed op agrees with the fused one
    mod = SparseLoRALinear(p, bias, r=r, alpha=s * r).cuda()
    with torch.no_grad():
        mod.lora_A.copy_(a)
        mod.lora_B.copy_(b)
    y1 = mod(x)
    mod.merge()
    assert torch.equal(mod.meta, p.meta)
    assert_linear(y1, x, weff, bias, "module (fused)", dtype=dtype, inner=dtype)
    assert_linear(mod(x), x, weff, bias, "module (merged)", dtype=dtype, inner=dtype)


def test_reference_path_mask_cache_and_dense_rebuild(seed):
    from sparselora.format import unpack_24
    from sparselora.lora import _dense_of, _mask_of

    w, mask, _ = random_24(24, 64, torch.bfloat16, bias=False)
    w[0, :8] = 0  # kept positions holding 0 must stay kept
    p = pack_24(w, mask)
    m1 = _mask_of(p.meta, p.shape)
    assert torch.equal(m1, mask) and _mask_of(p.meta, p.shape) is m1  # cached
    assert torch.equal(_dense_of(p.values, m1), unpack_24(p))
    # an in-place change (version bump) to another valid pair, (0, 1) or (0, 2), invalidates the cache
    new = 0b1000 if int(p.meta[0, 0]) & 0xF == 0b0100 else 0b0100
    p.meta[0, 0] = (p.meta[0, 0] & ~0xF) | new
    assert not torch.equal(_mask_of(p.meta, p.shape), m1)


def test_module_traces_under_torch_compile(seed):
    # fake implementations + registered autograd: one graph, same values, adapter grads flow
    lin, _ = _pruned_linear(32, 64)
    mod = _trained(SparseLoRALinear.from_linear(lin, r=4, dropout=0.1)).eval()
    x = torch.randn(5, 64)
    ref = mod(x)
    ref.sum().backward()
    grads = {n: p.grad for n, p in mod.named_parameters() if p.grad is not None}
    assert set(grads) == {"lora_A", "lora_B"}
    mod.zero_grad(set_to_none=True)
    y = torch.compile(mod, backend="aot_eager", fullgraph=True)(x)
    y.sum().backward()
    assert torch.equal(y.detach(), ref.detach())
    for n, g in grads.items():  # adapter gradients through the compiled graph: the eager values
        assert_close(getattr(mod, n).grad, g.double(), f"{n}.grad under torch.compile")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 200], ids=str)
def test_gpu_dropout_input_path_vs_float64(seed, m):
    n, k, r, s = 512, 768, 24, 0.5
    dtype = torch.bfloat16
    w, mask, bias, a, b, _ = _operands(1, n, k, r, dtype)
    w, mask, bias, a, b = (t.cuda() for t in (w, mask, bias, a, b))
    x = torch.randn(m, k, device="cuda", dtype=torch.float64).to(dtype)
    xa = torch.randn(m, k, device="cuda", dtype=torch.float64).to(dtype)
    dy = torch.randn(m, n, device="cuda", dtype=torch.float64).to(dtype)
    p = pack_24(w, mask)
    y, (dx, dxa, da, db, _) = _grads(lambda x_, xa_, a_, b_, c_: sparse_lora_linear(x_, p.values, p.meta, a_, b_, s, c_, xa_),
                                     [x, xa, a, b, bias], dy)
    upd = (b.double() @ a.double()) * s * mask
    _check_fwd(y, (x, xa, w, mask, a, b, s, bias), dtype, "y")
    assert_matmul(dx, dy, w, "dx", dtype=dtype)
    assert_matmul(dxa, dy, upd, "dxa", dtype=dtype, inner=dtype)
    g = (dy.double().t() @ xa.double()) * mask * s
    assert_matmul(da, b.t(), g, "dA", dtype=dtype, inner=dtype)
    assert_matmul(db, g, a.t(), "dB", dtype=dtype, inner=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_random_shapes_all_kernels(seed, dtype):
    # shapes drawn from the printed seed: edge sizes (K = 4, N = 1, M past a tile) included
    gen = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]
    for _ in range(3):
        m, n, k, r = pick([1, 2, 17, 65]), pick([1, 3, 17, 40]), pick([4, 12, 100, 260]), pick([1, 7, 64])
        w, mask, bias, a, b, x = _operands(m, n, k, r, dtype)
        dy = torch.randn(m, n, dtype=torch.float64).to(dtype)
        p = pack_24(w, mask)
        y = K.sparse_lora_fwd(x, None, p.values, p.meta, a, b, 0.3, bias, out=torch.full((m, n), float("nan"), dtype=dtype))
        weff = (w.double() + (b.double() @ a.double()) * 0.3) * mask
        assert_linear(y, x, weff, bias, f"y {m}x{n}x{k} r={r}", dtype=dtype, inner=dtype)
        dx = K.sparse_lora_dx(dy, p.values, p.meta, a, b, 0.3, out=torch.full((m, k), float("nan"), dtype=dtype))
        assert_matmul(dx, dy, weff, f"dx {m}x{n}x{k} r={r}", dtype=dtype, inner=dtype)
        da, db = K.sparse_lora_dab(dy, x, p.meta, a, b, 0.3)
        g = (dy.double().t() @ x.double()) * mask * 0.3
        # dA = Bᵀ·G with G = (dyᵀx ⊙ M)·s itself summed in the kernel: the element-wise bound is
        # taken over the whole chain, Σ|B|·(|dy|ᵀ|x| ⊙ M)·s, not over the rounded G alone
        gabs = (dy.double().abs().t() @ x.double().abs()) * mask * 0.3
        assert_close(da, b.double().t() @ g, f"dA {m}x{n}x{k} r={r}", dtype=dtype, inner=dtype, mag=b.double().abs().t() @ gabs)
        assert_close(db, g @ a.double().t(), f"dB {m}x{n}x{k} r={r}", dtype=dtype, inner=dtype, mag=gabs @ a.double().abs().t())


def test_launch_steps_down_when_a_config_does_not_fit_shared_memory():
    # sm_86/sm_89 have 99 KB of shared memory per block: the "large" tiles raise OutOfResources at
    # launch there; the launcher must retry with the medium tiles, remember that, and re-raise
    # only when even the smallest config does not fit
    from triton.runtime.errors import OutOfResources

    from sparselora.triton_kernels import sparse_lora as k

    class FakeKernel:
        def __init__(self, limit_bm):
            self.limit_bm, self.calls, self.attempts = limit_bm, [], 0

        def __getitem__(self, grid):
            def run(*args, BM, BN, BK, num_warps, num_stages, **kw):
                self.attempts += 1
                if BM > self.limit_bm:
                    raise OutOfResources(BM * 1024, self.limit_bm * 1024, "shared memory")
                self.calls.append((grid, BM, BN, BK, kw))
            return run

    dev = torch.device("cpu")
    k._FITS.clear()
    try:
        fake = FakeKernel(limit_bm=64)
        k._launch(fake, "test", k._FWD_CONFIGS, "large", dev, lambda bm, bn, bk: (bn, bm), (), FLAG=1)
        bm, bn, bk = k._FWD_CONFIGS["medium"][:3]
        assert fake.calls == [((bn, bm), bm, bn, bk, {"FLAG": 1})]
        assert k._FITS[("test", "large", None)] == "medium"
        assert fake.attempts == 2  # the large tiles were tried once, then the medium ones
        k._launch(fake, "test", k._FWD_CONFIGS, "large", dev, lambda bm, bn, bk: (bn, bm), ())
        assert fake.attempts == 3 and fake.calls[1][1] == bm  # remembered: no failed attempt first
        with pytest.raises(OutOfResources):
            k._launch(FakeKernel(limit_bm=8), "test2", k._FWD_CONFIGS, "large", dev, lambda bm, bn, bk: (1,), ())
    finally:
        k._FITS.clear()

"""Triton 2:4 GEMV decode kernel (``sparselora.triton_kernels.sparse24_gemv``) against float64
references, and the ``triton-gemv`` backend.

On CPU these run under the Triton interpreter (tests/conftest.py) with its one small config
(8 rows x 32 kept values = 64 dense columns per tile), so the shapes below cross every edge:
M in {1, 3, 16} (BLOCK_M 1, 4 with masked tokens, 16), N not a multiple of 8, K not a multiple
of 64 and K % 32 != 0 (a partial meta word), every dtype, bias / no bias, the fused path and the
split-K path, non-contiguous and batched inputs, and bad inputs. Outputs are NaN-poisoned first,
so an unwritten element fails. The GPU test runs the backend through ``SparseLinear`` at LLaVA
decode shapes (skipped only without CUDA).
"""
import pytest
import torch

from helpers import assert_linear, assert_matmul, odd_layout_inputs, poisoned, random_24
from sparselora.format import pack_24
from sparselora.triton_kernels.sparse24_gemv import GEMV_MAX_M, sparse24_gemv_triton

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (N, K): K=72 -> 36 kept values (2 tiles, the 2nd partial, 3 meta words, the last half used);
# K=40 -> one partial tile; K=136 -> 3 tiles; K=4 -> a single group
SHAPES = [(20, 72), (40, 40), (9, 136), (8, 4)]
# None: automatic; 1: one launch, bias fused; 3: split-K path (fewer splits if K is short)
SPLITS = [None, 1, 3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("split_k", SPLITS)
def test_gemv_matches_float64(seed, dtype, m, n, k, split_k):
    w, _, b = random_24(n, k, dtype, bias=(m + n + k) % 2 == 0)
    p = pack_24(w)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    out = poisoned((m, n), dtype)
    y = sparse24_gemv_triton(x, p.values, p.meta, b, split_k=split_k, out=out)
    assert y.dtype == dtype and y.data_ptr() == out.data_ptr()
    assert_linear(y, x, w, b, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_bias_and_no_bias(seed, dtype, split_k):
    m, n, k = 5, 20, 72
    w, _, b = random_24(n, k, dtype)
    p = pack_24(w)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    for bias in (b, None):
        y = sparse24_gemv_triton(x, p.values, p.meta, bias, split_k=split_k, out=poisoned((m, n), dtype))
        assert_linear(y, x, w, bias, f"bias={bias is not None} split_k={split_k}", dtype=dtype)


def test_split_count_does_not_change_the_result(seed):
    # K = 256 -> 128 kept values -> 4 tiles of 32 in the interpreter: 1, 2, 4 splits (and 64,
    # clipped to 4) must all give the float64 result
    m, n, k = 3, 16, 256
    w, _, b = random_24(n, k, torch.float32)
    p = pack_24(w)
    x = torch.randn(m, k)
    for s in (1, 2, 4, 64):
        y = sparse24_gemv_triton(x, p.values, p.meta, b, split_k=s, out=poisoned((m, n), torch.float32))
        assert_linear(y, x, w, b, f"split_k={s}")


@pytest.mark.parametrize("config", [(4, 16, 1, 1), (16, 64, 4, 1)])
def test_config_override(seed, config):
    # other tiles than the interpreter default: BLOCK_KV = 16 (one meta word per row per tile),
    # and the shipped GPU tile (16 x 64)
    m, n, k = 3, 21, 100
    w, _, b = random_24(n, k, torch.bfloat16)
    p = pack_24(w)
    x = torch.randn(m, k, dtype=torch.float64).to(torch.bfloat16)
    for split_k in (1, 2):
        y = sparse24_gemv_triton(x, p.values, p.meta, b, split_k=split_k, config=config,
                                 out=poisoned((m, n), torch.bfloat16))
        assert_linear(y, x, w, b, f"config={config} split_k={split_k}", dtype=torch.bfloat16)


def test_kept_zero_and_extreme_indices(seed):
    # every group keeps (0, 1) in one row, (2, 3) in another, (0, 3) in a third: the decoded
    # columns hit both ends of each group; a kept position holding 0.0 must still decode
    n, k = 3, 64
    w = torch.zeros(n, k, dtype=torch.float64)
    mask = torch.zeros(n, k, dtype=torch.bool)
    for r, (a, c) in enumerate(((0, 1), (2, 3), (0, 3))):
        mask[r, a::4] = True
        mask[r, c::4] = True
    w[mask] = torch.randn(int(mask.sum()), dtype=torch.float64)
    w[0, 0] = 0.0
    p = pack_24(w.float(), mask=mask)
    x = torch.randn(2, k)
    y = sparse24_gemv_triton(x, p.values, p.meta, None, out=poisoned((2, n), torch.float32))
    assert_linear(y, x, w, None, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gemv_noncontiguous_and_batched_inputs(seed, dtype):
    n, k = 20, 72
    w, _, b = random_24(n, k, dtype)
    p = pack_24(w)
    for x in odd_layout_inputs(k, dtype, rows=4):
        assert not x.is_contiguous() or x.dim() == 3
        for split_k in (1, 3):
            y = sparse24_gemv_triton(x, p.values, p.meta, b, split_k=split_k)
            assert y.shape == (*x.shape[:-1], n)
            assert_linear(y, x, w, b, f"strides {x.stride()} split_k={split_k}", dtype=dtype)


def test_empty_inputs(seed):
    w, _, b = random_24(8, 32, torch.float16)
    p = pack_24(w)
    assert sparse24_gemv_triton(torch.randn(0, 32).half(), p.values, p.meta, b).shape == (0, 8)
    assert sparse24_gemv_triton(torch.randn(2, 0, 32).half(), p.values, p.meta, b).shape == (2, 0, 8)


def test_gemv_specific_bad_inputs_raise_clearly():
    w, _, b = random_24(16, 32, torch.float16)
    p = pack_24(w)
    x = torch.randn(3, 32).half()
    with pytest.raises(ValueError, match=f"17 rows.*at most {GEMV_MAX_M}"):
        sparse24_gemv_triton(torch.randn(17, 32).half(), p.values, p.meta, b)
    with pytest.raises(ValueError, match=r"18 rows \(leading dims \(3, 6\)"):
        sparse24_gemv_triton(torch.randn(3, 6, 32).half(), p.values, p.meta, b)
    # the checks shared with the GEMM launcher: tests/test_triton_gemm.py::test_bad_inputs_raise_clearly
    for bad in ((16, 8, 4, 3), (12, 64, 4, 3), (16, 64, 4), [16, 64, 4, 3]):
        with pytest.raises(ValueError, match="config must be"):
            sparse24_gemv_triton(x, p.values, p.meta, b, config=bad)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sparse24_gemv_triton([1.0], p.values, p.meta, b)


# ---------------------------------------------------------------------------------------------
# registration (CPU)
# ---------------------------------------------------------------------------------------------
def test_gemv_backend_registered_with_reasons():
    import sparselora.backends.triton_gemv_backend  # noqa: F401  (registers on import)
    from sparselora.backends import get_backend

    b = get_backend("triton-gemv")
    assert b.priority == 5 and b.priority < get_backend("triton").priority
    assert b.unavailable_reason() is None
    assert "CUDA device" in b.unsupported_reason(torch.device("cpu"), torch.bfloat16, 64, 64)
    assert "float32" in b.unsupported_reason(torch.device("cuda"), torch.float32, 64, 64)
    assert "multiple of 4" in b.unsupported_reason(torch.device("cuda"), torch.bfloat16, 64, 66)
    assert b.unsupported_reason(torch.device("cuda"), torch.bfloat16, 64, 40) is None
    assert b.unsupported_reason(torch.device("cuda"), torch.float16, 64, 40) is None



def test_gemv_backend_routes_by_rows_and_autograd(monkeypatch):
    # which kernel linear() calls: the GEMV for <= 16 rows without autograd, else the op (GEMM on
    # CUDA, with a backward). Recorded via stand-ins, so this runs on CPU.
    import sparselora.backends.triton_gemv_backend as gb

    calls = []
    monkeypatch.setattr(gb, "sparse24_gemv_triton", lambda x, v, m, b: calls.append("gemv") or x)
    monkeypatch.setattr(gb, "sparse24_linear", lambda x, v, m, b: calls.append("op") or x)
    w, _, b = random_24(8, 32, torch.float16)
    p = pack_24(w)
    backend = gb.TritonGemvBackend()
    bias = torch.nn.Parameter(b)
    cases = [((1, 32), False, "gemv"), ((16, 32), False, "gemv"), ((2, 8, 32), False, "gemv"),
             ((17, 32), False, "op"), ((3, 6, 32), False, "op"), ((4, 32), True, "op")]
    for shape, grad, want in cases:
        calls.clear()
        x = torch.randn(shape).half()
        with torch.set_grad_enabled(grad):
            backend.linear(x, p, {}, bias)
        assert calls == [want], (shape, grad, calls)


def test_gemv_backend_linear_runs_the_real_kernel_with_bias(seed):
    # TritonGemvBackend.linear itself, no stand-ins: the GEMV launcher (interpreter on CPU) for
    # <= 16 rows without autograd, the op otherwise; every path must add the (nonzero) bias
    import sparselora.backends.triton_gemv_backend as gb

    n, k = 20, 72
    w, _, b = random_24(n, k, torch.float16)
    b = b + 2.0  # far from zero: a path that drops or misplaces it is off by ~2 per element
    p = pack_24(w)
    backend = gb.TritonGemvBackend()
    calls = []
    real = gb.sparse24_gemv_triton

    def spy(*args, **kw):
        calls.append("gemv")
        return real(*args, **kw)

    for lead, grad, want in [((1,), False, ["gemv"]), ((16,), False, ["gemv"]), ((2, 3), False, ["gemv"]),
                             ((17,), False, []), ((4,), True, [])]:
        calls.clear()
        x = torch.randn(*lead, k, dtype=torch.float64).to(torch.float16)
        with torch.set_grad_enabled(grad), pytest.MonkeyPatch.context() as mp:
            mp.setattr(gb, "sparse24_gemv_triton", spy)
            y = backend.linear(x.requires_grad_(grad), p, {}, b)
        assert calls == want, (lead, grad, calls)
        assert_linear(y, x.detach(), w, b, f"triton-gemv linear, x {tuple(x.shape)}, grad={grad}")


# ---------------------------------------------------------------------------------------------
# GPU: through SparseLinear at LLaVA-1.5-7B decode shapes (attn q/k/v/o, mlp up/gate, mlp down)
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k", GPU_SHAPES)
def test_gpu_sparse_linear_triton_gemv(seed, dtype, n, k):
    import sparselora.backends.triton_gemv_backend  # noqa: F401
    from sparselora import SparseLinear

    lin = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=dtype)
    w, _, b = random_24(n, k, dtype, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    mod = SparseLinear.from_linear(lin, backend="triton-gemv")
    assert mod.backend.name == "triton-gemv", mod.backend_reason
    for lead in ((1,), (4,), (16,), (2, 8), (40,)):  # (40,): above 16 rows, the GEMM fallback
        x = torch.randn(*lead, k, device="cuda", dtype=torch.float64).to(dtype)
        with torch.no_grad():  # decode: no autograd, so the GEMV kernel itself runs for <= 16 rows
            y = mod(x)
        assert y.shape == (*lead, n)
        assert_linear(y, x, w, b, f"x {tuple(x.shape)}", dtype=dtype)
    # the kernel directly, both paths, poisoned outputs
    x = torch.randn(7, k, device="cuda", dtype=torch.float64).to(dtype)
    for split_k in (None, 1, 4):
        out = torch.full((7, n), float("nan"), device="cuda", dtype=dtype)
        y = sparse24_gemv_triton(x, mod.values, mod.meta, mod.bias.detach(), split_k=split_k, out=out)
        assert_linear(y, x, w, b, f"split_k={split_k}", dtype=dtype)
    # with autograd on, linear() goes through the op (which has a backward)
    xg = torch.randn(2, k, device="cuda", dtype=dtype, requires_grad=True)
    mod(xg).sum().backward()
    assert_matmul(xg.grad, torch.ones(2, n, device="cuda", dtype=dtype), w, "dx through the op", dtype=dtype)



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_odd_shapes_every_m(seed, dtype):
    # shapes off every tile edge on the GPU configs (N % 16, K % 128 and K % 32 != 0), every M,
    # the fused path, forced splits and a non-contiguous x (also the compute-sanitizer subset)
    n, k = 1000, 1004
    w, _, b = random_24(n, k, dtype, device="cuda")
    p = pack_24(w)
    for m in range(1, GEMV_MAX_M + 1):
        x = torch.randn(k, m, device="cuda", dtype=torch.float64).to(dtype).T
        for split_k in (None, 1, 3):
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            y = sparse24_gemv_triton(x, p.values, p.meta, b if m % 2 else None, split_k=split_k, out=out)
            assert_linear(y, x, w, b if m % 2 else None, f"m={m} split_k={split_k}", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# property test: random shapes (K any multiple of 4, tiny N and K included), M, dtypes, paths
# ---------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, GEMV_MAX_M), n=st.integers(1, 40), k4=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), split_k=st.sampled_from(SPLITS), has_bias=st.booleans(),
       seed_=st.integers(0, 2**31 - 1))
def test_property_random_shapes(m, n, k4, dtype, split_k, has_bias, seed_):
    torch.manual_seed(seed_)
    k = 4 * k4
    w, _, b = random_24(n, k, dtype, bias=has_bias)
    p = pack_24(w)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    y = sparse24_gemv_triton(x, p.values, p.meta, b, split_k=split_k, out=poisoned((m, n), dtype))
    assert_linear(y, x, w, b, f"m={m} n={n} k={k} {dtype} split_k={split_k}", dtype=dtype)

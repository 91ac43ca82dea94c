"""Triton 2:4 GEMMs (``sparselora.triton_kernels.sparse24_gemm``) against float64 references.

On CPU these run under the Triton interpreter (tests/conftest.py) with one small config per
path, so shapes are small but cover: M = 1, odd M, M not a multiple of the tile, N not a
multiple of the tile, K not a multiple of BLOCK_K and K % 32 != 0 (meta padding), every dtype,
bias / no bias, non-contiguous and batched inputs, both the split-K and the direct path, the
transposed product, and bad inputs. Outputs are NaN-poisoned first, so an unwritten element
fails. GPU tests (skipped only without CUDA) run the same through ``SparseLinear``, autograd and
``torch.compile`` on larger shapes.
"""
import pytest
import torch

from helpers import assert_close, assert_linear, assert_matmul, odd_layout_inputs, poisoned, random_24
from sparselora.format import SparsityError, pack_24
from sparselora.triton_kernels.sparse24_gemm import sparse24_linear_triton, sparse24_matmul_t_triton

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (M, N, K): interpreter tiles are at most 32 x 32 x 64, so these cross every tile edge
SHAPES = [(1, 64, 96), (5, 40, 72), (17, 48, 40), (33, 96, 128)]
# None: automatic path; 1: direct (no split); 3: split path with 3 K-splits (fewer if K is short)
SPLITS = [None, 1, 3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("split_k", SPLITS)
def test_linear_matches_float64(seed, dtype, m, n, k, split_k):
    w, _, b = random_24(n, k, dtype, bias=(m + n) % 2 == 0)
    p = pack_24(w)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    out = poisoned((m, n), dtype)
    y = sparse24_linear_triton(x, p.values, p.meta, b, split_k=split_k, out=out)
    assert y.dtype == dtype and y.data_ptr() == out.data_ptr()
    assert_linear(y, x, w, b, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [None, 1])
def test_linear_bias_and_no_bias(seed, dtype, split_k):
    m, n, k = 7, 40, 72
    w, _, b = random_24(n, k, dtype)
    p = pack_24(w)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    for bias in (b, None):
        y = sparse24_linear_triton(x, p.values, p.meta, bias, split_k=split_k, out=poisoned((m, n), dtype))
        assert_linear(y, x, w, bias, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_noncontiguous_and_batched_inputs(seed, dtype):
    n, k = 40, 72
    w, _, b = random_24(n, k, dtype)
    p = pack_24(w)
    for x in odd_layout_inputs(k, dtype, rows=9):
        assert not x.is_contiguous() or x.dim() == 3
        for split_k in (None, 1):
            y = sparse24_linear_triton(x, p.values, p.meta, b, split_k=split_k)
            assert y.shape == (*x.shape[:-1], n)
            assert_linear(y, x, w, b, dtype=dtype)


def test_split_path_is_really_split(seed):
    # K = 256 with the interpreter's BLOCK_K = 64 gives 4 K-iterations; 4 splits, 1 each. The
    # result must not depend on how the reduction is split.
    m, n, k = 3, 32, 256
    w, _, b = random_24(n, k, torch.float32)
    p = pack_24(w)
    x = torch.randn(m, k)
    for s in (1, 2, 4, 64):
        y = sparse24_linear_triton(x, p.values, p.meta, b, split_k=s, out=poisoned((m, n), torch.float32))
        assert_linear(y, x, w, b, f"split_k={s}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 64, 96), (5, 40, 72), (33, 72, 64)])
@pytest.mark.parametrize("split_k", SPLITS)
def test_matmul_t_matches_float64(seed, dtype, m, n, k, split_k):
    w, _, _ = random_24(n, k, dtype, bias=False)
    p = pack_24(w)
    dy = torch.randn(m, n, dtype=torch.float64).to(dtype)
    dx = sparse24_matmul_t_triton(dy, p.values, p.meta, split_k=split_k, out=poisoned((m, k), dtype))
    assert dx.dtype == dtype
    assert_matmul(dx, dy, w, dtype=dtype)


def test_matmul_t_noncontiguous_batched(seed):
    n, k = 40, 72
    w, _, _ = random_24(n, k, torch.float16, bias=False)
    p = pack_24(w)
    dy = torch.randn(2, n, 3, dtype=torch.float64).to(torch.float16).transpose(1, 2)
    dx = sparse24_matmul_t_triton(dy, p.values, p.meta)
    assert dx.shape == (2, 3, k)
    assert_matmul(dx, dy, w, dtype=torch.float16)


def test_empty_and_degenerate_inputs(seed):
    w, _, b = random_24(8, 32, torch.float16)
    p = pack_24(w)
    assert sparse24_linear_triton(torch.randn(0, 32).half(), p.values, p.meta, b).shape == (0, 8)
    assert sparse24_matmul_t_triton(torch.randn(2, 0, 8).half(), p.values, p.meta).shape == (2, 0, 32)


@pytest.mark.parametrize("launcher", ["gemm", "gemv"])
def test_bad_inputs_raise_clearly(launcher):
    # both forward launchers share one input check; each must still reach it
    from sparselora.triton_kernels.sparse24_gemv import sparse24_gemv_triton

    fwd = sparse24_linear_triton if launcher == "gemm" else sparse24_gemv_triton
    w, _, b = random_24(16, 32, torch.float16)
    p = pack_24(w)
    x = torch.randn(3, 32).half()
    with pytest.raises(SparsityError, match="input has 40 features"):
        fwd(torch.randn(3, 40).half(), p.values, p.meta, b)
    with pytest.raises(SparsityError, match="dtype"):
        fwd(x.float(), p.values, p.meta, b)
    with pytest.raises(SparsityError, match="meta must be int32"):
        fwd(x, p.values, p.meta.long(), b)
    with pytest.raises(SparsityError, match="bias must be"):
        fwd(x, p.values, p.meta, b[:5])
    with pytest.raises(SparsityError, match="bias dtype"):
        fwd(x, p.values, p.meta, b.float())
    w64 = pack_24(w.double())
    with pytest.raises(SparsityError, match="not supported by the Triton kernels"):
        fwd(x.double(), w64.values, w64.meta, None)
    with pytest.raises(ValueError, match="split_k"):
        fwd(x, p.values, p.meta, b, split_k=0)
    with pytest.raises(SparsityError, match="out must be"):
        fwd(x, p.values, p.meta, b, out=torch.empty(3, 17).half())
    if launcher == "gemv":
        return
    with pytest.raises(SparsityError, match="dy has 15 features"):
        sparse24_matmul_t_triton(torch.randn(3, 15).half(), p.values, p.meta)
    with pytest.raises(SparsityError, match="dy dtype"):
        sparse24_matmul_t_triton(torch.randn(3, 16), p.values, p.meta)
    with pytest.raises(TypeError, match="dy must be a torch.Tensor"):
        sparse24_matmul_t_triton([1.0], p.values, p.meta)


# ---------------------------------------------------------------------------------------------
# GPU: the same through the module, autograd and torch.compile, on larger shapes
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = [(1, 4096, 4096), (7, 1024, 1000), (16, 3584, 3584), (64, 1024, 4096), (300, 768, 1024), (2048, 1024, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
def test_gpu_sparse_linear_uses_triton(seed, dtype, m, n, k):
    from sparselora import SparseLinear

    lin = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=dtype)
    w, mask, b = random_24(n, k, dtype, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    mod = SparseLinear.from_linear(lin, backend="triton")
    assert mod.backend.name == "triton", mod.backend_reason
    x = torch.randn(m, k, device="cuda", dtype=torch.float64).to(dtype)
    assert_linear(mod(x), x, w, b, dtype=dtype)
    for split_k in (1, 4):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        y = sparse24_linear_triton(x, mod.values, mod.meta, mod.bias.detach(), split_k=split_k, out=out)
        assert_linear(y, x, w, b, f"split_k={split_k}", dtype=dtype)
        dy = torch.randn(m, n, device="cuda", dtype=torch.float64).to(dtype)
        dx = sparse24_matmul_t_triton(dy, mod.values, mod.meta, split_k=split_k,
                                      out=torch.full((m, k), float("nan"), device="cuda", dtype=dtype))
        assert_matmul(dx, dy, w, f"matmul_t split_k={split_k}", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_autograd_input_gradient(seed, dtype):
    from sparselora import SparseLinear

    n, k = 1024, 2048
    w, mask, b = random_24(n, k, dtype, device="cuda")
    lin = torch.nn.Linear(k, n, device="cuda", dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    mod = SparseLinear.from_linear(lin, backend="triton")
    for m in (3, 200):
        x = torch.randn(m, k, device="cuda", dtype=torch.float64).to(dtype).requires_grad_()
        dy = torch.randn(m, n, device="cuda", dtype=torch.float64).to(dtype)
        mod(x).backward(dy)
        assert_matmul(x.grad, dy, w, "dx", dtype=dtype)
        assert_close(mod.bias.grad, dy.double().sum(0), "dbias", dtype=dtype, mag=dy.double().abs().sum(0))
        mod.bias.grad = None


@pytest.mark.gpu
def test_gpu_torch_compile_matches_eager(seed):
    from sparselora import SparseLinear

    dtype = torch.bfloat16
    layers = []
    for n, k in ((1024, 512), (512, 1024)):
        w, _, b = random_24(n, k, dtype, device="cuda")
        lin = torch.nn.Linear(k, n, device="cuda", dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        layers.append(SparseLinear.from_linear(lin, backend="triton"))
    model = torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[1])
    compiled = torch.compile(model, fullgraph=True)
    for m in (1, 33, 512):
        x = torch.randn(m, 512, device="cuda", dtype=dtype)
        ref = model(x)
        out = compiled(x)
        # same kernels in both; only the split-K summation order may differ (fp32 atomics)
        assert_close(out, ref.double(), f"compiled vs eager, M={m}", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# registration (CPU): the backend and the ops' CUDA kernels
# ---------------------------------------------------------------------------------------------
def test_triton_backend_registered_with_reasons():
    from sparselora.backends import get_backend

    b = get_backend("triton")
    assert b.priority == 20 and b.unavailable_reason() is None
    assert "CUDA device" in b.unsupported_reason(torch.device("cpu"), torch.bfloat16, 64, 64)
    assert "float32" in b.unsupported_reason(torch.device("cuda"), torch.float32, 64, 64)
    assert "multiple of 4" in b.unsupported_reason(torch.device("cuda"), torch.bfloat16, 64, 66)
    assert b.unsupported_reason(torch.device("cuda"), torch.bfloat16, 64, 40) is None
    assert b.unsupported_reason(torch.device("cuda"), torch.float16, 64, 40) is None


def test_cuda_kernels_of_the_ops_on_cpu(seed):
    # the functions triton_backend registers as the ops' CUDA kernels, called directly on CPU
    # tensors (the launchers run under the interpreter): 16-bit inputs go to the Triton launchers,
    # with the bias; fp32 to the reference
    import sparselora.backends.triton_backend as tb

    n, k, m = 24, 40, 3
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        w, _, b = random_24(n, k, dtype)
        p = pack_24(w)
        x = torch.randn(m, k, dtype=torch.float64).to(dtype)
        assert_linear(tb._sparse24_linear_cuda(x, p.values, p.meta, b), x, w, b, f"linear kernel {dtype}")
        assert_linear(tb._sparse24_linear_cuda(x, p.values, p.meta, None), x, w, None, f"linear kernel {dtype}, no bias")
        dy = torch.randn(m, n, dtype=torch.float64).to(dtype)
        assert_matmul(tb._sparse24_matmul_t_cuda(dy, p.values, p.meta), dy, w, f"matmul_t kernel {dtype}")


def test_ops_have_triton_cuda_kernels():
    import sparselora.backends.triton_backend  # noqa: F401  (registers the kernels)

    for op in ("sparselora::sparse24_linear", "sparselora::sparse24_matmul_t"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


# ---------------------------------------------------------------------------------------------
# property test: random shapes (K any multiple of 4, tiny N and K included) and paths
# ---------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 40), n=st.integers(1, 70), k4=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), split_k=st.sampled_from(SPLITS), has_bias=st.booleans(),
       seed_=st.integers(0, 2**31 - 1))
def test_property_random_shapes(m, n, k4, dtype, split_k, has_bias, seed_):
    torch.manual_seed(seed_)
    k = 4 * k4
    w, _, b = random_24(n, k, dtype, bias=has_bias)
    p = pack_24(w)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    y = sparse24_linear_triton(x, p.values, p.meta, b, split_k=split_k, out=poisoned((m, n), dtype))
    assert_linear(y, x, w, b, dtype=dtype)
    dy = torch.randn(m, n, dtype=torch.float64).to(dtype)
    dx = sparse24_matmul_t_triton(dy, p.values, p.meta, split_k=split_k, out=poisoned((m, k), dtype))
    assert_matmul(dx, dy, w, "dx", dtype=dtype)

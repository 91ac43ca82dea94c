"""Every registered backend that can run here computes the 2:4 linear correctly.

A new backend is tested by registering it: this file asks the registry, not a fixed list. On CPU
that is the reference backend (and any test plugin); on a GPU also triton, triton-gemv,
cusparselt and hybrid, whichever load."""
import pytest
import torch

from helpers import assert_linear, random_24, ref_linear
from sparselora import SparseLinear, list_backends
from sparselora.format import pack_24

SHAPES = [(64, 128), (96, 64), (128, 256)]  # (out_features, in_features): multiples of 16 for cuSPARSELt
TOKENS = [(1,), (7,), (3, 11)]  # M = 1, odd M, and a 3-D input with 33 tokens


def _check_memory_contract(backend, layer, packed, bias):
    """A one-copy backend holds the packed bytes (an own layout may pad small shapes, never to a
    second copy); an own layout gives the canonical one back bit for bit."""
    if backend.copies == 1:
        weight = layer.resident_bytes() - bias.numel() * bias.element_size()
        assert packed.nbytes() <= weight < 2 * packed.nbytes(), f"{backend.name}: {weight} bytes for {packed.nbytes()} packed"
    if backend.resident == "own":
        back = backend.to_canonical(backend.prepare(packed), packed.shape)
        assert back.shape == packed.shape and torch.equal(back.values, packed.values) and torch.equal(back.meta, packed.meta), backend.name
        sd = layer.state_dict()
        assert torch.equal(sd["values"], packed.values) and torch.equal(sd["meta"], packed.meta), backend.name


def _run_all(device, dtype):
    ran = []
    for backend in list_backends():
        if backend.unavailable_reason() is not None:
            continue
        for n, k in SHAPES:
            if backend.unsupported_reason(torch.device(device), dtype, n, k) is not None:
                continue
            w, _, b = random_24(n, k, dtype, device=device)
            packed = pack_24(w)
            layer = SparseLinear(packed, b, backend=backend.name)
            assert layer.backend is backend
            _check_memory_contract(backend, layer, packed, b)
            for lead in TOKENS:
                x = torch.randn(*lead, k, dtype=torch.float64, device=device).to(dtype)
                with torch.inference_mode():  # cuSPARSELt is forward-only
                    y = layer(x)
                assert y.shape == (*lead, n) and y.dtype == dtype
                assert_linear(y, x, w, b, f"backend {backend.name}, {n}x{k}, x {tuple(x.shape)}", dtype=dtype)
            ran.append(backend.name)
    return sorted(set(ran))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_backend_that_runs_on_cpu_matches_float64(dtype, seed):
    assert "reference" in _run_all("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_backend_that_runs_on_cuda_matches_float64(dtype, seed):
    ran = _run_all("cuda", dtype)
    assert "triton" in ran, ran  # the Triton kernels must load wherever there is a GPU


# --- non-finite inputs: one semantics on every backend (sparselora.ops docstring) -------------
# The masked dense model y = x·(W⊙M)ᵀ + b as a dense product: a token with a NaN/±Inf input, at a
# pruned column too (inf·0 = NaN), has a non-finite value in every output; a finite token's
# outputs are finite and match float64. "Agree" = the same set of non-finite output elements
# (NaN versus ±Inf is not specified: kernels that skip pruned columns report NaN).
def _nonfinite_input(n, k, dtype, device, lead):
    """Weights plus an input whose token 1 has +Inf at a column pruned in row 0, token 2 NaN at a
    kept column, token 4 -Inf at a pruned column; the other tokens finite."""
    w, mask, b = random_24(n, k, dtype, device=device)
    x = torch.randn(*lead, k, dtype=torch.float64, device=device).to(dtype)
    flat = x.view(-1, k)
    pruned, kept = (~mask[0]).nonzero()[0, 0], mask[0].nonzero()[0, 0]
    flat[1, pruned] = float("inf")
    flat[2, kept] = float("nan")
    if flat.shape[0] > 4:
        flat[4, (~mask[1]).nonzero()[-1, 0]] = float("-inf")
    return w, b, x


def assert_nonfinite_agrees(y, x, w, b, dtype, what):
    k = x.shape[-1]
    ref = ref_linear(x.reshape(-1, k), w, b).reshape(y.shape)  # float64 dense product
    bad_tokens = ~torch.isfinite(x).all(-1)
    assert bad_tokens.any(), "the test input must have non-finite tokens"
    assert torch.equal(~torch.isfinite(ref), bad_tokens.unsqueeze(-1).expand_as(ref)), "oracle: whole tokens"
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref)), (
        f"{what}: non-finite outputs differ from the masked dense model at tokens "
        f"{(torch.isfinite(y) != torch.isfinite(ref)).any(-1).nonzero().flatten().tolist()}")
    good = ~bad_tokens.reshape(-1)
    assert_linear(y.reshape(-1, y.shape[-1])[good], x.reshape(-1, k)[good], w, b, f"{what}, finite tokens", dtype=dtype)


def _run_all_nonfinite(device, dtype):
    ran = []
    for backend in list_backends():
        if backend.unavailable_reason() is not None:
            continue
        for n, k in SHAPES:
            if backend.unsupported_reason(torch.device(device), dtype, n, k) is not None:
                continue
            for lead in [(5,), (2, 9), (40,)]:  # decode-size M (the GEMV's regime) and larger
                w, b, x = _nonfinite_input(n, k, dtype, device, lead)
                layer = SparseLinear(pack_24(w), b, backend=backend.name)
                with torch.inference_mode():
                    y = layer(x)
                assert_nonfinite_agrees(y, x, w, b, dtype, f"backend {backend.name}, {n}x{k}, x {tuple(x.shape)}")
            ran.append(backend.name)
    return sorted(set(ran))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_backend_that_runs_on_cpu_gives_masked_dense_nonfinite(dtype, seed):
    assert "reference" in _run_all_nonfinite("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_backend_that_runs_on_cuda_gives_masked_dense_nonfinite(dtype, seed):
    assert "triton" in _run_all_nonfinite("cuda", dtype)


def _kernels():
    """The Triton kernels behind the CUDA backends, called directly (on CPU: under the interpreter)."""
    from sparselora.lora import sparse_lora_linear, use_triton_on_cpu
    from sparselora.ops import propagate_nonfinite
    from sparselora.triton_kernels.nonfinite_rows import nan_nonfinite_rows_triton
    from sparselora.triton_kernels.sparse24_gemm import sparse24_linear_triton
    from sparselora.triton_kernels.sparse24_gemv import sparse24_gemv_triton

    def fused_lora(x, p, b):  # B = 0: the adapter adds nothing, the base product is what is tested
        r = 2
        with use_triton_on_cpu():
            return sparse_lora_linear(x, p.values, p.meta, torch.randn(r, x.shape[-1], dtype=x.dtype),
                                      torch.zeros(p.shape[0], r, dtype=x.dtype), 2.0, b)

    return {
        "triton GEMM": lambda x, p, b: sparse24_linear_triton(x, p.values, p.meta, b, split_k=1),
        "triton GEMM split-K": lambda x, p, b: sparse24_linear_triton(x, p.values, p.meta, b, split_k=3),
        "triton GEMV": lambda x, p, b: sparse24_gemv_triton(x, p.values, p.meta, b, split_k=1),
        "triton GEMV split-K": lambda x, p, b: sparse24_gemv_triton(x, p.values, p.meta, b, split_k=3),
        "triton fused SparseLoRA": fused_lora,
        "pruned-skipping + nan_nonfinite_rows_triton": _skip_pruned(nan_nonfinite_rows_triton),
        "pruned-skipping + propagate_nonfinite": _skip_pruned(propagate_nonfinite),
    }


def _skip_pruned(fix):
    """What a kernel that never reads x at pruned columns computes (cuSPARSELt, mma.sp), then ``fix``."""
    def run(x, p, b):
        prod = torch.where(p.mask(), x.unsqueeze(-2).double(), 0.0) * p.to_dense().double()  # [..., N, K]
        return fix((prod.sum(-1) + (b.double() if b is not None else 0)).to(x.dtype), x)
    return run


@pytest.mark.parametrize("kernel", list(_kernels()))
def test_triton_kernels_give_masked_dense_nonfinite(kernel, seed):
    # under the interpreter on CPU (tests/conftest.py); the GPU test above runs them as backends
    run = _kernels()[kernel]
    # the GEMV at M = 5 (BLOCK_M 8: elementwise flag) and M = 16 (per-iteration reduction)
    leads = [(5,), (16,)] if "GEMV" in kernel else [(2, 5)]
    for dtype, lead in [(dt, lead) for dt in (torch.float32, torch.bfloat16) for lead in leads]:
        n, k = 12, 72  # K crosses the interpreter's tiles and ends in a partial meta word
        w, b, x = _nonfinite_input(n, k, dtype, "cpu", lead)
        assert_nonfinite_agrees(run(x, pack_24(w), b), x, w, b, dtype, f"{kernel} {dtype} x {lead}")


def test_the_check_catches_a_kernel_that_skips_pruned_columns(seed):
    # the conformance check can fail: without the fix-up, skipping pruned columns loses the Inf
    w, b, x = _nonfinite_input(24, 136, torch.float32, "cpu", (5,))
    y = _skip_pruned(lambda y, x: y)(x, pack_24(w), b)
    with pytest.raises(AssertionError, match=r"non-finite outputs differ from the masked dense model at tokens \[1, (2, )?4\]"):
        assert_nonfinite_agrees(y, x, w, b, torch.float32, "pruned-skipping, no fix")

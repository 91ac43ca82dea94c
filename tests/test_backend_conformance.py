"""Every registered backend that can run here computes the 2:4 linear correctly.

A new backend is tested by registering it: this file asks the registry, not a fixed list. On CPU
that is the reference backend (and any test plugin); on a GPU also triton, triton-gemv,
cusparselt and hybrid, whichever load."""
import pytest
import torch

from helpers import assert_linear, random_24
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

"""Shared test helpers: float64 references, tolerances (METHOD.md), random 2:4 weights."""
import torch

from sparselora.format import nm_mask

# tolerance per dtype for GEMM-like results compared against a float64 reference:
# (rtol, atol) scaled by sqrt(K) inside assert_close_ref
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def random_24(n, k, dtype=torch.float32, device="cpu", bias=True):
    w = torch.randn(n, k, dtype=torch.float64, device=device)
    mask = nm_mask(w.abs())
    w = (w * mask).to(dtype)
    b = torch.randn(n, dtype=torch.float64, device=device).to(dtype) if bias else None
    return w, mask, b


def assert_close_ref(out, ref64, dtype, k, what="output"):
    """Compare ``out`` with a float64 reference; error scales with sqrt(K) and |ref|."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten/poisoned elements?)"
    eps = TOL[dtype]
    scale = ref64.abs().max().clamp_min(1.0)
    err = (out.double() - ref64).abs().max()
    bound = eps * max(1.0, k ** 0.5) * scale
    assert err <= bound, f"{what}: max abs err {err:.3e} > {bound:.3e} (dtype {dtype}, K={k})"


def ref_linear(x, w, b=None):
    """float64 ``x @ w.T + b``: the oracle for every linear kernel."""
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


def poisoned(shape, dtype, device="cpu"):
    """An output buffer of NaN: any element a kernel fails to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)

"""Shared test helpers: the numerics oracle, float64 references, random 2:4 weights.

The oracle (:func:`assert_close`) compares a result with a float64 reference computed from the
same rounded operands. It checks two things, both of which must hold:

* norm-wise: ``‖out − ref‖ / ‖ref‖ <= REL_TOL[dtype]``. A result computed with fp32
  accumulation and rounded once to ``dtype`` has ``‖out − ref‖ <= u·‖ref‖`` (``u`` the unit
  roundoff: bf16 3.9e-3, fp16 4.9e-4, fp32 6e-8), and kernels that round one intermediate
  (SparseLoRA's ``W + s·B·A`` tile, its ``G`` tile) stay near ``2u`` because those errors are
  random. The bounds sit above that and below every wrong answer of tests/test_oracle.py.
* element-wise, when ``mag`` is given (``Σ|a|·|b|`` per output element, see
  :func:`mag_linear`): ``|out − ref| <= 2u·|ref| + u·|addend| + c·mag``. ``2u·|ref|`` covers the
  final rounding; ``u·|addend|`` a bias added after the accumulator is rounded (a library
  epilogue may do that); ``c·mag`` covers the summation: ``ACC32`` for fp32 accumulation (the error of an
  fp32 sum is a small multiple of ``2^-24·Σ|terms|``; ACC32 is 500 times that, enough for the
  truncating accumulation of tensor cores at K = 16k), or ``2·UNIT[inner]`` when the kernel
  rounds an intermediate operand to ``inner``. Because it is scaled per element rather than by
  ``max|ref|``, a dropped bias or a dropped group of K fails it where the output is small.

Never passes: a shape mismatch, a NaN or inf where the reference is finite (outputs are
NaN-poisoned first, see :func:`poisoned`, so an unwritten element fails), or a nonzero error
against an all-zero reference.
"""
import torch

from sparselora.format import nm_mask

#: bound on ‖out − ref‖ / ‖ref‖ per dtype of the operands and result
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
#: unit roundoff (round to nearest) per dtype
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
#: element-wise allowance per unit of Σ|a|·|b| for a sum accumulated in fp32
ACC32 = 3e-5


def assert_close(out, ref64, what="output", *, dtype=None, mag=None, inner=None, addend=None):
    """Fail unless ``out`` matches the float64 reference ``ref64`` (see the module docstring).

    ``dtype``: the precision the result was computed in (default ``out.dtype``); ``mag``: the
    per-element magnitude ``Σ|a|·|b|`` of the terms summed (enables the element-wise check);
    ``inner``: the dtype of an intermediate operand the kernel rounds (default: none, fp32
    accumulation only); ``addend``: a term (the bias) that may be added after rounding."""
    dtype = dtype or out.dtype
    assert tuple(out.shape) == tuple(ref64.shape), f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    ref64 = ref64.double()
    out64 = out.detach().double().to(ref64.device)
    bad = ~torch.isfinite(out64) & torch.isfinite(ref64)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite values (unwritten/poisoned elements?), first at {first}")
    diff = out64 - ref64
    ref_norm = ref64.norm().item()
    err = diff.norm().item()
    bound = REL_TOL[dtype] * ref_norm
    assert err <= bound, (f"{what}: ‖out − ref‖/‖ref‖ = {err / ref_norm if ref_norm else float('inf'):.3e} "
                          f"> {REL_TOL[dtype]:.1e} ({dtype}, ‖ref‖ = {ref_norm:.3e})")
    if mag is not None:
        c = ACC32 if inner is None else max(ACC32, 2 * UNIT[inner])
        tol = 2 * UNIT[dtype] * ref64.abs() + c * mag.double().to(ref64.device)
        if addend is not None:
            tol = tol + UNIT[dtype] * addend.detach().double().abs().to(ref64.device)
        excess = diff.abs() - tol
        if (excess > 0).any():
            i = int(excess.flatten().argmax())
            idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), excess.shape))
            raise AssertionError(
                f"{what}: {int((excess > 0).sum())} of {excess.numel()} elements exceed 2u·|ref| + u·|addend| + {c:.1e}·Σ|a||b|; "
                f"worst at {idx}: out {out64[idx].item():.6g}, ref {ref64[idx].item():.6g}, "
                f"allowed error {tol[idx].item():.3g} ({dtype})")


def ref_linear(x, w, b=None):
    """float64 ``x @ w.T + b``: the reference for every linear kernel."""
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


def mag_linear(x, w, b=None):
    """float64 ``|x| @ |w|.T + |b|``: the magnitude of the terms each output of ``x @ w.T + b`` sums."""
    return ref_linear(x.double().abs(), w.double().abs(), b.double().abs() if b is not None else None)


def assert_linear(out, x, w, b=None, what="output", *, dtype=None, inner=None):
    """:func:`assert_close` of ``out`` against ``x @ w.T + b`` in float64, with the element-wise
    check."""
    assert_close(out, ref_linear(x, w, b), what, dtype=dtype, mag=mag_linear(x, w, b), inner=inner, addend=b)


def assert_matmul(out, a, b, what="output", *, dtype=None, inner=None):
    """:func:`assert_close` of ``out`` against ``a @ b`` in float64, with the element-wise check
    (``dy @ W``, ``Bᵀ @ G`` ...)."""
    assert_linear(out, a, b.transpose(-1, -2), None, what, dtype=dtype, inner=inner)


def random_24(n, k, dtype=torch.float32, device="cpu", bias=True):
    w = torch.randn(n, k, dtype=torch.float64, device=device)
    mask = nm_mask(w.abs())
    w = (w * mask).to(dtype)
    b = torch.randn(n, dtype=torch.float64, device=device).to(dtype) if bias else None
    return w, mask, b


def poisoned(shape, dtype, device="cpu"):
    """An output buffer of NaN: any element a kernel fails to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


class OneLinear(torch.nn.Module):
    """``lin(x)``: one bias-free Linear holding ``w`` (a model for per-layer pruning tests)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w)

    def forward(self, x):
        return self.lin(x)


def pruned_mlp(first: torch.nn.Linear, second: torch.nn.Linear) -> torch.nn.Sequential:
    """``first``-ReLU-``second`` with both layers magnitude-pruned to 2:4 in place (``sparse_mask``
    attached, as ``prune`` leaves them)."""
    from sparselora.format import nm_mask

    model = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    for lin in (model[0], model[2]):
        mask = nm_mask(lin.weight.detach().abs())
        with torch.no_grad():
            lin.weight.mul_(mask)
        lin.register_buffer("sparse_mask", mask, persistent=False)
    return model


def odd_layout_inputs(k: int, dtype: torch.dtype, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs a kernel must read through their strides: transposed storage (inner stride != 1,
    ``rows`` rows), a column slice of a wider tensor (row stride != K, 6 rows) and a 3-D batch of 6."""
    xt = torch.randn(k, rows, dtype=torch.float64).to(dtype).T
    wide = torch.randn(6, k + 12, dtype=torch.float64).to(dtype)[:, 4:4 + k]
    batch = torch.randn(2, 3, k, dtype=torch.float64).to(dtype)
    return xt, wide, batch


class ResidualStack(torch.nn.Module):
    """``depth`` residual blocks (Linear, GELU[, Dropout]) and a dense head: the smallest model with
    repeated blocks (``find_blocks``) for the distillation and restoration tests."""

    def __init__(self, width=32, depth=3, dropout=0.0):
        super().__init__()
        nn = torch.nn
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU(), *([nn.Dropout(dropout)] if dropout else []))
                                    for _ in range(depth))
        self.head = nn.Linear(width, 8)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def magnitude_24_in_place(model: torch.nn.Module, keep=lambda name, lin: True) -> dict:
    """Prune every plain Linear of ``model`` that ``keep(name, lin)`` selects to 2:4 by magnitude, in
    place, with its ``sparse_mask`` buffer (what ``sparselora.pruning.prune`` leaves): the masks."""
    masks = {}
    for name, lin in model.named_modules():
        if type(lin) is torch.nn.Linear and keep(name, lin):
            mask = nm_mask(lin.weight.detach().abs())
            with torch.no_grad():
                lin.weight.mul_(mask)
            lin.register_buffer("sparse_mask", mask, persistent=False)
            masks[name] = mask
    return masks

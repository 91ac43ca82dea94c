"""SparseLoRA: LoRA whose update is masked by the pruning mask, so merging keeps the 2:4 pattern.

    y = x · ((W + s·B·A) ⊙ M)ᵀ + b,        merge:  W ← (W + s·B·A) ⊙ M   (same mask, exactly)

Three torch.library ops carry the math (each with a reference implementation that runs on any
device, a Triton kernel for CUDA from :mod:`sparselora.triton_kernels.sparse_lora`, and a fake
implementation so ``torch.compile`` traces them):

* ``sparselora::sparse_lora_linear(x, xa, values, meta, A, B, scaling, bias)`` — the forward;
  ``xa`` is the adapter's own input (dropout(x)) or None when the adapter sees x itself.
* ``sparselora::sparse_lora_dx(dy, values, meta, A, B, scaling, use_w, use_lora)`` — input grads.
* ``sparselora::sparse_lora_dab(dy, xa, meta, A, B, scaling)`` — ``(dA, dB)``.

Dropout: with dropout active (training, p > 0) the base sees x and the adapter sees drop(x):
``y = x·Wᵀ + s·drop(x)·((B·A) ⊙ M)ᵀ + b`` — the fused kernel takes both inputs (``SEPARATE``),
there is no fallback path.

The module :class:`SparseLoRALinear` holds the frozen base weight in the canonical packed format
(``values``/``meta``) and the trainable ``lora_A [r, K]`` / ``lora_B [N, r]`` (B zero-initialised
like peft). :func:`add_sparse_lora` / :func:`merge_sparse_lora` convert a pruned model in place.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn as nn

from .format import Packed24, SparsityError, check_nm, mask_from_meta, pack_24, unpack_24, validate_packed
from .ops import _rows, check_linear_inputs, layer_bias, sparse24_linear

__all__ = [
    "SparseLoRALinear",
    "add_sparse_lora",
    "merge_sparse_lora",
    "lora_parameters",
    "sparse_lora_linear",
    "layer_mask",
    "use_triton_on_cpu",
]

# Tests run the Triton kernels on CPU tensors under TRITON_INTERPRET=1 by turning this on; in
# normal use CPU tensors take the reference path (the interpreter is ~1000x slower).
_TRITON_ON_CPU = False


@contextlib.contextmanager
def use_triton_on_cpu(enabled: bool = True):
    """Route CPU tensors through the Triton kernels (needs ``TRITON_INTERPRET=1``); for tests."""
    global _TRITON_ON_CPU
    old, _TRITON_ON_CPU = _TRITON_ON_CPU, enabled
    try:
        yield
    finally:
        _TRITON_ON_CPU = old


def _triton_ok(t: torch.Tensor, rank: int) -> bool:
    from .triton_kernels.sparse_lora import MAX_RANK

    on = t.is_cuda or (_TRITON_ON_CPU and t.device.type == "cpu")
    return on and t.dtype in (torch.float16, torch.bfloat16, torch.float32) and rank <= MAX_RANK


def _kernels():
    from .triton_kernels import sparse_lora as k

    return k


def _check_adapter(values, meta, a, b, dtype, name="sparse_lora"):
    n, k = values.shape[0], 2 * values.shape[1]
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{name}: lora_A and lora_B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    r = a.shape[0]
    if r < 1:
        raise ValueError(f"{name}: rank must be >= 1, got lora_A of shape {tuple(a.shape)}")
    if a.shape != (r, k) or b.shape != (n, r):
        raise ValueError(f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a {n}x{k} weight "
                         f"(expected A [r, {k}], B [{n}, r])")
    if a.dtype != dtype or b.dtype != dtype:
        raise TypeError(f"{name}: lora_A/lora_B dtype {a.dtype}/{b.dtype} != input dtype {dtype} (cast them first)")
    return n, k, r


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------
# The reference path needs the boolean mask of a frozen weight on every call; decoding the 2-bit
# indices dominates small CPU layers, so the mask (1 byte per weight element, not a weight copy)
# is cached per meta tensor, keyed weakly and checked against the tensor's version counter.
_MASKS: dict[int, tuple] = {}


def _mask_of(meta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    # keyed by id (tensors compare elementwise, so they cannot be dict keys); the weakref both
    # proves the id still names the same tensor and evicts the entry when the tensor dies
    key = (meta._version, tuple(shape), meta.device)
    hit = _MASKS.get(id(meta))
    if hit is not None and hit[0]() is meta and hit[1] == key:
        return hit[2]
    mask = mask_from_meta(meta, shape)
    ident = id(meta)
    try:
        ref = weakref.ref(meta, lambda _r, ident=ident: _MASKS.pop(ident, None))
    except TypeError:  # not weakly referenceable: no caching
        return mask
    _MASKS[ident] = (ref, key, mask)
    return mask


def _dense_of(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense W from the kept values: they are stored in row-major order of the kept positions
    (groups ascending, i0 < i1), which is exactly masked_scatter's fill order."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter_(mask, values)


def _ref_forward(x, xa, values, meta, a, b, scaling, bias):
    n, k = values.shape[0], 2 * values.shape[1]
    mask = _mask_of(meta, (n, k))
    return _kernels().reference_fwd(x, xa, _dense_of(values, mask), mask, a, b, scaling, bias)


@torch.library.custom_op("sparselora::sparse_lora_linear", mutates_args=())
def _sparse_lora_linear_op(x: torch.Tensor, xa: Optional[torch.Tensor], values: torch.Tensor, meta: torch.Tensor,
                           lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    n, k = check_linear_inputs(x, values, meta, bias, "sparse_lora_linear")
    _check_adapter(values, meta, lora_A, lora_B, x.dtype)
    if xa is not None and xa.shape != x.shape:
        raise ValueError(f"sparse_lora_linear: adapter input {tuple(xa.shape)} != input {tuple(x.shape)}")
    if _triton_ok(x, lora_A.shape[0]):
        x2 = _rows(x, k)
        xa2 = _rows(xa, k) if xa is not None else None
        y = _kernels().sparse_lora_fwd(x2, xa2, values, meta, lora_A, lora_B, scaling, bias)
        return y.reshape(*x.shape[:-1], n)
    return _ref_forward(x, xa, values, meta, lora_A, lora_B, scaling, bias)


@_sparse_lora_linear_op.register_fake
def _(x, xa, values, meta, lora_A, lora_B, scaling, bias=None):
    n, _ = check_linear_inputs(x, values, meta, bias, "sparse_lora_linear")
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op("sparselora::sparse_lora_dx", mutates_args=())
def _sparse_lora_dx_op(dy: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, use_w: bool, use_lora: bool) -> torch.Tensor:
    n, k = values.shape[0], 2 * values.shape[1]
    dy2 = _rows(dy, n)
    if _triton_ok(dy, lora_A.shape[0]):
        dx = _kernels().sparse_lora_dx(dy2.contiguous(), values, meta, lora_A, lora_B, scaling, use_w, use_lora)
    else:
        mask = _mask_of(meta, (n, k))
        dx = _kernels().reference_dx(dy2, _dense_of(values, mask), mask, lora_A, lora_B, scaling, use_w, use_lora)
    return dx.reshape(*dy.shape[:-1], k)


@_sparse_lora_dx_op.register_fake
def _(dy, values, meta, lora_A, lora_B, scaling, use_w, use_lora):
    return dy.new_empty(*dy.shape[:-1], 2 * values.shape[1])


@torch.library.custom_op("sparselora::sparse_lora_dab", mutates_args=())
def _sparse_lora_dab_op(dy: torch.Tensor, xa: torch.Tensor, meta: torch.Tensor, lora_A: torch.Tensor,
                        lora_B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = lora_B.shape[0], lora_A.shape[1]
    dy2, xa2 = _rows(dy, n), _rows(xa, k)
    if _triton_ok(dy, lora_A.shape[0]):
        return _kernels().sparse_lora_dab(dy2.contiguous(), xa2.contiguous(), meta, lora_A, lora_B, scaling)
    return _kernels().reference_dab(dy2, xa2, _mask_of(meta, (n, k)), lora_A, lora_B, scaling)


@_sparse_lora_dab_op.register_fake
def _(dy, xa, meta, lora_A, lora_B, scaling):
    return torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup(ctx, inputs, output):
    x, xa, values, meta, a, b, scaling, bias = inputs
    ctx.save_for_backward(x, xa, values, meta, a, b)
    ctx.scaling = scaling
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, xa, values, meta, a, b = ctx.saved_tensors
    s = ctx.scaling
    need = ctx.needs_input_grad
    dx = dxa = da = db = dbias = None
    separate = xa is not None
    if need[0]:
        # without dropout the input gradient goes through the merged masked weight in one pass
        dx = _sparse_lora_dx_op(dy, values, meta, a, b, s, True, not separate)
    if separate and need[1]:
        dxa = _sparse_lora_dx_op(dy, values, meta, a, b, s, False, True)
    if need[4] or need[5]:
        da, db = _sparse_lora_dab_op(dy, xa if separate else x, meta, a, b, s)
    if ctx.has_bias and need[7]:
        dbias = _rows(dy, dy.shape[-1]).sum(0)
    return dx, dxa, None, None, da, db, None, dbias


_sparse_lora_linear_op.register_autograd(_backward, setup_context=_setup)


def sparse_lora_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, bias: Optional[torch.Tensor] = None,
                       xa: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x·((W + s·B·A) ⊙ M)ᵀ + b`` with W packed (values, meta); with ``xa`` the adapter reads
    ``xa`` instead of ``x``. A/B are cast to x's dtype here, so fp32 master adapters work."""
    return _sparse_lora_linear_op(x, xa, values, meta, lora_A.to(x.dtype), lora_B.to(x.dtype), float(scaling), bias)


# ---------------------------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------------------------
class SparseLoRALinear(nn.Module):
    """A pruned linear layer (frozen, 2:4-packed) plus a mask-respecting LoRA adapter.

    ``forward``: ``y = x·((W + s·B·A) ⊙ M)ᵀ + b`` (``s = alpha / r``; with dropout in training the
    adapter sees ``dropout(x)``). ``merge()`` folds the adapter into the packed weight keeping the
    same mask bit-exactly (error otherwise); ``unmerge()`` restores the pre-merge weight exactly
    (from a kept copy of the packed values) or, after ``merge(keep_original=False)``, by
    subtracting the update again (rounding may differ in the last bit).
    """

    def __init__(self, packed: Packed24, bias: Optional[torch.Tensor] = None, r: int = 16, alpha: float = 32,
                 dropout: float = 0.0, name: Optional[str] = None):
        super().__init__()
        self.layer_name = name
        label = name or "SparseLoRALinear"
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"{label}: LoRA rank must be a positive integer, got {r!r}")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"{label}: dropout must be in [0, 1), got {dropout}")
        # packed operands enter here: the kernels trust them (sparselora.format, "Validation")
        if validate_packed(packed.values, packed.meta, label) != tuple(packed.shape):
            raise SparsityError(f"{label}: packed tensors do not fit the stated shape {packed.shape}")
        bias = layer_bias(bias, packed.values, label)
        self.out_features, self.in_features = packed.shape
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.register_buffer("values", packed.values)
        self.register_buffer("meta", packed.meta)
        self.register_buffer("_orig_values", None, persistent=False)
        # the base layer is frozen: the bias too (peft's bias="none")
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        dev, dt = packed.values.device, packed.values.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))
        # same init as peft: kaiming-uniform A, zero B, so the adapter starts as the identity change
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None, r: int = 16, alpha: float = 32,
                    dropout: float = 0.0, name: Optional[str] = None) -> "SparseLoRALinear":
        """From a pruned ``nn.Linear``; ``mask`` defaults to :func:`layer_mask` (``sparse_mask``
        buffer, else the weight's nonzeros). The weight must be zero outside the mask."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name or 'layer'}: expected nn.Linear, got {type(linear).__name__}")
        if mask is None:
            mask = layer_mask(linear, name)
        w = linear.weight.detach()
        packed = pack_24(w, mask.to(device=w.device, dtype=torch.bool), name=name)
        return cls(packed, linear.bias.detach() if linear.bias is not None else None, r, alpha, dropout, name)

    # -- views ---------------------------------------------------------------------------------
    @property
    def packed(self) -> Packed24:
        return Packed24(self.values, self.meta, (self.out_features, self.in_features))

    def mask(self) -> torch.Tensor:
        return mask_from_meta(self.meta, (self.out_features, self.in_features))

    def _merged_packed(self) -> Packed24:
        """(W + s·B·A) ⊙ M packed with the same mask; raises if the mask would change."""
        label = self.layer_name or "SparseLoRALinear"
        w = unpack_24(self.packed)
        mask = self.mask()
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        upd = (self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc)) * self.scaling
        merged = ((w.to(acc) + upd) * mask).to(w.dtype)
        packed = pack_24(merged, mask, name=label)
        if not torch.equal(packed.meta, self.meta):
            raise SparsityError(f"{label}: merging changed the 2:4 mask (corrupt meta?); refusing to merge")
        return packed

    # -- merge ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the adapter into the packed weight: W ← (W + s·B·A) ⊙ M with the same mask."""
        if self.merged:
            return
        packed = self._merged_packed()
        self._orig_values = self.values.clone() if keep_original else None
        self.values = packed.values
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._orig_values is not None:
            self.values = self._orig_values
            self._orig_values = None
        else:
            w = unpack_24(self.packed)
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            upd = (self.lora_B.to(acc) @ self.lora_A.to(acc)) * self.scaling
            self.values = pack_24(((w.to(acc) - upd) * self.mask()).to(w.dtype), self.mask()).values
        self.merged = False

    def merged_weight(self) -> torch.Tensor:
        """Dense (W + s·B·A) ⊙ M (the current weight if already merged)."""
        return unpack_24(self.packed if self.merged else self._merged_packed())

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the merged weight and a ``sparse_mask`` buffer (self unchanged)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.merged_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.register_buffer("sparse_mask", self.mask(), persistent=False)
        return lin

    def to_sparse_linear(self, backend: str = "auto"):
        """A :class:`sparselora.SparseLinear` holding the merged packed weight (self unchanged)."""
        from .modules import SparseLinear

        packed = self.packed if self.merged else self._merged_packed()
        return SparseLinear(packed, self.bias.detach() if self.bias is not None else None, backend=backend,
                            name=self.layer_name)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            raise SparsityError(f"{self.layer_name or 'SparseLoRALinear'}: input is a 0-d tensor; expected [..., {self.in_features}]")
        if x.shape[-1] != self.in_features:
            raise SparsityError(f"{self.layer_name or 'SparseLoRALinear'}: input has {x.shape[-1]} features, "
                                f"expected {self.in_features}")
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.merged:
            return sparse24_linear(x, self.values, self.meta, bias)
        xa = self.dropout(x) if (self.training and isinstance(self.dropout, nn.Dropout)) else None
        return sparse_lora_linear(x, self.values, self.meta, self.lora_A, self.lora_B, self.scaling, bias, xa)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, bias={self.bias is not None}, merged={self.merged}")


# ---------------------------------------------------------------------------------------------
# model-level helpers
# ---------------------------------------------------------------------------------------------
def layer_mask(linear: nn.Linear, name: Optional[str] = None) -> torch.Tensor:
    """The 2:4 mask of a pruned layer: its ``sparse_mask`` buffer, else the weight's nonzeros
    (``pack_24(w).mask()``). Raises :class:`SparsityError` if neither is a valid 2:4 mask."""
    label = name or "layer"
    mask = getattr(linear, "sparse_mask", None)
    w = linear.weight.detach()
    if mask is not None:
        if tuple(mask.shape) != tuple(w.shape):
            raise SparsityError(f"{label}: sparse_mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
        mask = mask.to(torch.bool)
        check_nm(mask, 2, 4, f"{label}.sparse_mask")
        # a mask with fewer than 2 kept per group is legal 2:4 but the canonical layout keeps
        # exactly 2: fill up like pack_24 does (towards the lower columns), only if needed
        return pack_24(w * mask, mask, name=label).mask()
    check_nm(w, 2, 4, f"{label}.weight")
    return pack_24(w, name=label).mask()


NameFilter = Union[None, Iterable[str], Callable[[str, nn.Module], bool]]


def _selected(name: str, module: nn.Module, names: NameFilter) -> bool:
    if names is None:
        return True
    if callable(names):
        return bool(names(name, module))
    return any(name == n or name.endswith("." + n) for n in names)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def add_sparse_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                    names: NameFilter = None) -> list[str]:
    """Replace the pruned ``nn.Linear`` layers of ``model`` in place by :class:`SparseLoRALinear`.

    A layer qualifies if it has a ``sparse_mask`` buffer, or (without one) if its weight is already
    2:4. ``names`` filters: None (all), names / name suffixes, or ``fn(name, module) -> bool``. A layer
    selected explicitly by name that is not 2:4 is an error; with ``names=None`` dense layers are
    skipped. Every non-adapter parameter of the replaced layers is frozen. Returns the replaced names.
    """
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"add_sparse_lora: rank must be a positive integer, got {r!r}")
    explicit = names is not None and not callable(names)
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not _selected(name, module, names):
            continue
        has_mask = getattr(module, "sparse_mask", None) is not None
        if not has_mask:
            w = module.weight.detach()
            if w.shape[1] % 4 or bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) > 2).any()):
                if explicit:
                    check_nm(w, 2, 4, f"{name}.weight")  # raises with the offending row/group
                continue
        new = SparseLoRALinear.from_linear(module, layer_mask(module, name), r=r, alpha=alpha, dropout=dropout, name=name)
        new.train(module.training)
        _set_submodule(model, name, new)
        replaced.append(name)
    return replaced


def merge_sparse_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`SparseLoRALinear` by an ``nn.Linear`` holding ``(W + s·B·A) ⊙ M`` and
    its ``sparse_mask`` buffer (exactly 2:4, same mask). Returns ``model`` (changed in place)."""
    if isinstance(model, SparseLoRALinear):
        return model.to_linear()
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLoRALinear):
            _set_submodule(model, name, module.to_linear())
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (``lora_A`` / ``lora_B``) of SparseLoRA and peft LoRA layers."""
    return [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]

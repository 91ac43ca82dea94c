"""SparseLoRA behind peft's ``LoraConfig``: masked LoRA on pruned layers, save/load, merge_and_unload.

Usage::

    from peft import LoraConfig
    from sparselora.peft_interop import get_sparse_lora_model, load_sparse_lora

    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["query", "value"])
    model = get_sparse_lora_model(pruned_model, cfg)     # = get_peft_model with the custom module
    ... train ...
    model.save_pretrained(path)
    model = load_sparse_lora(pruned_model, path)         # = PeftModel.from_pretrained with it
    merged = model.merge_and_unload()                    # pruned layers stay exactly 2:4, same mask

How: :func:`register_sparse_lora` registers :class:`SparseLoraLinear` for ``nn.Linear`` through
``LoraConfig._register_custom_module`` (peft's experimental custom-layer API). The class subclasses
peft's own ``lora.Linear`` and does not override ``__init__``, so whatever constructor signature the
installed peft's dispatcher uses (``config=`` since peft 0.19, individual keyword arguments before)
reaches the matching parent constructor. Supported: peft >= 0.12 (first release with
``_register_custom_module``); tested with peft 0.12, 0.18, 0.19, 0.20 and 0.21 (with transformers 5,
peft 0.13-0.17 do not import at all: they need ``transformers.HybridCache``). Older peft raises a
clear ImportError.

Per layer: a targeted ``nn.Linear`` that is pruned (``sparse_mask`` buffer, else a 2:4 weight) gets
SparseLoRA: forward through ``sparselora::sparse_lora_linear`` (fused Triton kernel on CUDA), merge
adds ``(s·B·A) ⊙ M`` so the weight keeps its mask. The mask is attached to the base layer as a
``sparse_mask`` buffer, so it survives ``merge_and_unload``. A targeted layer that is not pruned
behaves like ordinary peft LoRA. Not supported on pruned layers (clear error): several adapters
active at once, mixed-adapter batches, LoRA variants (DoRA, ...), ``lora_bias``.

Memory: peft keeps the dense base weight; this layer caches one packed copy of it (values + meta,
9/16 of the dense bytes) for the kernels, rebuilt if the base weight changes.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from .format import SparsityError, pack_24
from .lora import layer_mask, sparse_lora_linear

__all__ = ["SparseLoraLinear", "register_sparse_lora", "get_sparse_lora_model", "load_sparse_lora", "PEFT_MIN_VERSION"]

PEFT_MIN_VERSION = "0.12"


def _peft():
    try:
        import peft
        from peft import LoraConfig
    except ImportError as e:  # pragma: no cover - peft is a dependency of this module only
        raise ImportError("sparselora.peft_interop needs peft (pip install peft>=0.12)") from e
    if not hasattr(LoraConfig, "_register_custom_module"):
        raise ImportError(
            f"sparselora.peft_interop needs peft >= {PEFT_MIN_VERSION} (LoraConfig._register_custom_module); "
            f"installed peft is {peft.__version__}"
        )
    return peft


def _base_linear_cls():
    _peft()
    from peft.tuners.lora.layer import Linear

    return Linear


class SparseLoraLinear(_base_linear_cls()):
    """peft ``lora.Linear`` whose update is masked by the base layer's 2:4 mask (see module doc)."""

    # -- the pruned base weight --------------------------------------------------------------
    def _sparse(self):
        """(packed base weight, mask) or None when the base layer is not pruned; cached by the
        weight's identity and version counter (it changes on merge/unmerge)."""
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            return None
        w = base.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        cache = self.__dict__.get("_sparse_cache")
        if cache is not None and cache[0] == key:
            return cache[1]
        name = getattr(self, "_sparse_name", None)
        try:
            mask = layer_mask(base, name)
        except SparsityError:
            if getattr(base, "sparse_mask", None) is not None:
                raise  # a declared mask that is broken is an error, not a silent fallback
            mask = None
        value = None
        if mask is not None:
            if getattr(base, "sparse_mask", None) is None:
                # keep the mask with the layer so merge_and_unload returns it (non-persistent, like
                # the pruner's own buffer)
                base.register_buffer("sparse_mask", mask, persistent=False)
            value = (pack_24(w.detach(), mask, name=name), mask)
        self.__dict__["_sparse_cache"] = (key, value)
        return value

    def _sparse_adapter(self) -> Optional[str]:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return None
        if len(active) > 1:
            raise NotImplementedError(f"SparseLoRA (peft): {len(active)} adapters active on a pruned layer; "
                                      f"activate one (set_adapter) or merge them one by one")
        a = active[0]
        if a in getattr(self, "lora_variant", {}):
            raise NotImplementedError("SparseLoRA (peft): LoRA variants (DoRA, ...) are not supported on pruned layers")
        if getattr(self, "lora_bias", {}).get(a, False):
            raise NotImplementedError("SparseLoRA (peft): lora_bias=True is not supported on pruned layers")
        return a

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sparse = self._sparse()
        if sparse is None or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            raise NotImplementedError("SparseLoRA (peft): mixed-adapter batches (adapter_names=) are not supported")
        adapter = self._sparse_adapter()
        base = self.get_base_layer()
        if adapter is None:
            return base(x, *args, **kwargs)
        packed, _ = sparse
        dtype = base.weight.dtype
        xc = x.to(dtype)
        dropout = self.lora_dropout[adapter]
        # peft semantics: the adapter sees dropout(x), the base sees x
        xa = dropout(xc) if (self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0) else None
        bias = base.bias.to(dtype) if base.bias is not None else None
        return sparse_lora_linear(xc, packed.values, packed.meta, self.lora_A[adapter].weight,
                                  self.lora_B[adapter].weight, self.scaling[adapter], bias, xa)

    # -- merge ---------------------------------------------------------------------------------
    def get_delta_weight(self, adapter) -> torch.Tensor:
        delta = super().get_delta_weight(adapter)
        sparse = self._sparse()
        if sparse is None:
            return delta
        return delta * sparse[1].to(delta.device)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        sparse = self._sparse()
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        if sparse is not None:
            w = self.get_base_layer().weight
            outside = (w != 0) & ~sparse[1].to(w.device)
            if outside.any():
                r, c = outside.nonzero()[0].tolist()
                raise SparsityError(f"SparseLoRA (peft): merged weight has a nonzero outside the 2:4 mask at ({r}, {c})")


def register_sparse_lora(config):
    """Register :class:`SparseLoraLinear` for ``nn.Linear`` on a peft ``LoraConfig`` (returned)."""
    _peft()
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_sparse_lora needs a peft LoraConfig, got {type(config).__name__}")
    if getattr(config, "use_dora", False):
        raise ValueError("SparseLoRA: use_dora=True is not supported (the DoRA magnitude breaks the mask semantics)")
    config._register_custom_module({nn.Linear: SparseLoraLinear})
    return config


def get_sparse_lora_model(model: nn.Module, config, **kwargs):
    """``peft.get_peft_model`` with SparseLoRA on the pruned target layers."""
    peft = _peft()
    return peft.get_peft_model(model, register_sparse_lora(config), **kwargs)


def load_sparse_lora(model: nn.Module, path, **kwargs):
    """``PeftModel.from_pretrained`` of an adapter saved from a SparseLoRA model. The custom-module
    registration is not serialized by peft, so it is re-applied to the loaded config here."""
    _peft()  # clear error on a missing or too old peft
    from peft import LoraConfig, PeftModel

    config = kwargs.pop("config", None) or LoraConfig.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*custom.*")
        return PeftModel.from_pretrained(model, path, config=register_sparse_lora(config), **kwargs)

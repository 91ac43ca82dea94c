"""Training the kept weights of pruned layers in place: the shared pieces of
``restore(method="masked")`` (:mod:`sparselora.restore`) and block-wise reconstruction
(:mod:`sparselora.block_reconstruct`).

A pruned layer is a plain ``nn.Linear`` carrying a ``sparse_mask`` buffer. Its weight trains
with the gradient multiplied by the mask, so the pruned entries never move and the layer keeps
exactly its 2:4 mask (no adapters, nothing to merge).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

__all__ = ["pruned_linears", "masked_layers", "masked_gradients"]


def pruned_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The pruned layers of ``model``: every plain ``nn.Linear`` carrying a ``sparse_mask`` buffer."""
    return {n: m for n, m in model.named_modules()
            if type(m) is nn.Linear and isinstance(getattr(m, "sparse_mask", None), torch.Tensor)}


@contextlib.contextmanager
def masked_gradients(layers: dict[str, nn.Linear]):
    """Each layer's weight gradient is multiplied by its mask while inside; on leaving, the hooks are
    removed and every weight is re-masked (a no-op unless something wrote outside the mask)."""
    hooks = [lin.weight.register_hook(lambda g, m=lin.sparse_mask: g * m.to(g.dtype)) for lin in layers.values()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for lin in layers.values():
                lin.weight.mul_(lin.sparse_mask.to(lin.weight.dtype))


def masked_layers(student: nn.Module, who: str, low_precision: bool = False) -> dict[str, nn.Linear]:
    """The pruned layers of ``student``, checked for in-place training (``who`` names the caller in
    errors): no SparseLoRA adapters, at least one pruned layer, float32/64 weights (any floating
    dtype with ``low_precision``: the caller trains a float32 working copy), a valid mask and no
    nonzero outside it."""
    from .lora import SparseLoRALinear, layer_mask

    if any(isinstance(m, SparseLoRALinear) for m in student.modules()):
        raise ValueError(f"{who}: the student has SparseLoRA adapters; merge them first "
                         "(sparselora.lora.merge_sparse_lora) or use method='sparselora'")
    layers = pruned_linears(student)
    if not layers:
        raise ValueError(f"{who}: the student has no pruned Linear layers (no sparse_mask buffer); prune it first")
    for name, lin in layers.items():
        if not lin.weight.is_floating_point() or (not low_precision and lin.weight.dtype not in (torch.float32, torch.float64)):
            raise ValueError(f"{who}: {name}.weight is {lin.weight.dtype}; the weights train themselves, and "
                             f"updates of ~lr x weight round away in {lin.weight.dtype}: load the student in float32 or use "
                             "method='sparselora'")
        layer_mask(lin, name)  # a valid 2:4 mask, or a SparsityError naming the layer
        if bool(((lin.weight != 0) & ~lin.sparse_mask.bool()).any()):
            raise ValueError(f"{who}: {name}.weight has nonzeros outside its sparse_mask")
    return layers

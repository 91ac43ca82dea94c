"""Pruning models larger than the device: weights of accelerate-dispatched models.

A model dispatched by accelerate (``dispatch_model`` / ``from_pretrained(device_map=...)`` with CPU
or disk offload, ``cpu_offload``, ``disk_offload``) keeps offloaded parameters on the meta device;
an ``AlignDevicesHook`` loads them from its ``weights_map`` onto the execution device for each
forward and drops them afterwards. The calibration forwards go through those hooks unchanged, so at
any time the device holds the module that runs (at most one block with block-level hooks) plus the
activations. What pruning adds is reading and writing one layer's weight outside a forward:

* :func:`layer_weight` onloads the layer (``accelerate.utils.align_module_device`` on the module
  that owns the hook: the layer, or its block) for the duration of a ``with``;
* :func:`store_weight` writes the pruned weight back where the hook reads it: in place into a
  host tensor (CPU offload), or into the offload folder's ``.dat`` file (disk offload; for weights
  that a ``from_pretrained(device_map=...)`` reads from the checkpoint's own safetensors, a new
  ``.dat`` in the offload folder, never the user's checkpoint). Without any folder the pruned weight
  stays in host memory (logged).

The mask stays on the host for offloaded layers: a 1-byte-per-weight mask of every pruned layer
on the device would cost more than the block being pruned.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator, Optional

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def _offload_owner(model: nn.Module, name: str) -> tuple[Optional[nn.Module], str]:
    """The module whose accelerate hook offloads ``name``'s weight (the layer itself or an ancestor),
    and the layer's name relative to it; (None, name) when the layer's weight is resident."""
    parts = name.split(".")
    for k in range(len(parts), -1, -1):
        mod = model.get_submodule(".".join(parts[:k])) if k else model
        hook = _align_hook(mod)
        if hook is not None and getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            return mod, ".".join(parts[k:])
    return None, name


def _align_hook(mod: nn.Module):
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(mod, "_hf_hook", None)
    if isinstance(hook, SequentialHook):
        hook = next((h for h in hook.hooks if isinstance(h, AlignDevicesHook)), None)
    return hook if isinstance(hook, AlignDevicesHook) else None


def is_offloaded(model: nn.Module, name: str) -> bool:
    return "accelerate" in sys.modules and _offload_owner(model, name)[0] is not None


def execution_device(model: nn.Module) -> torch.device:
    """Where the model's forward runs: the accelerate hook's execution device for a dispatched model,
    else the device of its first parameter that is not on meta."""
    hook = _align_hook(model) if "accelerate" in sys.modules and hasattr(model, "_hf_hook") else None
    if hook is not None and hook.execution_device is not None:
        dev = hook.execution_device
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    devmap = getattr(model, "hf_device_map", None)
    if devmap:
        first = next((d for d in devmap.values() if d not in ("disk", "meta")), "cpu")
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def layer_weight(model: nn.Module, name: str, write: bool = False) -> Iterator[nn.Linear]:
    """``with layer_weight(model, name) as lin``: ``lin.weight`` holds real values inside the block
    (onloaded if accelerate offloads it). With ``write=True`` the weight as left at the end of the
    block is stored back into the offload storage before it is dropped."""
    lin = model.get_submodule(name)
    # accelerate not imported: nothing can be dispatched
    owner, rel = _offload_owner(model, name) if "accelerate" in sys.modules else (None, name)
    if owner is None:
        yield lin
        return
    from accelerate.utils import align_module_device

    key = f"{rel}.weight" if rel else "weight"
    with align_module_device(owner):
        yield lin
        if write:
            store_weight(_align_hook(owner).weights_map, key, lin.weight.detach())
            mask = lin._buffers.get("sparse_mask")
            if isinstance(mask, torch.Tensor) and mask.device.type != "cpu":
                lin._buffers["sparse_mask"] = mask.cpu()


def store_weight(weights_map, key: str, value: torch.Tensor) -> None:
    """Write ``value`` where an accelerate hook reads ``key`` of ``weights_map`` from."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    while isinstance(weights_map, PrefixedDataset):
        key, weights_map = weights_map.prefix + key, weights_map.dataset
    value = value.detach()
    if isinstance(weights_map, OffloadedWeightsLoader):
        if key in weights_map.state_dict:
            _copy_into(weights_map.state_dict, key, value)
        elif weights_map.save_folder is not None:
            info = weights_map.index.get(key, {})
            if "safetensors_file" in info:  # the user's checkpoint: never written; a .dat in the offload folder instead
                log.info("pruned weight %s goes to %s (its checkpoint file is left as it was)", key, weights_map.save_folder)
            offload_weight(value, key, weights_map.save_folder, weights_map.index)
        else:
            log.warning("pruned weight %s is kept in host memory: its offload map has no folder to write it to", key)
            weights_map.state_dict[key] = value.cpu().clone()
        return
    _copy_into(weights_map, key, value)


def _copy_into(store, key: str, value: torch.Tensor) -> None:
    old = store.get(key) if hasattr(store, "get") else None
    if isinstance(old, torch.Tensor) and old.shape == value.shape and old.dtype == value.dtype and old.device.type != "meta":
        with torch.no_grad():
            old.copy_(value)
    else:
        store[key] = value.to("cpu").clone()


@contextlib.contextmanager
def host_model_on_device(model: nn.Module, device) -> Iterator[nn.Module]:
    """Calibrate a model that lives on the host on ``device``, one module at a time.

    For the duration, accelerate's ``cpu_offload`` hooks move each module's weights to ``device``
    for its forward only (the host tensors are the offload store: no copy). Afterwards the hooks are
    removed and every parameter and buffer is the host object it was before (pruned in place through
    :func:`store_weight`), ties included."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise ValueError("prune(device=...): the model is already dispatched by accelerate; its hooks decide where it runs "
                         "(pass device=None)")
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False)}
    bad = sorted({p.device.type for p in params.values()} - {"cpu"})
    if bad:
        raise ValueError(f"prune(device=...): the model must live on the host (its parameters are on {', '.join(bad)})")
    cpu_offload(model, execution_device=torch.device(device))
    try:
        yield model
    finally:
        remove_hook_from_module(model, recurse=True)
        for table, attr in ((params, "_parameters"), (buffers, "_buffers")):
            for name, t in table.items():
                mod, _, leaf = name.rpartition(".")
                getattr(model.get_submodule(mod) if mod else model, attr)[leaf] = t

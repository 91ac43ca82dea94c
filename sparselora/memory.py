"""Count the bytes a model really holds: parameters, buffers and backend buffers, each storage once.

Memory is a reason to prune, so every report (``sparsify``'s, the CLI, the demo, the benchmarks)
counts with :func:`resident_bytes`, never with ``parameters()`` alone: a backend's own buffers
(cuSPARSELt's compressed copy, a reordered GPU layout) are registered buffers of the
``SparseLinear`` and are counted like everything else.

:func:`sparse_linear_bytes` is the same count as a formula of the shape, for extrapolating to
models that are too big to build here (the LLaVA-1.5-7B check in the tests uses both).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from .format import packed_nbytes

__all__ = ["resident_bytes", "workspace_bytes", "tensor_bytes", "dense_linear_bytes", "sparse_linear_bytes"]


def _storage_key_and_bytes(t: torch.Tensor) -> tuple[object, int]:
    """A key identifying the memory behind ``t`` and how many bytes that memory takes.

    Views and tied tensors share a storage and are counted once, at the storage's full size (a
    view keeps all of it alive). Meta tensors have no memory to share: each counts its own
    elements."""
    if t.device.type == "meta":
        return ("meta", id(t)), t.numel() * t.element_size()
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr()), storage.nbytes()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by ``tensors``, each underlying storage counted once."""
    seen: dict[object, int] = {}
    for t in tensors:
        if t is None:
            continue
        key, n = _storage_key_and_bytes(t)
        seen[key] = n
    return sum(seen.values())


def resident_bytes(module: nn.Module, device: Optional[torch.device | str] = None) -> int:
    """Bytes ``module`` holds: every parameter and buffer (persistent or not, so backend buffers
    too), each storage once. ``device``: count only tensors on that device (e.g. ``"cuda"``;
    a device type matches every index)."""
    tensors = [*module.parameters(), *module.buffers()]
    if device is not None:
        device = torch.device(device)
        tensors = [t for t in tensors if t.device.type == device.type and (device.index is None or t.device.index == device.index)]
    return tensor_bytes(tensors)


def workspace_bytes(module: nn.Module) -> int:
    """Bytes of the backends' shared scratch memory on the devices ``module``'s sparse layers use
    (e.g. ``mma-sp``'s split-K workspace): each (backend, device) counted once, however many layers
    share it. Not part of :func:`resident_bytes` (no layer owns it); reports add it to the total."""
    seen: dict[tuple, int] = {}
    for m in module.modules():
        backend = getattr(m, "backend", None)
        if backend is None or not hasattr(backend, "workspace_bytes") or not hasattr(m, "weight_device"):
            continue
        device = torch.device(m.weight_device)
        key = (backend.name, device)
        if key not in seen:
            seen[key] = int(backend.workspace_bytes(device))
    return sum(seen.values())


def dense_linear_bytes(out_features: int, in_features: int, dtype: torch.dtype, bias: bool = False) -> int:
    """Bytes of a dense ``nn.Linear``'s parameters (weight, and bias when ``bias``)."""
    size = torch.empty((), dtype=dtype).element_size()
    return size * (out_features * in_features + (out_features if bias else 0))


def sparse_linear_bytes(out_features: int, in_features: int, dtype: torch.dtype, bias: bool = False, copies: int = 1) -> int:
    """Bytes of a ``SparseLinear`` whose backend holds ``copies`` weight copies, each the size of
    the canonical packed weight (values + meta; 9/16 of dense for 16-bit types), plus the bias.

    Exact for one copy (the canonical layout, or an ``own`` layout that is a permutation of it);
    for cuSPARSELt's buffer the second copy is cuSPARSELt's size, about the same."""
    size = torch.empty((), dtype=dtype).element_size()
    return copies * packed_nbytes(out_features, in_features, dtype) + (size * out_features if bias else 0)

"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is stored 2:4-packed."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .backends import Backend, choose_backend
from .format import Packed24, SparsityError, pack_24, unpack_24

__all__ = ["SparseLinear"]


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held in the canonical 2:4 layout.

    Buffers ``values`` / ``meta`` (the canonical layout) are the state dict; a backend may build
    extra, non-persistent buffers of its own layout (see ``Backend.weight_copies``). The backend
    is chosen per layer (``"auto"`` or a registered name) and chosen again if the module moves to
    another device or dtype.
    """

    def __init__(self, packed: Packed24, bias: Optional[torch.Tensor] = None, backend: str = "auto", name: Optional[str] = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.layer_name = name
        self.requested_backend = backend
        self.register_buffer("values", packed.values)
        self.register_buffer("meta", packed.meta)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._extra: dict[str, torch.Tensor] = {}
        self._prepared_for: Optional[tuple] = None
        self.backend: Optional[Backend] = None
        self.backend_reason = ""
        self._prepare()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None, backend: str = "auto", name: Optional[str] = None) -> "SparseLinear":
        """Pack a pruned ``nn.Linear``. With ``mask`` the weight is masked first (the mask must be
        2:4); without, the weight itself must already be 2:4 (else a clear error)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name or 'layer'}: expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if mask is not None:
            if mask.shape != w.shape:
                raise SparsityError(f"{name or 'layer'}: mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
            mask = mask.to(device=w.device, dtype=torch.bool)
            w = w * mask
        packed = pack_24(w, mask, name=name)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(packed, bias, backend=backend, name=name)

    def to_linear(self) -> nn.Linear:
        """The dense equivalent (for debugging and ``unsparsify``)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @property
    def packed(self) -> Packed24:
        return Packed24(self.values, self.meta, (self.out_features, self.in_features))

    def dense_weight(self) -> torch.Tensor:
        return unpack_24(self.packed)

    def mask(self) -> torch.Tensor:
        return self.packed.mask()

    # -- backend ------------------------------------------------------------------------
    def _prepare(self) -> None:
        key = (self.values.device, self.values.dtype)
        choice = choose_backend(key[0], key[1], self.out_features, self.in_features, self.requested_backend)
        if choice.backend is None:
            raise SparsityError(f"{self.layer_name or 'layer'}: {choice.reason}")
        self.backend, self.backend_reason = choice.backend, choice.reason
        self._extra = choice.backend.prepare(self.packed)
        self._prepared_for = key

    def set_backend(self, backend: str) -> None:
        self.requested_backend = backend
        self._prepare()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepared_for != (self.values.device, self.values.dtype):
            self._prepare()
        if x.shape[-1] != self.in_features:
            raise SparsityError(f"{self.layer_name or 'SparseLinear'}: input has {x.shape[-1]} features, expected {self.in_features}")
        return self.backend.linear(x, self.packed, self._extra, self.bias)

    def extra_repr(self) -> str:
        name = self.backend.name if self.backend else "?"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, backend={name}"

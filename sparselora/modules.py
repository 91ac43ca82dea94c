"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is stored 2:4-packed."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .backends import Backend, choose_backend
from .backends.base import RESIDENT_OWN
from .backends.speed import packed_arrival_note
from .format import Packed24, SparsityError, check_packed, pack_24, unpack_24, validate_packed
from .ops import layer_bias

__all__ = ["SparseLinear"]

_BACKEND_PREFIX = "backend_"  # registered names of a backend's buffers: backend_<key>


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held 2:4-packed, one resident copy unless opted in.

    Which buffers hold the weight depends on the backend (``Backend.resident``):

    * ``"canonical"``: buffers ``values`` / ``meta`` (the canonical layout). A backend may add
      buffers of its own layout next to them (``backend_<key>``, not saved): that is a second
      copy (``Backend.copies == 2``), which ``auto`` only picks with ``allow_extra_copy=True``.
    * ``"own"``: only the backend's buffers (``backend_<key>``); ``values`` / ``meta`` do not
      exist and :attr:`packed` rebuilds the canonical form from them (``Backend.to_canonical``).

    Either way the state dict holds the canonical ``values`` / ``meta`` (checkpoints are
    portable between backends and devices), every buffer moves with ``.to()`` and is counted by
    :func:`sparselora.memory.resident_bytes`. The backend is chosen per layer (``"auto"`` or a
    registered name) and chosen again, through the canonical form, if the module moves to
    another device or dtype or :meth:`set_backend` is called.
    """

    def __init__(self, packed: Packed24, bias: Optional[torch.Tensor] = None, backend: str = "auto", name: Optional[str] = None,
                 allow_extra_copy: bool = False):
        super().__init__()
        # packed operands enter here: the kernels trust them (sparselora.format, "Validation")
        if validate_packed(packed.values, packed.meta, name or "SparseLinear") != tuple(packed.shape):
            raise SparsityError(f"{name or 'SparseLinear'}: packed tensors do not fit the stated shape {packed.shape}")
        self.out_features, self.in_features = packed.shape
        self.layer_name = name
        self.requested_backend = backend
        self.allow_extra_copy = bool(allow_extra_copy)
        bias = layer_bias(bias, packed.values, name or "SparseLinear")  # in the weight's dtype, as nn.Linear
        self.bias = nn.Parameter(bias) if bias is not None else None
        self._backend_keys: tuple[str, ...] = ()
        self._dtype = packed.dtype
        self._prepared_for: Optional[tuple] = None
        self.backend: Optional[Backend] = None
        self.backend_reason = ""
        self._install(packed)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None, backend: str = "auto", name: Optional[str] = None,
                    allow_extra_copy: bool = False) -> "SparseLinear":
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
        return cls(packed, bias, backend=backend, name=name, allow_extra_copy=allow_extra_copy)

    def to_linear(self) -> nn.Linear:
        """The dense equivalent (for debugging and ``unsparsify``)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight_device, dtype=self.weight_dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # -- the weight, whatever layout holds it ---------------------------------------------
    @property
    def _own(self) -> bool:
        return self.backend is not None and self.backend.resident == RESIDENT_OWN

    @property
    def _extra(self) -> dict[str, torch.Tensor]:
        """The backend's buffers by the keys its ``prepare`` returned."""
        return {k: self._buffers[_BACKEND_PREFIX + k] for k in self._backend_keys}

    @property
    def packed(self) -> Packed24:
        """The weight in the canonical layout (rebuilt from the backend's layout for ``own``
        backends: a new tensor, so editing it does not change the layer)."""
        shape = (self.out_features, self.in_features)
        if not self._own:
            return Packed24(self.values, self.meta, shape)
        p = self.backend.to_canonical(self._extra, shape)
        if tuple(p.shape) != shape:
            raise SparsityError(f"{self._label()}: backend {self.backend.name!r} rebuilt a {tuple(p.shape)} weight from its "
                                f"layout, expected {shape}")
        return p

    @property
    def weight_device(self) -> torch.device:
        if not self._own:
            return self.values.device
        return next(iter(self._extra.values())).device

    @property
    def weight_dtype(self) -> torch.dtype:
        """The weight's dtype. For ``own`` backends: that of their floating-point buffer (which
        ``module.half()`` and the like cast), else the dtype the weight was prepared with."""
        if not self._own:
            return self.values.dtype
        floating = [t.dtype for t in self._extra.values() if t.is_floating_point()]
        return floating[0] if floating else self._dtype

    def dense_weight(self) -> torch.Tensor:
        return unpack_24(self.packed)

    def mask(self) -> torch.Tensor:
        return self.packed.mask()

    @property
    def weight_copies(self) -> int:
        """How many copies of the weight this layer holds (its backend's ``copies``)."""
        return self.backend.copies

    def resident_bytes(self) -> int:
        """Every byte this layer holds: weight layout(s), backend buffers and bias."""
        from .memory import resident_bytes

        return resident_bytes(self)

    def _label(self) -> str:
        return f"layer '{self.layer_name}'" if self.layer_name else "SparseLinear"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            backend = self.__dict__.get("backend")
            if name in ("values", "meta") and backend is not None and backend.resident == RESIDENT_OWN:
                raise AttributeError(
                    f"{self._label()}: backend {backend.name!r} keeps the weight in its own layout (the one resident copy), "
                    f"so there is no '{name}' buffer; use .packed for the canonical values and meta") from None
            raise

    # -- backend ------------------------------------------------------------------------
    def _key(self) -> tuple:
        return (self.weight_device, self.weight_dtype)

    def _install(self, packed: Packed24) -> None:
        """Choose the backend for ``packed``'s device and dtype and hold the weight as it wants it.
        Everything that can fail (choice, prepare) runs before the current buffers are dropped."""
        choice = choose_backend(packed.device, packed.dtype, self.out_features, self.in_features, self.requested_backend,
                                allow_extra_copy=self.allow_extra_copy)
        if choice.backend is None:
            raise SparsityError(f"{self._label()}: {choice.reason}")
        backend = choice.backend
        extra = dict(backend.prepare(packed))
        if backend.resident == RESIDENT_OWN and not extra:
            raise SparsityError(f"{self._label()}: backend {backend.name!r} is resident='own' but prepare returned no buffers")
        for key in self._backend_keys:
            del self._buffers[_BACKEND_PREFIX + key]
        self._buffers.pop("values", None)
        self._buffers.pop("meta", None)
        if backend.resident != RESIDENT_OWN:
            self.register_buffer("values", packed.values)
            self.register_buffer("meta", packed.meta)
        for key, t in extra.items():  # never saved: the state dict is canonical (see _save_to_state_dict)
            self.register_buffer(_BACKEND_PREFIX + key, t, persistent=False)
        self._backend_keys = tuple(extra)
        note = ""
        if self.requested_backend == "auto":  # say so when the speed policy would have left it dense
            note = packed_arrival_note(packed.device, packed.dtype, self.out_features, self.in_features, backend)
        self.backend, self.backend_reason = backend, choice.reason + note
        self._dtype = packed.dtype
        self._prepared_for = self._key()

    def set_backend(self, backend: str, allow_extra_copy: Optional[bool] = None) -> None:
        """Switch this layer to another backend (through the canonical layout). On failure the
        layer keeps its current backend and buffers."""
        previous = (self.requested_backend, self.allow_extra_copy)
        self.requested_backend = backend
        if allow_extra_copy is not None:
            self.allow_extra_copy = bool(allow_extra_copy)
        try:
            self._install(self.packed)
        except Exception:
            self.requested_backend, self.allow_extra_copy = previous
            raise

    def ensure_backend(self) -> "SparseLinear":
        """Choose the backend again if the module was moved or cast since it was chosen
        (``module.to(...)``, accelerate hooks); ``forward`` does this by itself. Returns self."""
        if self._prepared_for != self._key():
            self._install(self.packed)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_backend()
        if x.dim() == 0:
            raise SparsityError(f"{self.layer_name or 'SparseLinear'}: input is a 0-d tensor; expected [..., {self.in_features}]")
        if x.shape[-1] != self.in_features:
            raise SparsityError(f"{self.layer_name or 'SparseLinear'}: input has {x.shape[-1]} features, expected {self.in_features}")
        if self.bias is not None and self.bias.dtype != x.dtype:
            raise SparsityError(f"{self.layer_name or 'SparseLinear'}: bias dtype {self.bias.dtype} != input dtype {x.dtype}")
        if self._own:
            return self.backend.linear(x, None, self._extra, self.bias, shape=(self.out_features, self.in_features))
        return self.backend.linear(x, self.packed, self._extra, self.bias)

    # -- state dict: always canonical ---------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._own:
            p = self.packed
            destination[prefix + "values"] = p.values if keep_vars else p.values.detach()
            destination[prefix + "meta"] = p.meta if keep_vars else p.meta.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if not self._own:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
            if self._backend_keys:  # the backend's buffers were built from the old values: rebuild on next use
                self._prepared_for = None
            return
        vk, mk = prefix + "values", prefix + "meta"
        rest = {k: v for k, v in state_dict.items() if k not in (vk, mk)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if vk not in state_dict or mk not in state_dict:
            missing_keys.extend(k for k in (vk, mk) if k not in state_dict)
            return
        device, dtype = self.weight_device, self.weight_dtype
        try:
            values = state_dict[vk].to(device=device, dtype=dtype)
            meta = state_dict[mk].to(device=device)
            shape = validate_packed(values, meta, vk)  # the backend's kernels trust what enters here
            if shape != (self.out_features, self.in_features):
                raise SparsityError(f"'{vk}' is a packed {shape[0]}x{shape[1]} weight, the layer is {self.out_features}x{self.in_features}")
            extra = self.backend.prepare(Packed24(values, meta, shape))
            if set(extra) != set(self._backend_keys):
                raise SparsityError(f"backend {self.backend.name!r} prepared buffers {sorted(extra)}, the layer holds {sorted(self._backend_keys)}")
            for key, t in extra.items():
                buf = self._buffers[_BACKEND_PREFIX + key]
                if buf.shape != t.shape or buf.dtype != t.dtype:
                    raise SparsityError(f"backend buffer {key!r} is {t.dtype} {tuple(t.shape)}, the layer holds {buf.dtype} {tuple(buf.shape)}")
            with torch.no_grad():
                for key, t in extra.items():
                    self._buffers[_BACKEND_PREFIX + key].copy_(t)
        except SparsityError as e:
            error_msgs.append(f"{self._label()} ({prefix or 'root'}): {e}")

    def extra_repr(self) -> str:
        name = self.backend.name if self.backend else "?"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={name}, weight_copies={self.backend.copies if self.backend else '?'}")

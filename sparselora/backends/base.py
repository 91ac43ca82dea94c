from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..format import Packed24


class Backend:
    """One way of running ``y = x @ W.T + b`` for a 2:4 weight.

    Subclasses set ``name``, ``priority`` (higher wins in ``auto`` when supported) and
    ``weight_copies`` (how many copies of the weight a module holds with this backend), and
    implement :meth:`unavailable_reason`, :meth:`unsupported_reason`, :meth:`prepare` and
    :meth:`linear`.
    """

    name: str = ""
    priority: int = 0
    weight_copies: str = "1 (canonical packed values + meta)"

    def unavailable_reason(self) -> Optional[str]:
        """None if the backend can run in this process, else why not (missing extension...)."""
        return None

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> Optional[str]:
        """None if this backend takes a weight of this shape/dtype on this device, else why not."""
        return None

    def prepare(self, packed: Packed24) -> dict[str, torch.Tensor]:
        """Backend buffers built once from the canonical packed weight (default: none extra)."""
        return {}

    def linear(self, x: torch.Tensor, packed: Packed24, extra: dict[str, torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def dense_faster_reason(self, device: torch.device, dtype: torch.dtype, out_features: int, in_features: int,
                            tokens: Optional[list[int]] = None) -> Optional[str]:
        """Why dense ``F.linear`` is measured faster than this backend for this layer, or None.

        ``tokens``: the M values (tokens per call) the caller will run; None means "any": then
        only a layer that loses at every measured M counts. The default has no measurements
        and returns None; a backend with a tuning table overrides it (see ``hybrid``).
        """
        return None

    def __repr__(self) -> str:
        return f"<Backend {self.name}>"


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if not backend.name:
        raise ValueError("a backend needs a name")
    _REGISTRY[backend.name] = backend
    return backend


def _load_optional() -> None:
    # Optional backends register on import; importing late keeps `import sparselora` light.
    import importlib

    for mod in ("sparselora.backends.triton_backend", "sparselora.backends.triton_gemv_backend",
                "sparselora.backends.cusparselt_backend", "sparselora.backends.mma_sp_backend"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def get_backend(name: str) -> Backend:
    _load_optional()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; registered: {sorted(_REGISTRY)}") from None


def list_backends() -> list[Backend]:
    _load_optional()
    return sorted(_REGISTRY.values(), key=lambda b: -b.priority)


@dataclass(frozen=True)
class BackendChoice:
    backend: Optional[Backend]  # None: leave the layer dense
    reason: str


def choose_backend(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int, requested: str = "auto") -> BackendChoice:
    """Pick a backend for one layer. An explicit name that cannot run raises with the reason;
    ``auto`` takes the highest-priority backend that runs and supports the layer."""
    device = torch.device(device)
    if requested != "auto":
        b = get_backend(requested)
        why = b.unavailable_reason() or b.unsupported_reason(device, dtype, out_features, in_features)
        if why:
            raise ValueError(f"backend {requested!r} cannot run a {out_features}x{in_features} {dtype} layer on {device}: {why}")
        return BackendChoice(b, f"{requested} (requested)")
    skipped = []
    for b in list_backends():
        why = b.unavailable_reason() or b.unsupported_reason(device, dtype, out_features, in_features)
        if why is None:
            return BackendChoice(b, f"{b.name} (auto" + (f"; skipped {'; '.join(skipped)})" if skipped else ")"))
        skipped.append(f"{b.name}: {why}")
    return BackendChoice(None, "no backend supports it: " + "; ".join(skipped))

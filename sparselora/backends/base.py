from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..format import Packed24


#: ``Backend.resident`` values: where a layer's one copy of the weight lives.
RESIDENT_CANONICAL = "canonical"
RESIDENT_OWN = "own"


class Backend:
    """One way of running ``y = x @ W.T + b`` for a 2:4 weight.

    Subclasses set ``name``, ``priority`` (higher wins in ``auto`` when supported),
    ``resident``, ``copies`` and ``weight_copies``, and implement :meth:`unavailable_reason`,
    :meth:`unsupported_reason`, :meth:`prepare` and :meth:`linear` (and :meth:`to_canonical`
    when ``resident = "own"``).

    Memory (a layer must never hold two copies of its weight silently):

    * ``resident = "canonical"`` (default): the layer keeps the canonical ``values``/``meta``
      buffers and :meth:`prepare` may add buffers next to them.
    * ``resident = "own"``: the buffers :meth:`prepare` returns REPLACE ``values``/``meta``; the
      layer holds only them (one copy) and rebuilds the canonical form with :meth:`to_canonical`
      whenever it needs it (state dict, checkpoints, ``to_linear``, switching backends, moving to
      a device this backend does not take). The layer calls
      ``linear(x, None, extra, bias, shape=(N, K))`` (no canonical weight exists).
    * ``copies``: how many copies of the weight a layer holds (2 for a backend that keeps a
      second layout next to the canonical one, e.g. cuSPARSELt's buffer). ``auto`` never picks
      a backend with ``copies > 1`` unless the caller passes ``allow_extra_copy=True``;
      naming such a backend explicitly is an opt-in too.
    """

    name: str = ""
    priority: int = 0
    resident: str = RESIDENT_CANONICAL
    copies: int = 1
    weight_copies: str = "1 (canonical packed values + meta)"

    def unavailable_reason(self) -> Optional[str]:
        """None if the backend can run in this process, else why not (missing extension...)."""
        return None

    def workspace_bytes(self, device: torch.device) -> int:
        """Bytes of scratch memory this backend keeps on ``device`` for all its layers together
        (not a weight copy, not a layer buffer: :func:`sparselora.memory.workspace_bytes` counts it
        once per device). Default: none."""
        return 0

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> Optional[str]:
        """None if this backend takes a weight of this shape/dtype on this device, else why not."""
        return None

    def prepare(self, packed: Packed24) -> dict[str, torch.Tensor]:
        """Backend buffers built once from the canonical packed weight (default: none extra).

        With ``resident = "own"`` they replace the canonical buffers and must hold the whole
        weight: :meth:`to_canonical` of them gives ``packed`` back bit for bit. Floating-point
        buffers should hold the weight values in the weight's dtype (``module.half()`` casts
        them; the layer takes its dtype from them)."""
        return {}

    def to_canonical(self, extra: dict[str, torch.Tensor], shape: tuple[int, int]) -> Packed24:
        """The exact inverse of :meth:`prepare` for a dense ``shape`` (N, K) (``resident = "own"``
        backends only). It is also called on buffers that ``module.to(...)`` moved or cast."""
        raise NotImplementedError(f"backend {self.name!r} keeps the canonical layout resident; it has no to_canonical")

    def linear(self, x: torch.Tensor, packed: Optional[Packed24], extra: dict[str, torch.Tensor],
               bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The forward. ``packed`` is the canonical weight; a ``resident = "own"`` backend is called
        by ``SparseLinear`` with ``packed=None`` and a keyword ``shape=(N, K)`` instead (benchmarks
        that call it directly may still pass the canonical ``packed``)."""
        raise NotImplementedError

    def dense_faster_reason(self, device: torch.device, dtype: torch.dtype, out_features: int, in_features: int,
                            tokens: Optional[list[int]] = None) -> Optional[str]:
        """Why dense ``F.linear`` is measured faster than this backend for this layer, or None.

        ``tokens``: the M values (tokens per call) the caller will run; None means "any": then
        only a layer that loses at every measured M counts. The default has no measurements
        and returns None; a backend with a tuning table overrides it (see ``hybrid``).
        """
        return None

    def speed_verdict(self, profile: "DeviceProfile", dtype: torch.dtype, out_features: int, in_features: int,
                      tokens: Optional[list[int]] = None) -> Optional["SpeedVerdict"]:
        """Is this backend faster than dense ``F.linear`` for this layer (``auto``'s speed policy,
        :func:`sparselora.backends.speed.choose_for_speed`)? A :class:`SpeedVerdict` saying which
        source decided (a measured table or a documented prior), or None: nothing known (the
        layer then stays sparse when nothing before it said dense). ``tokens`` as in
        :meth:`dense_faster_reason`. The default turns :meth:`dense_faster_reason` into a verdict."""
        why = self.dense_faster_reason(profile.device, dtype, out_features, in_features, tokens)
        return SpeedVerdict(True, "measured", why) if why else None

    def __repr__(self) -> str:
        return f"<Backend {self.name}>"


@dataclass(frozen=True)
class DeviceProfile:
    """What the speed policy knows of the device a layer sits on (resolved once per layer, by
    :func:`device_profile`; tests simulate a GPU by replacing that function)."""

    device: torch.device
    kind: str  # torch device type: "cpu", "cuda", ...
    name: str = ""  # torch.cuda.get_device_name for CUDA, "" elsewhere
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability, (0, 0) elsewhere


def device_profile(device) -> DeviceProfile:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceProfile(device, "cuda", torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))
    return DeviceProfile(device, device.type)


@dataclass(frozen=True)
class SpeedVerdict:
    """A backend's answer to "faster than dense for this layer?"."""

    dense_faster: bool
    source: str  # "measured" (a per-device table written by a tuning run) or "prior" (documented, unmeasured)
    detail: str  # which table or which prediction, and what it says

    def text(self, backend: str) -> str:
        side = "dense F.linear faster" if self.dense_faster else "faster than dense"
        return f"{backend} {side} ({self.source}: {self.detail})"


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if not backend.name:
        raise ValueError("a backend needs a name")
    if backend.resident not in (RESIDENT_CANONICAL, RESIDENT_OWN):
        raise ValueError(f"backend {backend.name!r}: resident must be {RESIDENT_CANONICAL!r} or {RESIDENT_OWN!r}, "
                         f"got {backend.resident!r}")
    if not isinstance(backend.copies, int) or backend.copies < 1:
        raise ValueError(f"backend {backend.name!r}: copies must be a positive int, got {backend.copies!r}")
    if backend.resident == RESIDENT_OWN:
        if type(backend).to_canonical is Backend.to_canonical:
            raise ValueError(f"backend {backend.name!r}: resident='own' needs to_canonical(extra), the inverse of prepare")
        if backend.copies != 1:
            raise ValueError(f"backend {backend.name!r}: resident='own' replaces the canonical copy, so copies must be 1")
    _REGISTRY[backend.name] = backend
    return backend


def _load_optional() -> None:
    # Optional backends register on import; importing late keeps `import sparselora` light.
    import importlib

    for mod in ("sparselora.backends.triton_backend", "sparselora.backends.triton_gemv_backend",
                "sparselora.backends.cusparselt_backend", "sparselora.backends.hybrid_backend",
                "sparselora.backends.mma_sp_backend"):
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
    dense_is_faster: bool = False  # None backend because of the speed policy, not because nothing supports the layer


def extra_copy_reason(backend: Backend) -> str:
    return (f"holds {backend.copies} copies of the weight; allow_extra_copy=True (CLI: --allow-extra-copy) "
            f"or naming it accepts that")


def choose_backend(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int, requested: str = "auto",
                   allow_extra_copy: bool = False) -> BackendChoice:
    """Pick a backend for one layer. An explicit name that cannot run raises with the reason;
    ``auto`` takes the highest-priority backend that runs and supports the layer and holds one
    copy of the weight (``copies == 1``), or any number of copies with ``allow_extra_copy``.
    An explicit name is an opt-in: it is honoured whatever its ``copies``."""
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
        if why is None and b.copies > 1 and not allow_extra_copy:
            why = extra_copy_reason(b)
        if why is None:
            return BackendChoice(b, f"{b.name} (auto" + (f"; skipped {'; '.join(skipped)})" if skipped else ")"))
        skipped.append(f"{b.name}: {why}")
    return BackendChoice(None, "no backend supports it: " + "; ".join(skipped))

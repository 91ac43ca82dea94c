"""Swap pruned ``nn.Linear`` layers of a model for packed 2:4 modules, and back.

``sparsify(model)`` is the one call between pruning and serving, in the spirit of torchao's
``sparsify_`` and Liger-Kernel's per-model patch functions: it finds the pruned layers (those
carrying a ``sparse_mask`` buffer, or the ones you name whose weights are already 2:4),
validates them, chooses a backend per layer and replaces each by a
:class:`sparselora.SparseLinear`. Layers a kernel cannot take (odd shapes, dtypes no backend
runs, tied weights) stay dense and the report says why: the patcher never lets a shape reach
a kernel that would fail on it.

Validation happens for every selected layer *before* the first module is swapped, so a
failing call leaves the model exactly as it was.

A layer left dense after its mask was validated (``auto`` found no backend faster than dense, or
none runs it) drops its bool ``sparse_mask`` buffer (1 byte per weight element, half a bf16
weight; inference does not read it) unless ``keep_dense_masks=True``. Its weight is exactly zero
outside the mask, so :func:`sparselora.lora.layer_mask` recovers a 2:4 mask from the nonzeros (the
same mask wherever a group has two nonzeros); the layer is marked ``sparse_mask_dropped`` so a later
``sparsify(model)`` (e.g. with other ``tokens``) still takes it. Nothing saved depends on the
buffer: it is not persistent, so checkpoints never held it. Keep it when the layer will be
restored (SparseLoRA) again and its mask must stay exactly the pruning mask even in groups whose
kept weights are zero. Layers left dense before their mask was checked (shape, dtype, tied
weights, inside ``nn.MultiheadAttention``) keep whatever they carry.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .backends import choose_backend
from .backends.speed import choose_for_speed
from .format import SUPPORTED_DTYPES, SparsityError, check_nm, pack_24
from .memory import dense_linear_bytes, resident_bytes, workspace_bytes
from .modules import SparseLinear

__all__ = ["sparsify", "unsparsify", "SparsifyReport", "LayerReport", "sparse_layers"]


@dataclass
class LayerReport:
    """One row of a :class:`SparsifyReport`."""

    name: str
    part: str  # vision / projector / language / head / other
    shape: tuple[int, int]  # (out_features, in_features)
    dtype: str
    action: str  # "sparse" (swapped), "dense" (left dense, see reason), "lora" (SparseLoRALinear kept as is)
    backend: str  # backend name, "" when dense
    reason: str
    dense_bytes: int  # the dense layer's parameters (weight + bias)
    resident_bytes: int  # every byte the layer holds now: parameters and buffers, backend buffers included
    weight_copies: int = 1  # copies of the weight the layer holds (2: canonical + a backend's own layout)


class SparsifyReport:
    """What :func:`sparsify` did, per layer, and what each layer holds in memory."""

    def __init__(self, rows: list[LayerReport], workspace_bytes: int = 0):
        self.rows = rows
        self.workspace_bytes = workspace_bytes  # backends' shared scratch (memory.workspace_bytes), once per device

    @property
    def sparse(self) -> list[str]:
        return [r.name for r in self.rows if r.action == "sparse"]

    @property
    def dense(self) -> list[str]:
        return [r.name for r in self.rows if r.action == "dense"]

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.rows)

    def totals(self) -> dict:
        dense = sum(r.dense_bytes for r in self.rows)
        now = sum(r.resident_bytes for r in self.rows)
        return {"layers": len(self.rows), "sparse": len(self.sparse), "left_dense": len(self.dense),
                "lora": sum(r.action == "lora" for r in self.rows),
                "extra_copy": sum(r.action == "sparse" and r.weight_copies > 1 for r in self.rows),
                "dense_bytes": dense, "resident_bytes": now, "ratio": (now / dense) if dense else float("nan"),
                "workspace_bytes": self.workspace_bytes}

    def summary(self) -> str:
        t = self.totals()
        backends: dict[str, int] = {}
        for r in self.rows:
            if r.action == "sparse":
                backends[r.backend] = backends.get(r.backend, 0) + 1
        per = ", ".join(f"{k}: {v}" for k, v in sorted(backends.items())) or "none"
        s = (f"sparsified {t['sparse']}/{t['layers']} layers (backends: {per}); "
             f"resident {_mib(t['dense_bytes'])} dense -> {_mib(t['resident_bytes'])} ({t['ratio']:.3f}x, every buffer counted)")
        if t["workspace_bytes"]:
            s += f"; plus {_mib(t['workspace_bytes'])} of backend workspace (per device, shared by the layers; not a weight copy)"
        if t["extra_copy"]:
            s += (f"; {t['extra_copy']} layers hold 2 copies of their weight (canonical + backend layout: "
                  f"the backend was named or allow_extra_copy=True)")
        if t["left_dense"]:
            s += f"; {t['left_dense']} left dense (see report)"
        if t["lora"]:
            s += f"; {t['lora']} SparseLoRALinear kept"
        return s

    def to_markdown(self) -> str:
        """The per-layer table; each distinct reason is written once, below it, and rows refer to it."""
        notes: dict[str, int] = {}
        lines = ["| layer | part | shape | dtype | action | backend | copies | reason | dense bytes | resident bytes |",
                 "|---|---|---|---|---|---|---:|---|---:|---:|"]
        for r in self.rows:
            ref = f"[{notes.setdefault(r.reason, len(notes) + 1)}]" if r.reason else "-"
            copies = r.weight_copies if r.action == "sparse" else "-"
            lines.append(f"| {r.name} | {r.part} | {r.shape[0]}x{r.shape[1]} | {r.dtype} | {r.action} | {r.backend or '-'} | "
                         f"{copies} | {ref} | {r.dense_bytes} | {r.resident_bytes} |")
        lines += ["", self.summary()]
        if notes:
            lines += ["", "Reasons:", ""] + [f"[{i}] {reason}" for reason, i in notes.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"totals": self.totals(), "rows": [asdict(r) for r in self.rows]}

    def __repr__(self) -> str:
        return f"SparsifyReport({self.summary()})"


def _param_bytes(lin: nn.Module) -> int:
    """Bytes of a dense layer's own parameters (weight + bias)."""
    return sum(p.numel() * p.element_size() for p in lin.parameters(recurse=False))


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _part_fn(model: nn.Module, family):
    from .families import get_family

    try:
        fam = get_family(model, family)
    except ValueError:
        if family is not None:
            raise
        return lambda name: "other"  # unknown model (e.g. a BERT encoder): parts are only a label here
    return fam.classify


def _lora_class():
    # SparseLoRA lives in another part of the project; the patcher works without it
    try:
        from .lora import SparseLoRALinear
    except ImportError:
        return None
    return SparseLoRALinear


def _mha_children(model: nn.Module) -> set[str]:
    # F.multi_head_attention_forward reads out_proj.weight directly: its Linear must stay a Linear
    out = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            for sub, _ in mod.named_modules():
                if sub:
                    out.add(f"{name}.{sub}" if name else sub)
    return out


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip)


def _tied_params(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it is reachable by (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """The :class:`SparseLinear` modules of ``model``, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def _select(model, names, parts, family, skip):
    """Candidate layers, candidates inside nn.MultiheadAttention (never swapped), and whether the
    layers were named explicitly."""
    mha = _mha_children(model)
    if names is None and parts is None:
        chosen = {n: m for n, m in model.named_modules()
                  if (isinstance(m, nn.Linear) and (isinstance(getattr(m, "sparse_mask", None), torch.Tensor)
                                                    or getattr(m, "sparse_mask_dropped", False))) or _is_lora(m)}
        explicit = False
    else:
        chosen = {}
        if parts is not None:
            from .families import linear_layers

            chosen.update(linear_layers(model, parts, family=family, skip=skip))
        if names is not None:
            modules = dict(model.named_modules())
            for n in names:
                if n not in modules:
                    raise KeyError(f"sparsify: no module named {n!r} in {type(model).__name__}")
                if not isinstance(modules[n], (nn.Linear, SparseLinear)) and not _is_lora(modules[n]):
                    raise TypeError(f"sparsify: {n!r} is a {type(modules[n]).__name__}, not an nn.Linear")
                chosen[n] = modules[n]
        explicit = True
    out, in_mha = {}, {}
    for n, m in chosen.items():
        if _skipped(n, skip) or isinstance(m, SparseLinear):
            continue
        (in_mha if n in mha else out)[n] = m
    return out, in_mha, explicit


def _is_lora(m) -> bool:
    cls = _lora_class()
    return cls is not None and isinstance(m, cls)


def _layer_mask(name: str, lin: nn.Linear, explicit: bool) -> torch.Tensor:
    """The layer's 2:4 mask; raise SparsityError naming the layer if it is not 2:4."""
    w = lin.weight.detach()
    mask = getattr(lin, "sparse_mask", None)
    if isinstance(mask, torch.Tensor):
        if mask.shape != w.shape:
            raise SparsityError(f"layer '{name}': sparse_mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
        mask = mask.to(device=w.device, dtype=torch.bool)
        check_nm(mask, 2, 4, f"sparse_mask of layer '{name}'")
        outside = (w != 0) & ~mask
        if outside.any():
            r, c = outside.nonzero()[0].tolist()
            raise SparsityError(
                f"layer '{name}': weight has {int(outside.sum())} nonzeros outside its sparse_mask (first at row {r}, "
                f"column {c}); it was changed after pruning: re-apply the mask (weight.mul_(sparse_mask)) or prune again")
        return mask
    # no mask: the weight itself must be 2:4 (only reachable when layers were named explicitly)
    return pack_24(w, name=f"layer '{name}'").mask()


def sparsify(model: nn.Module, backend: str = "auto", names: Optional[Iterable[str]] = None, parts: Optional[Iterable[str]] = None,
             family=None, skip: Iterable[str] = (), on_unsupported: str = "dense",
             tokens: Optional[int | Iterable[int]] = None, allow_extra_copy: bool = False,
             keep_dense_masks: bool = False) -> SparsifyReport:
    """Replace the pruned ``nn.Linear`` layers of ``model`` by :class:`SparseLinear`, in place.

    Args:
        model: any ``nn.Module`` (a transformers VLM, a BERT encoder, a bare MLP...).
        backend: ``"auto"`` (per layer, the fastest backend that supports it) or a registered name.
        names: exact module names to sparsify. Their weights must be 2:4 already (or carry a
            ``sparse_mask``); anything else is a :class:`SparsityError` naming the layer.
        parts: model parts (``"vision"``, ``"language"``, ...) via the family registry; same rule.
            With neither ``names`` nor ``parts``, every ``nn.Linear`` with a ``sparse_mask`` buffer is taken.
        family: family name or :class:`sparselora.families.Family` (default: from ``model.config``).
        skip: module names (exact, prefix or suffix such as ``"lm_head"``) to leave alone.
        on_unsupported: ``"dense"`` leaves a layer no backend can run dense, with the reason in the
            report; ``"raise"`` raises instead.
        tokens: with ``backend="auto"``, the tokens per call (M) the model will run, e.g.
            ``[1, 8]`` for decode or ``4096`` for prefill. ``auto`` takes, per layer, a backend
            only where its measured per-device table (or, without one, its documented
            conservative prior) says it beats dense ``F.linear`` at every one of them; otherwise
            the layer stays dense (an ``nn.Linear``, holding nothing sparse) and the report says
            which table or prior decided (:mod:`sparselora.backends.speed`). ``None`` leaves
            dense only layers that lose at every M. On CPU nothing is measured and layers are
            packed. An explicit backend is always honoured.
        allow_extra_copy: let ``auto`` pick backends that hold a second copy of the weight next to
            the canonical one (``Backend.copies == 2``: ``cusparselt``, ``hybrid``; about 1.125x the
            dense bytes instead of 0.5625x for 16-bit weights). Off by default: memory is a reason
            to prune. Naming such a backend in ``backend=`` is an opt-in too.
        keep_dense_masks: keep the ``sparse_mask`` buffer of layers left dense after their mask was
            validated (default: drop it, module docstring; the report counts what is kept).

    The report counts every byte each layer holds afterwards (parameters, buffers and backend
    buffers, :func:`sparselora.memory.resident_bytes`) against its dense parameters.

    Layers that are already ``SparseLoRALinear`` (adapters attached) are kept and reported; merge them
    first (``merge_sparse_lora``) to get packed layers. Children of ``nn.MultiheadAttention`` are never
    touched. Raises before changing anything if any selected layer is not 2:4.
    """
    if on_unsupported not in ("dense", "raise"):
        raise ValueError(f"on_unsupported must be 'dense' or 'raise', got {on_unsupported!r}")
    if backend != "auto":
        from .backends import get_backend

        get_backend(backend)  # an unknown name is a usage error, not a reason to leave layers dense
    skip = tuple(skip)
    if tokens is not None:
        tokens = [int(tokens)] if isinstance(tokens, int) else [int(t) for t in tokens]
        if not tokens or min(tokens) < 1:
            raise ValueError(f"sparsify: tokens must be positive token counts per call, got {tokens}")
    names = list(names) if names is not None else None
    parts = list(parts) if parts is not None else None
    classify = _part_fn(model, family)
    candidates, in_mha, explicit = _select(model, names, parts, family, skip)
    tied = _tied_params(model)
    lora_cls = _lora_class()

    rows: list[LayerReport] = []
    for name, lin in in_mha.items():
        rows.append(LayerReport(name, classify(name), tuple(lin.weight.shape), str(lin.weight.dtype).replace("torch.", ""), "dense", "",
                                "inside nn.MultiheadAttention, whose forward reads .weight directly", _param_bytes(lin), resident_bytes(lin)))
    planned = []
    validated_dense = []  # (lin, row): mask checked, layer left dense
    for name, lin in candidates.items():
        if lora_cls is not None and isinstance(lin, lora_cls):
            rows.append(_lora_row(name, lin, classify(name)))
            continue
        w = lin.weight
        out_f, in_f = w.shape
        row = LayerReport(name, classify(name), (out_f, in_f), str(w.dtype).replace("torch.", ""), "dense", "", "",
                          _param_bytes(lin), resident_bytes(lin))
        rows.append(row)

        def leave_dense(reason: str) -> None:
            if on_unsupported == "raise":
                raise SparsityError(f"layer '{name}' ({out_f}x{in_f}, {row.dtype}): {reason}")
            row.reason = reason

        # shape first: an in_features that is not a multiple of 4 cannot hold a 2:4 pattern at all
        if in_f % 4:
            leave_dense(f"in_features={in_f} is not a multiple of 4 (no 2:4 groups)")
            continue
        if w.dtype not in SUPPORTED_DTYPES:
            leave_dense(f"dtype {w.dtype} is not a packable dtype {SUPPORTED_DTYPES}")
            continue
        others = [n for n in tied.get(id(w), []) if n != f"{name}.weight"]
        if others:
            leave_dense(f"weight is tied to {others[0]} (packing would untie it)")
            continue
        mask = _layer_mask(name, lin, explicit)
        try:
            if backend == "auto":  # the speed policy: a sparse backend only where it beats dense
                choice = choose_for_speed(w.device, w.dtype, out_f, in_f, tokens, allow_extra_copy=allow_extra_copy)
            else:
                choice = choose_backend(w.device, w.dtype, out_f, in_f, backend, allow_extra_copy=allow_extra_copy)
        except ValueError as e:  # explicit backend that cannot run this layer
            leave_dense(str(e))
            validated_dense.append((lin, row))
            continue
        if choice.backend is None:
            if choice.dense_is_faster:  # a speed decision, not an unsupported layer: never raises
                row.reason = choice.reason
            else:
                leave_dense(choice.reason)
            validated_dense.append((lin, row))
            continue
        # the layer re-chooses on .to()/casts: keep "auto" when the policy took auto's own pick
        as_named = backend
        if backend == "auto":
            plain = choose_backend(w.device, w.dtype, out_f, in_f, "auto", allow_extra_copy=allow_extra_copy).backend
            as_named = "auto" if plain is choice.backend else choice.backend.name
        planned.append((name, lin, mask, row, as_named, choice.reason))

    # every layer validated: now drop unneeded masks, build and swap (SparseLinear construction packs and prepares)
    if not keep_dense_masks:
        for lin, row in validated_dense:
            if "sparse_mask" in lin._buffers:
                del lin._buffers["sparse_mask"]
                lin.sparse_mask_dropped = True
                row.reason += "; sparse_mask dropped (recoverable from the weight; keep_dense_masks=True keeps it)"
                row.resident_bytes = resident_bytes(lin)
    built = []
    for name, lin, mask, row, as_named, reason in planned:
        new = SparseLinear.from_linear(lin, mask=mask, backend=as_named, name=name, allow_extra_copy=allow_extra_copy)
        new.train(lin.training)
        built.append((name, new, row, reason if backend == "auto" else new.backend_reason))
    for name, new, row, reason in built:
        _set_module(model, name, new)
        row.action, row.backend, row.reason = "sparse", new.backend.name, reason
        row.resident_bytes, row.weight_copies = resident_bytes(new), new.weight_copies
    if built and "transformers" in sys.modules:  # a transformers model: save_pretrained writes the packed format
        from .hf_quantizer import attach

        attach(model, backend=backend)
    return SparsifyReport(rows, workspace_bytes(model))


def _lora_row(name: str, mod: nn.Module, part: str) -> LayerReport:
    out_f = getattr(mod, "out_features", 0)
    in_f = getattr(mod, "in_features", 0)
    w = getattr(mod, "values", getattr(mod, "weight", None))  # SparseLoRALinear holds the canonical values
    dtype = str(w.dtype).replace("torch.", "") if isinstance(w, torch.Tensor) else "?"
    dense = dense_linear_bytes(out_f, in_f, w.dtype, getattr(mod, "bias", None) is not None) if isinstance(w, torch.Tensor) else 0
    return LayerReport(name, part, (out_f, in_f), dtype, "lora", "", "SparseLoRALinear kept as is (merge_sparse_lora first to pack it)",
                       dense, resident_bytes(mod))


def unsparsify(model: nn.Module) -> list[str]:
    """Replace every :class:`SparseLinear` by a dense ``nn.Linear`` (weight zero outside the mask)
    carrying the ``sparse_mask`` buffer, so that ``sparsify(model)`` packs it again. For debugging;
    returns the names replaced."""
    done = []
    for name, mod in list(sparse_layers(model).items()):
        lin = mod.to_linear()
        lin.register_buffer("sparse_mask", mod.mask(), persistent=False)
        lin.train(mod.training)
        _set_module(model, name, lin)
        done.append(name)
    if not sparse_layers(model) and "transformers" in sys.modules:
        from .hf_quantizer import detach

        detach(model)  # nothing packed left: save_pretrained writes a plain dense directory again
    return done

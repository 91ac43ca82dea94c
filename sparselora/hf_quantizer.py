"""transformers-native 2:4 checkpoints: ``from_pretrained`` / ``save_pretrained`` with packed layers.

Importing sparselora registers the quantization method ``"sparselora"`` with transformers
(``register_quantization_config`` / ``register_quantizer``). Then, for a directory written by
``save_pretrained`` of a sparsified model::

    model = AutoModelForImageTextToText.from_pretrained(packed_dir, device_map="cuda", dtype="auto")

builds the model on the meta device, replaces every packed layer (named in ``config.json``'s
``quantization_config.sparse_layers``) by a meta-device packed slot, lets transformers stream the
packed tensors in (its device map, dtype and key renamings apply as for any weight), then turns
each slot into a :class:`~sparselora.SparseLinear` sharing the loaded tensors. The dense weight of a
packed layer never exists, on the host or on a device. A ``device_map`` that offloads to disk
leaves packed layers whole in host memory (their tensors are buffers, which accelerate does not
offload unless ``offload_buffers=True``, refused by name).

On disk (``model*.safetensors``), a packed layer ``L`` is ``L.weight`` = the canonical packed
values ``[N, K/2]`` and ``L.weight_meta`` = the int32 in-group indices (see :mod:`sparselora.format`),
plus ``L.bias``. Storing the values under the dense name is deliberate: transformers without
sparselora does not know the method (it only warns and skips unknown ones), but it then finds
``L.weight`` with half the expected columns and refuses the directory with a size-mismatch error
instead of loading random weights. Every tensor's sha256 is in the safetensors header
(``sparselora_checksums``) and is checked in one streamed pass over the shards (16 MiB at a time)
before any weight is loaded, so a damaged file is named and nothing is half-loaded.

``save_pretrained`` writes this format for a model that :func:`sparselora.sparsify` packed (it
attaches the quantizer, :func:`attach`) or that was loaded this way.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Optional

import torch
import torch.nn as nn
# submodules, not the package: this module may be imported while transformers.quantizers is
# still initialising (registration runs right after transformers.quantizers.auto executes)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .format import Packed24, SparsityError, check_packed
from .modules import SparseLinear
from .stream_io import release_freed_heap

__all__ = ["QUANT_METHOD", "FORMAT_VERSION", "SparseLoraConfig", "SparseLoraHfQuantizer", "PackedSlot", "attach", "detach", "is_packed_dir",
           "register"]

logger = logging.getLogger(__name__)

QUANT_METHOD = "sparselora"
FORMAT_VERSION = 1
CHECKSUMS_KEY = "sparselora_checksums"
META_SUFFIX = "weight_meta"




class SparseLoraConfig(QuantizationConfigMixin):
    """``quantization_config`` of a 2:4-packed checkpoint.

    Args:
        sparse_layers: ``{module name: [out_features, in_features]}`` of the packed layers, in the
            model's own module names (as ``model.named_modules()`` gives them).
        pattern: ``"2:4"`` (the only pattern the format has).
        format_version: readers refuse versions they do not know.
        backend: backend for the loaded layers (``"auto"`` or a registered name).
        allow_extra_copy: let ``auto`` pick a backend holding a second copy of each weight
            (cuSPARSELt, hybrid; see :func:`sparselora.sparsify`). Off by default.
    """

    def __init__(self, sparse_layers: Optional[dict] = None, pattern: str = "2:4", format_version: int = FORMAT_VERSION,
                 backend: str = "auto", quant_method: str = QUANT_METHOD, allow_extra_copy: bool = False, **kwargs):
        self.quant_method = QUANT_METHOD
        if quant_method != QUANT_METHOD:
            raise ValueError(f"SparseLoraConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if pattern != "2:4":
            raise ValueError(f"SparseLoraConfig: pattern {pattern!r} is not supported (only '2:4')")
        if int(format_version) != FORMAT_VERSION:
            raise ValueError(f"SparseLoraConfig: format_version {format_version} is not supported by this sparselora "
                             f"(reads version {FORMAT_VERSION}); upgrade sparselora")
        self.sparse_layers = {str(k): [int(v[0]), int(v[1])] for k, v in (sparse_layers or {}).items()}
        self.pattern = pattern
        self.format_version = int(format_version)
        self.backend = backend
        self.allow_extra_copy = bool(allow_extra_copy)
        if kwargs:
            logger.info("SparseLoraConfig: ignoring unknown keys %s", sorted(kwargs))

    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": QUANT_METHOD, "format_version": self.format_version, "pattern": self.pattern,
             "backend": self.backend, "sparse_layers": dict(sorted(self.sparse_layers.items()))}
        if self.allow_extra_copy:
            d["allow_extra_copy"] = True
        return d


class PackedSlot(nn.Module):
    """A packed layer while transformers loads it: buffers named as the file names them
    (``weight`` = packed values, ``weight_meta``), so the standard loader fills them in; then
    :meth:`to_sparse_linear` wraps the very same tensors."""

    def __init__(self, out_features: int, in_features: int, bias: bool, dtype: torch.dtype, device="meta"):
        super().__init__()
        if in_features % 4:
            raise SparsityError(f"packed layer {out_features}x{in_features}: in_features is not a multiple of 4")
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer(META_SUFFIX, torch.empty(out_features, -(-in_features // 32), dtype=torch.int32, device=device))
        # a buffer too: a device_map that offloads to disk offloads parameters only (unless
        # offload_buffers=True), so the packed layer stays whole in host memory
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x):  # only reachable if postprocessing was skipped
        raise RuntimeError("PackedSlot is a loading placeholder; from_pretrained turns it into SparseLinear")

    def to_sparse_linear(self, name: str, backend: str, allow_extra_copy: bool = False) -> SparseLinear:
        values, meta = self.weight, getattr(self, META_SUFFIX)
        for t, what in ((values, "weight"), (meta, META_SUFFIX), (self.bias, "bias")):
            if t is not None and t.device.type == "meta":
                raise SparsityError(f"packed layer '{name}': '{what}' was not loaded (still on the meta device). A packed layer "
                                    f"cannot be offloaded to disk (offload_buffers=True does that); keep it on a device or the CPU")
        try:
            n, k = check_packed(values, meta, name)
        except SparsityError as e:
            raise SparsityError(f"packed layer '{name}': {e}") from None
        if (n, k) != (self.out_features, self.in_features):
            raise SparsityError(f"packed layer '{name}': loaded tensors describe {n}x{k}, config says {self.out_features}x{self.in_features}")
        bias = self.bias
        mod = SparseLinear(Packed24(values.data if isinstance(values, nn.Parameter) else values, meta, (n, k)), bias, backend=backend, name=name,
                           allow_extra_copy=allow_extra_copy)
        mod.train(self.training)
        return mod


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _renamed_checksums(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Checksums keyed by the names the file will hold: save_pretrained reverts transformers'
    weight renamings (e.g. LLaVA's legacy ``language_model.model.*``) after this hook runs."""
    from .stream_io import tensor_sha256

    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(state))
    except ImportError:
        reverted = state
    return {k: tensor_sha256(t) for k, t in reverted.items()}


class SparseLoraHfQuantizer(HfQuantizer):
    """The transformers quantizer of the ``"sparselora"`` method (pre-packed checkpoints only)."""

    requires_calibration = True  # packing needs pruned weights: there is no on-the-fly mode
    quantization_config: SparseLoraConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._names: list[str] = []

    # -- loading ------------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            logger.info("sparselora: packed layers are not disk-offloaded; those the device_map puts on disk stay in host memory")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        layers = self.quantization_config.sparse_layers
        modules = dict(model.named_modules())
        prefix = getattr(model, "base_model_prefix", "") or ""
        self._names = []
        absent = []
        for saved_name, (n, k) in layers.items():
            # the class that saved may wrap the one loading (or the reverse): transformers adds or
            # strips base_model_prefix for the tensors, so the layer names follow the same rule
            candidates = [saved_name]
            if prefix:
                candidates += [saved_name[len(prefix) + 1:]] if saved_name.startswith(prefix + ".") else [f"{prefix}.{saved_name}"]
            name = next((c for c in candidates if c in modules), None)
            if name is None:
                absent.append(saved_name)
                continue
            mod = modules[name]
            if not isinstance(mod, nn.Linear):
                raise SparsityError(f"sparselora checkpoint: packed layer '{name}' is a {type(mod).__name__} in "
                                    f"{type(model).__name__}, expected nn.Linear")
            if tuple(mod.weight.shape) != (n, k):
                raise SparsityError(f"sparselora checkpoint: packed layer '{name}' is {n}x{k} in the config but "
                                    f"{mod.weight.shape[0]}x{mod.weight.shape[1]} in the model")
            _set_module(model, name, PackedSlot(n, k, mod.bias is not None, mod.weight.dtype, device=mod.weight.device))
            self._names.append(name)
        if absent:  # as transformers does for tensors of modules this class lacks: say so, load the rest
            logger.warning("sparselora: %d packed layers of the checkpoint are not part of %s (first: '%s'); they are not loaded",
                           len(absent), type(model).__name__, absent[0])
        if checkpoint_files:
            _verify_checksums(checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name in self._names:
            slot = model.get_submodule(name)
            if isinstance(slot, PackedSlot):
                cfg = self.quantization_config
                _set_module(model, name, slot.to_sparse_linear(name, cfg.backend, getattr(cfg, "allow_extra_copy", False)))
                release_freed_heap()  # the layer's validation temporaries (see stream_io)
        return model

    # -- saving -------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}  # patch imports this module
        lora = [n for n, m in model.named_modules() if type(m).__name__ == "SparseLoRALinear"]
        if lora:
            raise SparsityError(f"save_pretrained: {len(lora)} layers carry SparseLoRA adapters (first: '{lora[0]}'); "
                                "merge them first (sparselora.merge_sparse_lora) or save the adapters with their own API")
        self.quantization_config.sparse_layers = {n: [m.out_features, m.in_features] for n, m in layers.items()}
        state = model.state_dict()
        for name in layers:
            state[f"{name}.weight"] = state.pop(f"{name}.values")
            state[f"{name}.{META_SUFFIX}"] = state.pop(f"{name}.meta")
        checksums = _renamed_checksums(model, state)
        packed_in_file = sum(k.endswith("." + META_SUFFIX) for k in checksums)
        if packed_in_file != len(layers):
            raise SparsityError(f"save_pretrained: transformers' checkpoint conversion for {type(model).__name__} changes packed "
                                f"layers ({packed_in_file} of {len(layers)} kept their packed tensors); this model cannot be saved packed")
        import sparselora

        meta = {CHECKSUMS_KEY: json.dumps(checksums, sort_keys=True), "sparselora_version": sparselora.__version__,
                "sparselora_format_version": str(FORMAT_VERSION)}
        return state, meta

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _verify_checksums(checkpoint_files) -> None:
    """Stream every shard once (16 MiB at a time) and compare each tensor with its stored sha256."""
    from .stream_io import hash_file_tensors, read_header

    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            raise SparsityError(f"sparselora checkpoint: {file} is not a safetensors file")
        try:
            meta, infos = read_header(file)
        except ValueError as e:
            raise SparsityError(f"sparselora checkpoint: {e}") from None
        stored = meta.get(CHECKSUMS_KEY)
        if not stored:
            raise SparsityError(f"sparselora checkpoint: {file} has no '{CHECKSUMS_KEY}' in its header (not written by sparselora's save_pretrained)")
        try:
            stored = json.loads(stored)
        except json.JSONDecodeError as e:
            raise SparsityError(f"sparselora checkpoint: {file}: corrupt '{CHECKSUMS_KEY}' ({e})") from None
        missing = sorted(set(infos) - set(stored))
        if missing:
            raise SparsityError(f"sparselora checkpoint: {file}: no checksum for {len(missing)} tensors (first: '{missing[0]}')")
        try:
            for name, digest in hash_file_tensors(file, infos.values()):
                if digest != stored[name]:
                    raise SparsityError(f"sparselora checkpoint: {file}: checksum mismatch for tensor '{name}' (stored {stored[name][:12]}..., "
                                        f"computed {digest[:12]}...): the file is corrupt")
        except ValueError as e:
            if isinstance(e, SparsityError):
                raise
            raise SparsityError(f"sparselora checkpoint: {e}") from None


def is_packed_dir(path) -> bool:
    """Whether ``path`` is a directory this method wrote (its config.json names the method)."""
    from pathlib import Path

    cfg = Path(path) / "config.json"
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def attach(model: nn.Module, backend: str = "auto") -> bool:
    """Make ``model.save_pretrained`` write the packed format (a transformers model with
    :class:`SparseLinear` layers). Returns False (and does nothing) for other models."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    if not isinstance(model, PreTrainedModel):
        return False
    existing = getattr(model, "hf_quantizer", None)
    if existing is not None and not isinstance(existing, SparseLoraHfQuantizer):
        raise SparsityError(f"{type(model).__name__} is already quantized with "
                            f"{getattr(existing.quantization_config, 'quant_method', '?')}; sparselora cannot pack it")
    if existing is None:
        config = SparseLoraConfig(backend=backend)
        model.hf_quantizer = SparseLoraHfQuantizer(config, pre_quantized=True)
        model.config.quantization_config = config
    return True


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (after :func:`sparselora.unsparsify` left no packed layer)."""
    if isinstance(getattr(model, "hf_quantizer", None), SparseLoraHfQuantizer):
        del model.hf_quantizer
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        for attr in ("is_quantized", "quantization_method"):
            if hasattr(model, attr):
                try:
                    delattr(model, attr)
                except AttributeError:
                    pass


def register() -> None:
    """Register the method with transformers (idempotent; done on ``import sparselora``)."""
    import transformers.quantizers.auto as auto

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not SparseLoraConfig:
        auto.register_quantization_config(QUANT_METHOD)(SparseLoraConfig)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not SparseLoraHfQuantizer:
        auto.register_quantizer(QUANT_METHOD)(SparseLoraHfQuantizer)


register()

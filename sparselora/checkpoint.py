"""Compressed checkpoints of sparsified models (safetensors, the ``sparselora-24`` single-file format).

The primary format is the transformers-native one (``save_pretrained`` / ``from_pretrained``,
:mod:`sparselora.hf_quantizer`); this module keeps sparselora's own file format and reads the
legacy compressed-tensors layout (:mod:`sparselora.compressed_tensors_interop`).

``save_sparse(model, path)`` stores every :class:`SparseLinear` as its canonical packed pair
(``<layer>.values`` ``[N, K/2]`` + ``<layer>.meta`` int32, see :mod:`sparselora.format`) and
every other tensor as is. The safetensors header metadata records:

* ``format`` = ``"sparselora-24"`` and ``format_version`` (readers refuse versions they do not know),
* ``sparse_layers``: JSON ``{name: {"shape": [N, K], "dtype": ..., "pattern": "2:4", "bias": bool}}``,
* ``aliases``: JSON ``{key: stored_key}`` for tied tensors (stored once),
* ``checksum``: sha256 over every tensor's name, dtype, shape and bytes (detects bit rot and
  truncation that a header alone would not),
* ``extra_config``: JSON given by the caller, and ``sparselora_version``.

Writes are atomic: temp files in the destination directory (weights and ``config.json`` together)
are written and fsynced, and only then ``os.replace``d over the targets, so a failing save leaves
the previous files intact. Files get the modes ``open`` gives (0644 under umask 022), not 0600.

``load_sparse(model, path)`` takes a model of the same architecture, dense or built without
weights (meta device), validates every key, shape, dtype, the packed metadata and the checksum
(streamed from disk) *before* touching the model, then swaps the listed layers for
``SparseLinear`` and loads all weights, one tensor at a time (no mmap, no dense weight of a
packed layer). ``save_sparse(..., format="compressed-tensors")`` writes the legacy
``sparse-24-bitmask`` layout (see :mod:`sparselora.compressed_tensors_interop` for its status).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .compressed_tensors_interop import CT_FORMAT, LEGACY_NOTE, check_ct_config, ct_config, from_compressed_tensors, to_compressed_tensors
from .compressed_tensors_interop import packbits as _packbits, unpackbits as _unpackbits  # noqa: F401  (cli's masks)
from .format import Packed24, SparsityError, check_packed, validate_packed
from .modules import SparseLinear
from .staging import fsync_path, new_file
from .stream_io import CheckpointError, TensorInfo, iter_bytes, read_header, read_tensor, release_freed_heap, tensor_sha256

__all__ = ["save_sparse", "load_sparse", "read_metadata", "sparse_claim", "CheckpointError", "FORMAT_NAME", "FORMAT_VERSION",
           "WEIGHTS_NAME", "CT_FORMAT"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "sparselora-24"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------
# small utilities
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}|{_dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _atomic_write_all(files: list[tuple[Path, object]]) -> None:
    """Write several files as one save: every ``write_fn(tmp_path)`` runs and is fsynced first,
    and only then are the temps renamed over their targets, back to back. Any error while writing
    (disk full, a tensor safetensors refuses...) removes every temp and leaves all targets as
    they were; the only window for a mixed pair is between two renames."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, write_fn in files:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = str(new_file(path.parent, prefix=f".{path.name}.", suffix=".tmp"))  # umask modes, unlike mkstemp's 0600
            mode = os.stat(tmp).st_mode
            staged.append((tmp, path))
            write_fn(tmp)
            os.chmod(tmp, mode)  # safetensors recreates the file 0600 whatever the umask: readable as the umask allows
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    for parent in {path.parent for _, path in staged}:
        fsync_path(parent, directory=True)


def _atomic_write(path: Path, write_fn) -> None:
    """Call ``write_fn(tmp_path)``, fsync the result, then rename it over ``path``. On any error the
    temp file is removed and ``path`` is left as it was."""
    _atomic_write_all([(path, write_fn)])


def _text_writer(text: str):
    return lambda tmp: Path(tmp).write_text(text)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, _text_writer(text))


def _resolve(path, for_write: bool) -> tuple[Path, Optional[Path]]:
    """(weights file, directory for config.json or None). A path ending in .safetensors is a file;
    anything else is a model directory holding model.safetensors (+ config.json)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, None
    if not for_write and not p.exists():
        raise CheckpointError(f"no checkpoint at {p}")
    if not for_write and p.is_file():
        return p, None
    return p / WEIGHTS_NAME, p


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors sharing memory (tied weights): store each once, record aliases."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = t.detach().contiguous().cpu()
    return out, aliases


# ---------------------------------------------------------------------------------------
# save
def save_sparse(model: nn.Module, path, extra_config: Optional[dict] = None, format: str = "sparselora") -> Path:
    """Write ``model``'s state with :class:`SparseLinear` layers compressed, atomically.

    ``path`` ending in ``.safetensors`` is the weights file; anything else is a directory that gets
    ``model.safetensors`` plus ``config.json`` when the model has a transformers ``config``.
    ``format="compressed-tensors"`` writes the ``sparse-24-bitmask`` layout instead (then a
    directory is required, since the sparsity config lives in ``config.json``). Returns the
    weights file path.
    """
    if format not in ("sparselora", "compressed-tensors"):
        raise ValueError(f"format must be 'sparselora' or 'compressed-tensors', got {format!r}")
    file, directory = _resolve(path, for_write=True)
    if extra_config is not None:
        try:
            extra_json = json.dumps(extra_config, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"save_sparse: extra_config must be JSON-serialisable: {e}") from None
    else:
        extra_json = "{}"
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    state, aliases = _dedupe(model.state_dict())
    if format == "compressed-tensors":
        logger.warning(LEGACY_NOTE)
        if directory is None:
            raise ValueError("save_sparse(format='compressed-tensors') needs a directory: its sparsity config goes to config.json")
        tensors = to_compressed_tensors(state, layers)
        for alias, target in aliases.items():  # compressed-tensors readers know no aliases: store the copy
            tensors[alias] = tensors[target].clone()
        metadata = {"format": "pt"}
    else:
        tensors = state
        sparse_meta = {n: {"shape": [m.out_features, m.in_features], "dtype": _dtype_name(m.weight_dtype),
                           "pattern": "2:4", "bias": m.bias is not None} for n, m in layers.items()}
        import sparselora

        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "sparse_layers": json.dumps(sparse_meta, sort_keys=True),
            "aliases": json.dumps(aliases, sort_keys=True),
            "checksum": checksum(tensors),
            # per tensor too (same value as stream_io.tensor_sha256): a mismatch on load names the tensor
            "tensor_checksums": json.dumps({k: tensor_sha256(t) for k, t in tensors.items()}, sort_keys=True),
            "extra_config": extra_json,
            "sparselora_version": sparselora.__version__,
        }
    from safetensors.torch import save_file

    files = [(file, lambda tmp: save_file(tensors, tmp, metadata=metadata))]
    if directory is not None:
        config = _config_dict(model)
        if format == "compressed-tensors":
            config = config or {}
            config["quantization_config"] = ct_config(layers, model)
        if config is not None:
            files.append((directory / "config.json", _text_writer(json.dumps(config, indent=2, sort_keys=True) + "\n")))
    _atomic_write_all(files)  # weights and config.json staged together: no half-written pair
    return file


def _config_dict(model: nn.Module) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    if not d.get("architectures"):
        d["architectures"] = [type(model).__name__]
    return json.loads(json.dumps(d, default=str))


# ---------------------------------------------------------------------------------------
# load: headers first, tensors one at a time (no mmap: see stream_io), never the dense weights

def _checked_header(f: Path):
    """``read_header`` with the one error every reader gives for an unreadable file."""
    try:
        return read_header(f)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{f}: cannot read safetensors ({e}); the file is truncated or corrupt") from None

class _Source:
    """A checkpoint on disk (one file or the shards of an index): tensor names, shapes and dtypes
    from the headers; data read on request, one tensor at a time."""

    def __init__(self, files: list[Path], shown: Path):
        self.where = shown
        self.meta: dict[str, str] = {}
        self.infos: dict[str, tuple[Path, TensorInfo]] = {}
        for f in files:
            if not f.exists():
                raise CheckpointError(f"no checkpoint file {f}")
            m, infos = _checked_header(f)
            self.meta.update(m)
            self.infos.update({k: (f, i) for k, i in infos.items()})

    def read(self, key: str, device=None) -> torch.Tensor:
        f, info = self.infos[key]
        with open(f, "rb", buffering=0) as h:
            try:
                return read_tensor(h, info, device)[0]
            except ValueError as e:
                raise CheckpointError(f"{f}: {e}") from None

    def read_all(self) -> dict[str, torch.Tensor]:
        return {k: self.read(k) for k in self.infos}

    def checksum(self) -> tuple[str, dict[str, str]]:
        """(:func:`checksum` of the stored tensors, {name: per-tensor sha256}) in one streamed pass
        over the files (16 MiB at a time)."""
        h = hashlib.sha256()
        per: dict[str, str] = {}
        buf = memoryview(bytearray(16 << 20))
        for k in sorted(self.infos):
            f, info = self.infos[k]
            h.update(f"{k}|{_dtype_name(info.dtype)}|{list(info.shape)}|".encode())
            t = hashlib.sha256(f"{_dtype_name(info.dtype)}|{list(info.shape)}|".encode())
            try:
                for chunk in iter_bytes(f, info, buf):
                    h.update(chunk)
                    t.update(chunk)
            except ValueError as e:
                raise CheckpointError(f"{f}: {e}") from None
            per[k] = t.hexdigest()
        return h.hexdigest(), per


class _LazyState(Mapping):
    """``{key: tensor}`` of a sparselora checkpoint, aliases resolved, each tensor read from disk
    when asked for (and not kept: the caller keeps what it loads). ``spec(key)`` gives
    (shape, dtype) without reading."""

    def __init__(self, src: _Source, aliases: dict[str, str]):
        self.src, self.aliases = src, dict(aliases)

    def _stored(self, key: str) -> str:
        return self.aliases.get(key, key)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self:
            raise KeyError(key)
        return self.src.read(self._stored(key))

    def __contains__(self, key) -> bool:
        return key in self.src.infos or key in self.aliases

    def __iter__(self):
        yield from self.src.infos
        yield from (a for a in self.aliases if a not in self.src.infos)

    def __len__(self) -> int:
        return len(set(self.src.infos) | set(self.aliases))

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        info = self.src.infos[self._stored(key)][1]
        return info.shape, info.dtype


def _spec(state, key: str) -> tuple[tuple[int, ...], torch.dtype]:
    if isinstance(state, _LazyState):
        return state.spec(key)
    t = state[key]
    return tuple(t.shape), t.dtype


def _source(path) -> tuple[_Source, Optional[Path]]:
    file, directory = _resolve(path, for_write=False)
    index = directory / (WEIGHTS_NAME + ".index.json") if directory is not None else None
    if directory is not None and not file.exists() and index is not None and index.exists():
        # sharded checkpoint (compressed-tensors/transformers style): every shard of the index
        weight_map = json.loads(index.read_text())["weight_map"]
        return _Source([directory / s for s in sorted(set(weight_map.values()))], index), directory
    return _Source([file], file), directory


def _kind(src: _Source, directory: Optional[Path]) -> str:
    """"sparselora" or "compressed-tensors" (from the headers alone)."""
    meta, file = src.meta, src.where
    if meta.get("format") == FORMAT_NAME:
        return "sparselora"
    if any(k.endswith(".bitmask") for k in src.infos):
        if directory is not None and (directory / "config.json").exists():
            check_ct_config(directory / "config.json")
        return "compressed-tensors"
    if "format_version" in meta or meta.get("format", "pt") != "pt":
        raise CheckpointError(f"{file}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT_NAME!r} or compressed-tensors {CT_FORMAT!r})")
    if meta.get("sparselora_checksums"):
        raise CheckpointError(f"{file}: a transformers-native sparselora directory: load it with from_pretrained "
                              "(sparselora imported), not load_sparse")
    raise CheckpointError(f"{file}: holds no sparse layers in a known format (no {FORMAT_NAME!r} metadata, no compressed-tensors bitmasks)")


def sparse_claim(path) -> Optional[str]:
    """Why the model directory ``path`` holds, or claims to hold, sparse layers in a format this
    package reads (None for a plain dense transformers folder), from ``config.json`` and the
    safetensors headers alone.

    A loader that falls back to a plain ``from_pretrained`` must ask this first: a sparse checkpoint
    that :func:`load_sparse` refuses (corrupt, unknown version) would otherwise load with every packed
    layer initialised at random. A weights file whose header cannot be read, or which is shorter
    than its header says, raises :class:`CheckpointError`: it is not loadable any other way either.
    """
    directory = Path(path)
    cfg_file = directory / "config.json"
    if cfg_file.exists():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_file}: cannot read config.json ({e})") from None
        qc = (cfg.get("quantization_config") or cfg.get("compression_config") or {}) if isinstance(cfg, dict) else {}
        method = str(qc.get("quant_method", "")) if isinstance(qc, dict) else ""
        if method.startswith("sparselora"):
            return f"{cfg_file} declares quant_method {method!r}"
        if isinstance(qc, dict) and qc.get("sparsity_config"):
            return f"{cfg_file} declares a compressed-tensors sparsity_config"
    files = [directory / WEIGHTS_NAME] if (directory / WEIGHTS_NAME).exists() else []
    index = directory / (WEIGHTS_NAME + ".index.json")
    if not files and index.exists():
        try:
            files = [directory / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: listed in {index.name} but missing")
        meta, infos = _checked_header(file)
        ours = sorted(k for k in ("format_version", "sparse_layers", "checksum", "sparselora_version", "sparselora_checksums")
                      if k in meta)
        if str(meta.get("format", "")).startswith("sparselora") or ours:
            return f"{file} header says format {meta.get('format')!r}" + (f" with {', '.join(ours)}" if ours else "")
        for k in infos:
            owner, _, leaf = k.rpartition(".")
            if leaf == "bitmask" or (leaf == "compressed" and f"{owner}.shape" in infos):
                return f"{file} holds compressed-tensors sparse tensors ({k})"
            if leaf == "values" and f"{owner}.meta" in infos:
                return f"{file} holds packed 2:4 tensors ({k})"
    return None


def read_metadata(path) -> dict:
    """Format, version, sparse layers and extra config of a checkpoint, without a model (and, for
    sparselora checkpoints, without reading any tensor)."""
    src, directory = _source(path)
    kind = _kind(src, directory)
    if kind == "compressed-tensors":
        _, layers = from_compressed_tensors(src.read_all(), str(src.where))
        return {"format": CT_FORMAT, "sparse_layers": layers, "extra_config": {}, "file": str(src.where)}
    meta = src.meta
    return {"format": meta["format"], "format_version": int(meta.get("format_version", -1)),
            "sparse_layers": json.loads(meta.get("sparse_layers", "{}")), "extra_config": json.loads(meta.get("extra_config", "{}")),
            "sparselora_version": meta.get("sparselora_version"), "file": str(src.where)}


def _validated_sparselora(src: _Source) -> tuple[_LazyState, dict[str, dict]]:
    meta, file = src.meta, src.where
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise CheckpointError(f"{file}: format_version {meta.get('format_version')!r} is not an integer") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format version {version} is not supported by this sparselora (reads version {FORMAT_VERSION})")
    try:
        layers = json.loads(meta["sparse_layers"])
        aliases = json.loads(meta.get("aliases", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt metadata ({e})") from None
    want = meta.get("checksum")
    if not want:
        raise CheckpointError(f"{file}: metadata has no checksum")
    got, per = src.checksum()
    if got != want:
        try:  # files written since per-tensor checksums exist name the damaged tensor
            stored = json.loads(meta.get("tensor_checksums", "{}"))
        except json.JSONDecodeError:
            stored = {}
        bad = [k for k in sorted(per) if k in stored and stored[k] != per[k]]
        which = f" in tensor '{bad[0]}'" if bad else ""
        raise CheckpointError(f"{file}: checksum mismatch{which} (stored {want[:12]}..., computed {got[:12]}...): the file is corrupt")
    for alias, target in aliases.items():
        if target not in src.infos:
            raise CheckpointError(f"{file}: alias {alias!r} points to missing tensor {target!r}")
    return _LazyState(src, aliases), layers


def _renamer(model: nn.Module, key_mapping: Optional[dict]):
    """A key -> module-name function: the caller's regexes, else transformers' own checkpoint
    renamings for this model (checkpoints written by ``save_pretrained`` use legacy names for
    several VLMs, e.g. ``language_model.model.layers`` for LLaVA's ``model.language_model.layers``)."""
    import re

    if key_mapping:
        rules = [(re.compile(k), v) for k, v in key_mapping.items()]

        def by_user(key: str) -> str:
            for pat, rep in rules:
                key = pat.sub(rep, key)
            return key

        return by_user
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renamings = [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightRenaming)]
    except Exception:  # not a transformers model, or an older/newer transformers without this API
        return None
    if not renamings:
        return None

    def by_transformers(key: str) -> str:
        for c in renamings:
            new, hit = c.rename_source_key(key)
            if hit:
                key = new
        return key

    return by_transformers


def _fit_names(model: nn.Module, state: dict, layers: dict, key_mapping: Optional[dict]) -> tuple[dict, dict]:
    """Rename checkpoint keys to the model's module names when they do not match as they are."""
    modules = set(n for n, _ in model.named_modules())
    own = set(model.state_dict())

    def fits(st, ly):
        return all(n in modules for n in ly) and all(k in own or k.rpartition(".")[0] in ly for k in st)

    if not key_mapping and fits(state, layers):
        return state, layers
    rename = _renamer(model, key_mapping)
    if rename is None:
        return state, layers  # _plan reports the mismatch

    def rename_layer(name: str) -> str:
        return rename(name + ".weight")[: -len(".weight")]

    new_layers = {rename_layer(n): v for n, v in layers.items()}
    new_state = {}
    for k, t in state.items():
        owner, _, leaf = k.rpartition(".")
        new_state[(rename_layer(owner) + "." + leaf) if owner in layers else rename(k)] = t
    return new_state, new_layers


def _fill_tied(model: nn.Module, state: dict) -> None:
    """save_pretrained drops the second name of tied weights (lm_head tied to the embeddings):
    take it from the tensor it is tied to."""
    by_id: dict[int, list[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(k)
    for names in by_id.values():
        present = [k for k in names if k in state]
        if present and len(present) < len(names):
            for k in names:
                state.setdefault(k, state[present[0]])


def load_sparse(model: nn.Module, path, backend: str = "auto", strict: bool = True, key_mapping: Optional[dict] = None,
                device=None, allow_extra_copy: bool = False) -> nn.Module:
    """Load a compressed checkpoint into ``model`` (a model of the same architecture), in place.

    The model may be dense with real weights, or built without them (``accelerate``'s
    ``init_empty_weights()``, i.e. parameters on the meta device): then nothing dense is ever
    allocated, and the loaded tensors go to ``device`` (default CPU). The listed sparse layers
    become :class:`SparseLinear` (backend ``backend``, on the device of the model's layer, or
    ``device`` for a meta one); every other tensor is loaded as usual. Tensors are read one at a
    time, without mmap: host memory peaks at about the checkpoint's size (the tensors kept) plus one
    tensor.

    Everything is validated first (format, version, the whole-file checksum streamed from disk,
    keys, shapes, dtypes, packed metadata, and that no parameter or buffer would stay on the meta
    device): on any mismatch a :class:`CheckpointError` names the tensor or layer and the model is
    left untouched. Reads sparselora checkpoints and (legacy) compressed-tensors
    ``sparse-24-bitmask`` ones; for the latter, checkpoint names that differ from the model's module
    names are mapped with ``key_mapping`` (``{regex: replacement}``, applied in order) or else with
    transformers' own checkpoint renamings, and tied weights dropped by ``save_pretrained`` are
    filled in. ``allow_extra_copy`` lets ``auto`` pick a backend that holds a second copy of each
    weight (see :func:`sparselora.sparsify`). Returns ``model``. (Directories written by ``save_pretrained`` of a sparsified model
    load with ``from_pretrained`` instead, see :mod:`sparselora.hf_quantizer`.)
    """
    src, directory = _source(path)
    where = str(src.where)
    if _kind(src, directory) == "sparselora":
        state, layers = _validated_sparselora(src)
    else:
        state, layers = from_compressed_tensors(src.read_all(), where)
        state, layers = _fit_names(model, state, layers, key_mapping)
        _fill_tied(model, state)
    fallback = torch.device(device) if device is not None else torch.device("cpu")
    new_modules = _plan(model, state, layers, where, backend, strict, fallback, allow_extra_copy)
    _check_nothing_left_on_meta(model, state, new_modules, where)
    # validated: mutate (swap the sparse layers, then load everything else, one tensor at a time)
    for name, mod in new_modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod)
    packed_keys = {f"{n}.{leaf}" for n in new_modules for leaf in ("values", "meta", "bias")}
    try:
        assigned = _load_rest(model, state, sorted(k for k in state if k not in packed_keys), fallback)
    except (RuntimeError, CheckpointError) as e:  # cannot happen after _plan's checks; if it does, say the model is unusable
        raise CheckpointError(f"{where}: loading failed after validation, the model is in an undefined state: {e}") from e
    if assigned and hasattr(model, "tie_weights"):
        model.tie_weights()  # tensors that replaced meta ones: re-tie what the architecture ties
    return model


def _check_nothing_left_on_meta(model: nn.Module, state, new_modules: dict, where: str) -> None:
    """A model built on the meta device must get every parameter and buffer from the checkpoint;
    name the first one it would not (typically a non-persistent buffer: build the model with
    ``init_empty_weights(include_buffers=False)``)."""
    left = []
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for k, t in items:
            owner = k.rpartition(".")[0]
            if t.device.type == "meta" and owner not in new_modules and k not in state:
                left.append(f"{kind} '{k}'")
    if left:
        raise CheckpointError(f"{where}: {len(left)} tensors of {type(model).__name__} are on the meta device and not in the checkpoint "
                              f"(first: {left[0]}); the model would be unusable. Build it with accelerate's "
                              "init_empty_weights(include_buffers=False), or load the missing tensors first")


def _load_rest(model: nn.Module, state, keys: list[str], device: torch.device) -> bool:
    """Copy each checkpoint tensor into the model's (or, for a meta one, put it in its place, on
    ``device``). Tied meta parameters get one shared tensor. Returns whether any was assigned."""
    slots: dict[str, tuple[nn.Module, str, bool]] = {}
    for mod_name, mod in model.named_modules():
        for leaf, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                slots.setdefault(f"{mod_name}.{leaf}" if mod_name else leaf, (mod, leaf, leaf in mod._parameters))
    replaced: dict[int, torch.Tensor] = {}
    assigned = False
    with torch.no_grad():
        for k in keys:
            if k not in slots:
                continue  # strict=False and a key the model lacks (_plan reported what strict would)
            mod, leaf, is_param = slots[k]
            cur = mod._parameters[leaf] if is_param else mod._buffers[leaf]
            if cur.device.type != "meta":
                cur.copy_(state[k])
                continue
            new = replaced.get(id(cur))
            if new is None:
                t = state[k].to(device)
                new = nn.Parameter(t, requires_grad=cur.requires_grad) if is_param else t
                replaced[id(cur)] = new
            if is_param:
                mod._parameters[leaf] = new
            else:
                mod._buffers[leaf] = new
            assigned = True
    return assigned


def _plan(model: nn.Module, state, layers: dict[str, dict], where: str, backend: str, strict: bool,
          fallback: torch.device = torch.device("cpu"), allow_extra_copy: bool = False) -> dict[str, SparseLinear]:
    """Check ``state`` fits ``model`` with ``layers`` packed; return the SparseLinear modules to install
    (on the device of the layer they replace, ``fallback`` for a meta-device one)."""
    modules = dict(model.named_modules())
    new: dict[str, SparseLinear] = {}
    for name, info in layers.items():
        mod = modules.get(name)
        if mod is None:
            raise CheckpointError(f"{where}: sparse layer '{name}' does not exist in {type(model).__name__}")
        if isinstance(mod, SparseLinear):
            shape, dtype, device, has_bias = (mod.out_features, mod.in_features), mod.weight_dtype, mod.weight_device, mod.bias is not None
        elif isinstance(mod, nn.Linear):
            shape, dtype, device, has_bias = tuple(mod.weight.shape), mod.weight.dtype, mod.weight.device, mod.bias is not None
        else:
            raise CheckpointError(f"{where}: sparse layer '{name}' is a {type(mod).__name__} in the model, expected nn.Linear")
        if device.type == "meta":
            device = fallback
        values, meta = state.get(f"{name}.values"), state.get(f"{name}.meta")
        if values is None or meta is None:
            raise CheckpointError(f"{where}: sparse layer '{name}' has no '{name}.values'/'{name}.meta' tensors")
        try:
            n, k = check_packed(values, meta, name)
        except SparsityError as e:
            raise CheckpointError(f"{where}: {e}") from None
        if (n, k) != tuple(info.get("shape", (n, k))):
            raise CheckpointError(f"{where}: sparse layer '{name}': packed tensors are {n}x{k}, metadata says {info['shape']}")
        if (n, k) != shape:
            raise CheckpointError(f"{where}: shape mismatch for layer '{name}': checkpoint {n}x{k}, model {shape[0]}x{shape[1]}")
        if values.dtype != dtype:
            raise CheckpointError(f"{where}: dtype mismatch for layer '{name}': checkpoint {_dtype_name(values.dtype)}, model {_dtype_name(dtype)} "
                                  f"(build the model with dtype={_dtype_name(values.dtype)})")
        if (f"{name}.bias" in state) != has_bias:
            raise CheckpointError(f"{where}: layer '{name}': bias {'present' if has_bias else 'absent'} in the model but not in the checkpoint")
        packed = Packed24(values, meta, (n, k))
        try:  # i0 < i1 in every group, and finite values (naming the first bad one)
            validate_packed(values, meta, name)
        except SparsityError as e:  # e starts with the quoted layer name
            raise CheckpointError(f"{where}: layer {e}") from None
        bias = state.get(f"{name}.bias")
        try:
            new[name] = SparseLinear(packed.to(device), bias.to(device) if bias is not None else None, backend=backend, name=name,
                                     allow_extra_copy=allow_extra_copy)
        except (SparsityError, ValueError, KeyError) as e:
            raise CheckpointError(f"{where}: layer '{name}': no backend {backend!r} for it: {e}") from None
        new[name].train(mod.training)
        release_freed_heap()  # this layer's validation temporaries, before the next layer's reads (see stream_io)

    # expected keys after the swap: the model's, with weight -> values/meta for the sparse layers
    # (shape, dtype) only: a SparseLinear whose backend keeps its own layout would rebuild the
    # canonical tensors for a state_dict() call, a second copy of every weight at once
    expected = {}
    for k, t in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if owner in new:
            continue
        expected[k] = (tuple(t.shape), t.dtype)
    for name, m in new.items():
        expected[f"{name}.values"] = ((m.out_features, m.in_features // 2), m.weight_dtype)
        expected[f"{name}.meta"] = ((m.out_features, -(-m.in_features // 32)), torch.int32)
        if m.bias is not None:
            expected[f"{name}.bias"] = (tuple(m.bias.shape), m.bias.dtype)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{where}: checkpoint does not fit {type(model).__name__}: " + "; ".join(parts))
    for k in set(expected) & set(state):
        (e_shape, e_dtype), (shape, dtype) = expected[k], _spec(state, k)
        if e_shape != tuple(shape):
            raise CheckpointError(f"{where}: shape mismatch for '{k}': checkpoint {tuple(shape)}, model {e_shape}")
        if e_dtype != dtype:
            raise CheckpointError(f"{where}: dtype mismatch for '{k}': checkpoint {_dtype_name(dtype)}, model {_dtype_name(e_dtype)}")
    return new

"""Compressed checkpoints of sparsified models (safetensors), and compressed-tensors interop.

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
the previous files intact.

``load_sparse(model, path)`` takes a dense model of the same architecture, validates every
key, shape, dtype and the packed metadata *before* touching the model, then swaps the listed
layers for ``SparseLinear`` and loads all weights. It also reads the compressed-tensors
``sparse-24-bitmask`` layout (``<layer>.compressed`` ``[N, K/2]``, ``<layer>.bitmask`` uint8
``[N, ceil(K/8)]`` little-endian bits, ``<layer>.shape`` ``[[N], [K]]``), and
``save_sparse(..., format="compressed-tensors")`` writes it with a matching ``config.json``
``quantization_config.sparsity_config``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .format import Packed24, SparsityError, check_packed, mask_from_meta, pack_24, unpack_24
from .modules import SparseLinear

__all__ = ["save_sparse", "load_sparse", "read_metadata", "CheckpointError", "FORMAT_NAME", "FORMAT_VERSION",
           "WEIGHTS_NAME", "CT_FORMAT"]

FORMAT_NAME = "sparselora-24"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CT_FORMAT = "sparse-24-bitmask"  # compressed-tensors' name of the layout
_CT_PARAMS = ("compressed", "bitmask", "shape")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, of an unknown format, or does not fit the model."""


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


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            write_fn(tmp)
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
        _fsync_dir(parent)


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
        if directory is None:
            raise ValueError("save_sparse(format='compressed-tensors') needs a directory: its sparsity config goes to config.json")
        tensors = _to_compressed_tensors(state, layers)
        for alias, target in aliases.items():  # compressed-tensors readers know no aliases: store the copy
            tensors[alias] = tensors[target].clone()
        metadata = {"format": "pt"}
    else:
        tensors = state
        sparse_meta = {n: {"shape": [m.out_features, m.in_features], "dtype": _dtype_name(m.values.dtype),
                           "pattern": "2:4", "bias": m.bias is not None} for n, m in layers.items()}
        import sparselora

        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "sparse_layers": json.dumps(sparse_meta, sort_keys=True),
            "aliases": json.dumps(aliases, sort_keys=True),
            "checksum": checksum(tensors),
            "extra_config": extra_json,
            "sparselora_version": sparselora.__version__,
        }
    from safetensors.torch import save_file

    files = [(file, lambda tmp: save_file(tensors, tmp, metadata=metadata))]
    if directory is not None:
        config = _config_dict(model)
        if format == "compressed-tensors":
            config = config or {}
            config["quantization_config"] = _ct_config(layers, model)
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
# compressed-tensors "sparse-24-bitmask"
def _packbits(mask: torch.Tensor) -> torch.Tensor:
    """[N, K] bool -> [N, ceil(K/8)] uint8, bit j of byte b = column 8b + j (numpy bitorder='little')."""
    n, k = mask.shape
    pad = (-k) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(n, -1, 8).to(torch.int32)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=m.device))
    return (m * weights).sum(-1).to(torch.uint8)


def _unpackbits(bits: torch.Tensor, k: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.int32, device=bits.device)
    m = (bits.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return m.reshape(bits.shape[0], -1)[:, :k].to(torch.bool)


def _to_compressed_tensors(state: dict[str, torch.Tensor], layers: dict[str, SparseLinear]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for name, m in layers.items():
        values, meta = out.pop(f"{name}.values"), out.pop(f"{name}.meta")
        mask = mask_from_meta(meta, (m.out_features, m.in_features))
        # both layouts list a row's kept values in column order, so the values carry over as they are
        out[f"{name}.compressed"] = values
        out[f"{name}.bitmask"] = _packbits(mask)
        out[f"{name}.shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64).reshape(-1, 1)
    return out


def _ct_config(layers: dict[str, SparseLinear], model: nn.Module) -> dict:
    total = sum(p.numel() for n, p in model.named_parameters())
    total += sum(2 * m.values.numel() for m in layers.values())
    pruned = sum(m.values.numel() for m in layers.values())
    sparsity = {"format": CT_FORMAT, "sparsity_structure": "2:4", "global_sparsity": pruned / total if total else 0.0,
                "targets": sorted(layers), "ignore": [], "registry_requires_subclass": False}
    try:  # let the library itself shape the config when it is installed
        from compressed_tensors.config import Sparse24BitMaskConfig

        sparsity = Sparse24BitMaskConfig(targets=sorted(layers), ignore=[], global_sparsity=sparsity["global_sparsity"]).model_dump()
        import compressed_tensors

        version = compressed_tensors.__version__
    except ImportError:
        version = "0.9.0"
    return {"quant_method": "compressed-tensors", "format": "dense", "version": version, "config_groups": {},
            "sparsity_config": sparsity}


def _from_compressed_tensors(tensors: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """compressed-tensors triples -> canonical values/meta; returns (state, sparse_layers)."""
    prefixes = {k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in _CT_PARAMS}
    state = dict(tensors)
    layers = {}
    for p in sorted(prefixes):
        missing = [s for s in _CT_PARAMS if f"{p}.{s}" not in state]
        if missing:
            raise CheckpointError(f"{where}: compressed-tensors layer '{p}' lacks {', '.join(p + '.' + s for s in missing)}")
        values, bits, shape = (state.pop(f"{p}.{s}") for s in _CT_PARAMS)
        shape = [int(x) for x in shape.flatten().tolist()]
        if len(shape) != 2:
            raise CheckpointError(f"{where}: '{p}.shape' must hold 2 numbers, got {shape}")
        n, k = shape
        if k % 4 or values.shape != (n, k // 2):
            raise CheckpointError(f"{where}: '{p}.compressed' has shape {tuple(values.shape)}, expected {(n, k // 2)} for a 2:4 {n}x{k} weight")
        if bits.dtype != torch.uint8 or bits.shape != (n, -(-k // 8)):
            raise CheckpointError(f"{where}: '{p}.bitmask' is {bits.dtype} {tuple(bits.shape)}, expected uint8 {(n, -(-k // 8))}")
        mask = _unpackbits(bits, k)
        per_group = mask.reshape(n, k // 4, 4).sum(-1)
        if (per_group != 2).any():
            r, g = (per_group != 2).nonzero()[0].tolist()
            raise CheckpointError(f"{where}: '{p}.bitmask' is not 2:4: row {r}, group {g} keeps {int(per_group[r, g])} of 4")
        dense = torch.zeros(n, k, dtype=values.dtype)
        dense[mask] = values.reshape(-1)
        packed = pack_24(dense, mask, name=f"{p}.weight")
        state[f"{p}.values"], state[f"{p}.meta"] = packed.values, packed.meta
        layers[p] = {"shape": [n, k], "dtype": _dtype_name(values.dtype), "pattern": "2:4", "bias": f"{p}.bias" in state}
    return state, layers


# ---------------------------------------------------------------------------------------
# load
def _open(file: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not file.exists():
        raise CheckpointError(f"no checkpoint file {file}")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers/lengths
        raise CheckpointError(f"{file}: cannot read safetensors ({type(e).__name__}: {e}); the file is truncated or corrupt") from None
    return meta, tensors


def _read_all(path) -> tuple[str, dict, dict[str, torch.Tensor], Path]:
    """(kind, metadata, tensors, weights file). kind: "sparselora" or "compressed-tensors"."""
    file, directory = _resolve(path, for_write=False)
    index = directory / (WEIGHTS_NAME + ".index.json") if directory is not None else None
    if directory is not None and not file.exists() and index is not None and index.exists():
        # sharded checkpoint (compressed-tensors/transformers style): read every shard of the index
        weight_map = json.loads(index.read_text())["weight_map"]
        meta, tensors = {}, {}
        for shard in sorted(set(weight_map.values())):
            m, t = _open(directory / shard)
            meta.update(m)
            tensors.update(t)
        file = index
    else:
        meta, tensors = _open(file)
    if meta.get("format") == FORMAT_NAME:
        return "sparselora", meta, tensors, file
    if any(k.endswith(".bitmask") for k in tensors):
        if directory is not None and (directory / "config.json").exists():
            _check_ct_config(directory / "config.json")
        return "compressed-tensors", meta, tensors, file
    if "format_version" in meta or meta.get("format", "pt") != "pt":
        raise CheckpointError(f"{file}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT_NAME!r} or compressed-tensors {CT_FORMAT!r})")
    raise CheckpointError(f"{file}: holds no sparse layers in a known format (no {FORMAT_NAME!r} metadata, no compressed-tensors bitmasks)")


def _check_ct_config(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    qc = cfg.get("quantization_config") or cfg.get("compression_config") or {}
    sc = qc.get("sparsity_config") or {}
    if sc and sc.get("format") != CT_FORMAT:
        raise CheckpointError(f"{config_path}: sparsity_config.format is {sc.get('format')!r}; only {CT_FORMAT!r} is supported")
    if qc.get("config_groups"):
        raise CheckpointError(f"{config_path}: the checkpoint is also quantized ({sorted(qc['config_groups'])}); only sparse-only checkpoints are supported")


def read_metadata(path) -> dict:
    """Format, version, sparse layers and extra config of a checkpoint, without a model."""
    kind, meta, tensors, file = _read_all(path)
    if kind == "compressed-tensors":
        _, layers = _from_compressed_tensors(tensors, str(file))
        return {"format": CT_FORMAT, "sparse_layers": layers, "extra_config": {}, "file": str(file)}
    return {"format": meta["format"], "format_version": int(meta.get("format_version", -1)),
            "sparse_layers": json.loads(meta.get("sparse_layers", "{}")), "extra_config": json.loads(meta.get("extra_config", "{}")),
            "sparselora_version": meta.get("sparselora_version"), "file": str(file)}


def _validated_sparselora(meta: dict, tensors: dict[str, torch.Tensor], file: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
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
    got = checksum(tensors)
    if got != want:
        raise CheckpointError(f"{file}: checksum mismatch (stored {want[:12]}..., computed {got[:12]}...): the file is corrupt")
    state = dict(tensors)
    for alias, target in aliases.items():
        if target not in state:
            raise CheckpointError(f"{file}: alias {alias!r} points to missing tensor {target!r}")
        state[alias] = state[target]
    return state, layers


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


def load_sparse(model: nn.Module, path, backend: str = "auto", strict: bool = True, key_mapping: Optional[dict] = None) -> nn.Module:
    """Load a compressed checkpoint into ``model`` (a dense model of the same architecture), in place.

    The listed sparse layers become :class:`SparseLinear` (backend ``backend``, on the device of the
    model's layer); every other tensor is loaded as usual. Everything is validated first (format,
    version, checksum, keys, shapes, dtypes, packed metadata): on any mismatch a
    :class:`CheckpointError` names the tensor or layer and the model is left untouched. Reads both
    sparselora checkpoints and compressed-tensors ``sparse-24-bitmask`` ones; for the latter,
    checkpoint names that differ from the model's module names are mapped with ``key_mapping``
    (``{regex: replacement}``, applied in order) or else with transformers' own checkpoint renamings,
    and tied weights dropped by ``save_pretrained`` are filled in. Returns ``model``.
    """
    kind, meta, tensors, file = _read_all(path)
    where = str(file)
    if kind == "sparselora":
        state, layers = _validated_sparselora(meta, tensors, file)
    else:
        state, layers = _from_compressed_tensors(tensors, where)
        state, layers = _fit_names(model, state, layers, key_mapping)
        _fill_tied(model, state)
    new_modules = _plan(model, state, layers, where, backend, strict)
    # validated: mutate (swap the sparse layers, then load everything else)
    for name, mod in new_modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod)
    rest = {k: v for k, v in state.items() if not any(k == f"{n}.values" or k == f"{n}.meta" for n in new_modules)}
    try:
        model.load_state_dict(rest, strict=False)
    except RuntimeError as e:  # cannot happen after _plan's checks; if it does, say the model is unusable
        raise CheckpointError(f"{where}: loading failed after validation, the model is in an undefined state: {e}") from e
    return model


def _plan(model: nn.Module, state: dict[str, torch.Tensor], layers: dict[str, dict], where: str, backend: str, strict: bool) -> dict[str, SparseLinear]:
    """Check ``state`` fits ``model`` with ``layers`` packed; return the SparseLinear modules to install."""
    modules = dict(model.named_modules())
    new: dict[str, SparseLinear] = {}
    for name, info in layers.items():
        mod = modules.get(name)
        if mod is None:
            raise CheckpointError(f"{where}: sparse layer '{name}' does not exist in {type(model).__name__}")
        if isinstance(mod, SparseLinear):
            shape, dtype, device, has_bias = (mod.out_features, mod.in_features), mod.values.dtype, mod.values.device, mod.bias is not None
        elif isinstance(mod, nn.Linear):
            shape, dtype, device, has_bias = tuple(mod.weight.shape), mod.weight.dtype, mod.weight.device, mod.bias is not None
        else:
            raise CheckpointError(f"{where}: sparse layer '{name}' is a {type(mod).__name__} in the model, expected nn.Linear")
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
        try:
            unpack_24(packed)  # validates the in-group indices (i0 < i1) of every group
        except SparsityError as e:
            raise CheckpointError(f"{where}: layer '{name}': {e}") from None
        bias = state.get(f"{name}.bias")
        try:
            new[name] = SparseLinear(packed.to(device), bias.to(device) if bias is not None else None, backend=backend, name=name)
        except (SparsityError, ValueError, KeyError) as e:
            raise CheckpointError(f"{where}: layer '{name}': no backend {backend!r} for it: {e}") from None
        new[name].train(mod.training)

    # expected keys after the swap: the model's, with weight -> values/meta for the sparse layers
    expected = {}
    for k, t in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if owner in new:
            continue
        expected[k] = t
    for name, m in new.items():
        for k, t in m.state_dict().items():
            expected[f"{name}.{k}"] = t
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
        e, t = expected[k], state[k]
        if tuple(e.shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: shape mismatch for '{k}': checkpoint {tuple(t.shape)}, model {tuple(e.shape)}")
        if e.dtype != t.dtype:
            raise CheckpointError(f"{where}: dtype mismatch for '{k}': checkpoint {_dtype_name(t.dtype)}, model {_dtype_name(e.dtype)}")
    return new

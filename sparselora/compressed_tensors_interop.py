"""compressed-tensors ``sparse-24-bitmask`` interop (legacy export, still read).

Layout per packed layer ``L``: ``L.compressed`` ``[N, K/2]`` (kept values, row-major, column
order), ``L.bitmask`` uint8 ``[N, ceil(K/8)]`` (little-endian bits: bit j of byte b = column
8b + j), ``L.shape`` ``[[N], [K]]``; ``config.json`` carries ``quantization_config.sparsity_config``
with ``format: "sparse-24-bitmask"``.

Status (transformers 5.x, compressed-tensors >= 0.15): compressed-tensors removed its Sparse24
compressor and transformers loads such a directory with every packed layer at random, so an export
in this layout reaches no current consumer. It is kept as a *legacy* export (``save_sparse(...,
format="compressed-tensors")``, ``sparselora sparsify --format compressed-tensors``) for older
stacks (vLLM/llm-compressor of the 0.9-0.14 era); the primary format is the transformers-native one
(:mod:`sparselora.hf_quantizer`). Reading stays supported: :func:`sparselora.load_sparse` converts
these checkpoints to the canonical layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .format import _pack_indices, mask_from_meta
from .modules import SparseLinear
from .stream_io import CheckpointError

__all__ = ["CT_FORMAT", "CT_PARAMS", "LEGACY_NOTE", "packbits", "unpackbits", "to_compressed_tensors", "ct_config",
           "from_compressed_tensors", "check_ct_config"]

CT_FORMAT = "sparse-24-bitmask"  # compressed-tensors' name of the layout
CT_PARAMS = ("compressed", "bitmask", "shape")
LEGACY_NOTE = ("compressed-tensors 'sparse-24-bitmask' is a legacy export: compressed-tensors >= 0.15 has no Sparse24 "
               "compressor and transformers 5 loads it with random packed layers; prefer the transformers-native format "
               "(save_pretrained / sparselora sparsify --format transformers)")


def packbits(mask: torch.Tensor) -> torch.Tensor:
    """[N, K] bool -> [N, ceil(K/8)] uint8, bit j of byte b = column 8b + j (numpy bitorder='little')."""
    n, k = mask.shape
    pad = (-k) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(n, -1, 8).to(torch.int32)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=m.device))
    return (m * weights).sum(-1).to(torch.uint8)


def unpackbits(bits: torch.Tensor, k: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.int32, device=bits.device)
    m = (bits.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return m.reshape(bits.shape[0], -1)[:, :k].to(torch.bool)


def to_compressed_tensors(state: dict[str, torch.Tensor], layers: dict[str, SparseLinear]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for name, m in layers.items():
        values, meta = out.pop(f"{name}.values"), out.pop(f"{name}.meta")
        mask = mask_from_meta(meta, (m.out_features, m.in_features))
        # both layouts list a row's kept values in column order, so the values carry over as they are
        out[f"{name}.compressed"] = values
        out[f"{name}.bitmask"] = packbits(mask)
        out[f"{name}.shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64).reshape(-1, 1)
    return out


def ct_config(layers: dict[str, SparseLinear], model: nn.Module) -> dict:
    total = sum(p.numel() for n, p in model.named_parameters())
    total += sum(m.out_features * m.in_features for m in layers.values())
    pruned = sum(m.out_features * m.in_features // 2 for m in layers.values())
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


def from_compressed_tensors(tensors: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """compressed-tensors triples -> canonical values/meta; returns (state, sparse_layers)."""
    prefixes = {k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in CT_PARAMS}
    state = dict(tensors)
    layers = {}
    for p in sorted(prefixes):
        missing = [s for s in CT_PARAMS if f"{p}.{s}" not in state]
        if missing:
            raise CheckpointError(f"{where}: compressed-tensors layer '{p}' lacks {', '.join(p + '.' + s for s in missing)}")
        values, bits, shape = (state.pop(f"{p}.{s}") for s in CT_PARAMS)
        shape = [int(x) for x in shape.flatten().tolist()]
        if len(shape) != 2:
            raise CheckpointError(f"{where}: '{p}.shape' must hold 2 numbers, got {shape}")
        n, k = shape
        if k % 4 or values.shape != (n, k // 2):
            raise CheckpointError(f"{where}: '{p}.compressed' has shape {tuple(values.shape)}, expected {(n, k // 2)} for a 2:4 {n}x{k} weight")
        if bits.dtype != torch.uint8 or bits.shape != (n, -(-k // 8)):
            raise CheckpointError(f"{where}: '{p}.bitmask' is {bits.dtype} {tuple(bits.shape)}, expected uint8 {(n, -(-k // 8))}")
        mask = unpackbits(bits, k)
        per_group = mask.reshape(n, k // 4, 4).sum(-1)
        if (per_group != 2).any():
            r, g = (per_group != 2).nonzero()[0].tolist()
            raise CheckpointError(f"{where}: '{p}.bitmask' is not 2:4: row {r}, group {g} keeps {int(per_group[r, g])} of 4")
        # kept positions, ascending within each group (a stable sort puts the kept ones first):
        # the canonical meta straight from the mask, no dense weight built
        kept = torch.sort((~mask.reshape(n, k // 4, 4)).to(torch.int8), dim=-1, stable=True).indices[..., :2]
        state[f"{p}.values"], state[f"{p}.meta"] = values.contiguous(), _pack_indices(kept.reshape(n, k // 2))
        layers[p] = {"shape": [n, k], "dtype": str(values.dtype).replace('torch.', ''), "pattern": "2:4", "bias": f"{p}.bias" in state}
    return state, layers


def check_ct_config(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    qc = cfg.get("quantization_config") or cfg.get("compression_config") or {}
    sc = qc.get("sparsity_config") or {}
    if sc and sc.get("format") != CT_FORMAT:
        raise CheckpointError(f"{config_path}: sparsity_config.format is {sc.get('format')!r}; only {CT_FORMAT!r} is supported")
    if qc.get("config_groups"):
        raise CheckpointError(f"{config_path}: the checkpoint is also quantized ({sorted(qc['config_groups'])}); only sparse-only checkpoints are supported")

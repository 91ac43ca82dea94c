"""Where the parts of a VLM live: vision tower, projector/connector, language model, head.

A :class:`Family` maps a transformers model to module-name prefixes per part. Pruning
strategies ("vision", "language", "both", per-part ratios) and the patcher select layers
through it. Unknown models need user-given prefixes (:func:`custom_family`).

Default skips (see :data:`DEFAULT_SKIP_PARTS`): the projector/connector (small, and the
modality bridge is the most sensitive part) and the head (``lm_head``: tied to embeddings in
many models, and it decides every token).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch.nn as nn

PARTS = ("vision", "projector", "language", "head")
DEFAULT_SKIP_PARTS = ("projector", "head")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values this family covers
    prefixes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # part -> module-name prefixes

    def classify(self, name: str) -> str:
        """Part of a module name: the part with the longest matching prefix ('other' if none)."""
        if name == "lm_head" or name.endswith(".lm_head"):
            return "head"
        best, part = -1, "other"
        for p, prefixes in self.prefixes.items():
            for pre in prefixes:
                if (name == pre or name.startswith(pre + ".")) and len(pre) > best:
                    best, part = len(pre), p
        return part


_LLAVA_LIKE = {"vision": ("model.vision_tower",), "projector": ("model.multi_modal_projector",), "language": ("model.language_model",), "head": ("lm_head",)}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llava", ("llava", "llava_next", "llava_onevision", "vipllava"), _LLAVA_LIKE),
        Family("paligemma", ("paligemma",), _LLAVA_LIKE),
        Family("gemma3", ("gemma3",), _LLAVA_LIKE),
        Family("qwen2-vl", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
               {"vision": ("model.visual",), "projector": ("model.visual.merger",), "language": ("model.language_model",), "head": ("lm_head",)}),
        Family("idefics3", ("idefics3", "smolvlm"),
               {"vision": ("model.vision_model",), "projector": ("model.connector",), "language": ("model.text_model",), "head": ("lm_head",)}),
        Family("blip-2", ("blip-2", "blip_2", "instructblip"),
               {"vision": ("vision_model",), "projector": ("qformer", "language_projection"), "language": ("language_model",), "head": ("language_model.lm_head",)}),
        Family("clip", ("clip", "siglip", "siglip2"),
               {"vision": ("vision_model",), "projector": ("visual_projection", "text_projection"), "language": ("text_model",)}),
    ]
}


#: model types whose output reads hidden states at padded positions: SigLIP's text tower pools its
#: last position, which is padding in every text shorter than the batch's longest (or max_length)
READS_PADDING = ("siglip", "siglip2", "siglip_text_model", "siglip2_text_model")


def is_vision_module(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` of ``model`` belongs to its vision tower, by the model's family; False
    for a model of no known family (a text model, say)."""
    try:
        fam = get_family(model)
    except ValueError:
        return False
    return fam.classify(name) == "vision"


def reads_padded_positions(model: nn.Module) -> bool:
    """Whether ``model``'s outputs read hidden states at padded positions (:data:`READS_PADDING`), so
    padding is real data to it: calibration statistics and reconstruction losses must count it."""
    cfg = getattr(model, "config", None)
    types = {getattr(cfg, "model_type", None), getattr(getattr(cfg, "text_config", None), "model_type", None)}
    return bool(types & set(READS_PADDING))


def custom_family(vision: Iterable[str] = (), language: Iterable[str] = (), projector: Iterable[str] = (), head: Iterable[str] = ("lm_head",), name: str = "custom") -> Family:
    """A family for a model the registry does not know, from user-given prefixes."""
    prefixes = {"vision": tuple(vision), "projector": tuple(projector), "language": tuple(language), "head": tuple(head)}
    if not (prefixes["vision"] or prefixes["language"]):
        raise ValueError("custom_family needs at least one vision or language prefix")
    return Family(name, (), prefixes)


def get_family(model: nn.Module, family: Optional[Family | str] = None) -> Family:
    """The family of ``model`` (from ``config.model_type``), or the one given."""
    if isinstance(family, Family):
        return family
    if isinstance(family, str):
        if family not in FAMILIES:
            raise KeyError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
        return FAMILIES[family]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for f in FAMILIES.values():
        if model_type in f.model_types:
            return f
    raise ValueError(
        f"unknown model family (config.model_type={model_type!r}, class {type(model).__name__}); "
        f"known: {sorted(t for f in FAMILIES.values() for t in f.model_types)}. "
        f"Pass family=sparselora.families.custom_family(vision=[...], language=[...]) with module-name prefixes."
    )


def linear_layers(model: nn.Module, parts: Iterable[str] = ("vision", "language"), family: Optional[Family | str] = None,
                  skip: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of the chosen parts, by name, minus names matching a ``skip``
    entry (exact name, prefix, or a suffix such as ``"lm_head"``)."""
    fam = get_family(model, family)
    parts = set(parts)
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    skip = tuple(skip)
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or fam.classify(name) not in parts:
            continue
        if any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip):
            continue
        out[name] = mod
    return out

"""Where to prune: modality-aware selection of the Linear layers of a VLM.

Strategies (the VLM-pruning paper's settings, resolved through :mod:`sparselora.families`):

* ``"both"`` — the same pattern for the vision tower and the language model;
* ``"language"`` — language model only (vision tower dense);
* ``"vision"`` — vision tower only;
* a dict ``{part: ratio-or-pattern}`` — any per-part setting, e.g.
  ``{"vision": 0.3, "language": "2:4"}``; parts are ``vision``, ``projector``,
  ``language``, ``head``; ``None`` leaves a part dense.

Defaults for what is never pruned unless asked for explicitly:

* parts in :data:`DEFAULT_SKIP_PARTS` — the projector/connector (small; it is the
  modality bridge and the most sensitive part) and the head (``lm_head``: often tied to
  the token embeddings, and it scores every token). A strategy dict that names one of
  these parts prunes it anyway.
* embeddings, norms, convolutions (patch embeddings) — they are not ``nn.Linear``;
* ``nn.Linear`` children of ``nn.MultiheadAttention`` (SigLIP/PaliGemma pooling heads):
  ``F.multi_head_attention_forward`` reads ``out_proj.weight`` directly and the in-projection
  is a raw parameter, so such attention cannot be pruned like the others — they stay dense;
* names in ``skip`` (exact name, prefix, or ``.suffix``).

Unknown models: pass ``family=sparselora.families.custom_family(vision=[...], language=[...])``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Union

import warnings

import torch.nn as nn

from ..families import DEFAULT_SKIP_PARTS, PARTS, Family, get_family
from .methods import Pattern, parse_pattern

__all__ = ["Target", "select_targets", "STRATEGIES", "DEFAULT_SKIP_PARTS"]

STRATEGIES = {"both": ("vision", "language"), "language": ("language",), "vision": ("vision",)}


@dataclass
class Target:
    """One Linear to prune, its part and its pattern."""

    name: str
    module: nn.Linear
    part: str
    pattern: Pattern


def _mha_children(model: nn.Module) -> set[str]:
    out = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            for child, sub in mod.named_modules():
                if child and isinstance(sub, nn.Linear):
                    out.add(f"{name}.{child}" if name else child)
    return out


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip)


def part_patterns(strategy: Union[str, Mapping], pattern) -> dict[str, Optional[Pattern]]:
    """``strategy`` -> {part: Pattern} for the parts to prune."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; use one of {sorted(STRATEGIES)} or a dict {{part: ratio-or-pattern}}")
        p = parse_pattern(pattern)
        return {part: p for part in STRATEGIES[strategy]}
    if isinstance(strategy, Mapping):
        unknown = set(strategy) - set(PARTS)
        if unknown:
            raise ValueError(f"strategy dict has unknown parts {sorted(unknown)}; parts are {PARTS}")
        out = {part: (None if v is None else parse_pattern(v)) for part, v in strategy.items()}
        if all(v is None for v in out.values()):
            raise ValueError(f"strategy {dict(strategy)!r} prunes no part")
        return out
    raise TypeError(f"strategy must be 'both', 'language', 'vision' or a dict, got {type(strategy).__name__}")


def select_targets(model: nn.Module, strategy: Union[str, Mapping] = "language", pattern="2:4",
                   family: Optional[Union[Family, str]] = None, skip: Iterable[str] = ()) -> dict[str, Target]:
    """The Linear layers a strategy prunes, in module order, with their patterns.

    Raises ValueError for an unknown model (no family and no prefixes), a strategy that
    selects no layer, and SparsityError for a pattern that does not divide a selected layer."""
    fam = get_family(model, family)
    per_part = part_patterns(strategy, pattern)
    explicit = isinstance(strategy, Mapping)
    skip = tuple(skip)
    mha = _mha_children(model)
    out: dict[str, Target] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name in mha or _skipped(name, skip):
            continue
        part = fam.classify(name)
        p = per_part.get(part)
        if p is None or (part in DEFAULT_SKIP_PARTS and not explicit):
            continue
        p.check_layer(tuple(mod.weight.shape), name)
        out[name] = Target(name, mod, part, p)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, t in out.items():
        if id(t.module.weight) in tied:
            warnings.warn(f"{name} shares its weight with an embedding (tied weights): pruning it prunes the embedding too",
                          stacklevel=3)
    if not out:
        raise ValueError(
            f"strategy {strategy!r} selects no nn.Linear in {type(model).__name__} (family {fam.name!r}, "
            f"prefixes {fam.prefixes}); check the family prefixes and the skip list {list(skip)}")
    return out

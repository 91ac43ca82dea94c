"""Learned N:M masks (after MaskLLM, Fang et al., arXiv 2409.17481): each group of M weights
chooses one of its C(M, N) candidate patterns through a Gumbel-softmax over learnable logits,
trained end to end by distillation from the dense model, starting from a prior mask (SparseGPT's).

Why: one-shot methods pick each layer's mask to reproduce that layer alone; the errors compound
through the network. Learning the choice against the whole model's output (block by block, as
:mod:`sparselora.distill` matches) moves the groups where another pattern serves the model better.

The mask is decided here, before any adapter exists; the weights for it are then re-solved by
``prune(..., masks=learned, refit_iters=...)`` (SparseGPT's compensation for a given mask), and
SparseLoRA restoration runs on that fixed mask. A mask never changes during or after SparseLoRA.

Cost: every group carries C(M, N) float32 logits (6 per 4 weights at 2:4: 1.5 floats per weight),
with their gradient and AdamW's two moments 24 bytes per pruned weight (logged at INFO), and a
soft mask per layer lives during a forward; the source weights are read in place, never copied.
A tool for models that fit in memory several times over: at 7B that is ~150 GiB.

Measured (all-MiniLM-L6-v2, ``benchmarks/eval_ood.py``, seed-0 screening in
``benchmarks/results/eval_ood_bases.md``): with Gumbel sampling at prior strength 3 the masks
wandered (36 % of groups changed in 300 steps) and the model got worse (held-out cosine 0.878 →
0.784); the plain softmax relaxation (``gumbel=False``, 150 steps, lr 0.05) changed ~3.7 % of the
groups and gained +0.003-0.004 one-shot on each of 3 seeds (2048-sentence refit SparseGPT prior);
after SparseLoRA restoration the learned-mask model ended 0.001-0.002 *below* the one restored on
SparseGPT's masks (the mask learning and the restoration use the same signal), so restoration's
default path does not use it.
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..format import SparsityError
from .methods import Pattern, parse_pattern

__all__ = ["candidate_patterns", "prior_logits", "learn_masks"]

log = logging.getLogger(__name__)


def candidate_patterns(n: int, m: int, device=None) -> torch.Tensor:
    """[C(m, n), m] bool: every way to keep n of m consecutive weights."""
    rows = [[j in keep for j in range(m)] for keep in itertools.combinations(range(m), n)]
    return torch.tensor(rows, dtype=torch.bool, device=device)


def prior_logits(keep: torch.Tensor, pattern: Pattern, strength: float) -> torch.Tensor:
    """[rows, cols/m, C] logits favouring the prior mask: ``strength`` × (kept positions a
    candidate shares with the prior) / n, so the prior pattern scores ``strength`` and a
    candidate disjoint from it scores 0."""
    rows, cols = keep.shape
    cand = candidate_patterns(pattern.n, pattern.m, keep.device)
    groups = keep.reshape(rows, cols // pattern.m, 1, pattern.m)
    overlap = (groups & cand).sum(-1).float()
    return overlap * (strength / pattern.n)


class _SoftMaskLinear(nn.Module):
    """A Linear whose weight is ``source ⊙ mask``; in training the mask is a softmax mix of the
    candidate patterns (of Gumbel-perturbed logits if ``gumbel``), in eval the argmax pattern."""

    def __init__(self, lin: nn.Linear, source: torch.Tensor, logits: torch.Tensor, pattern: Pattern):
        super().__init__()
        self.register_buffer("source", source.detach(), persistent=False)  # read only: no second copy
        self.bias = lin.bias
        self.mask_logits = nn.Parameter(logits)
        self.register_buffer("cand", candidate_patterns(pattern.n, pattern.m, logits.device).to(source.dtype), persistent=False)
        self.tau = 1.0
        self.gumbel = False

    def mask(self) -> torch.Tensor:
        rows = self.source.shape[0]
        if self.training:
            z = self.mask_logits
            if self.gumbel:  # Gumbel(0, 1) = -log(Exp(1))
                z = z - torch.empty_like(z).exponential_().log_()
            p = F.softmax(z / self.tau, dim=-1)
        else:
            p = F.one_hot(self.mask_logits.argmax(-1), self.cand.shape[0]).to(self.source.dtype)
        return (p.to(self.source.dtype) @ self.cand).reshape(rows, -1)

    def hard_keep(self) -> torch.Tensor:
        return self.cand.bool()[self.mask_logits.argmax(-1)].reshape(self.source.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.source * self.mask(), self.bias)


def learn_masks(model: nn.Module, teacher: nn.Module, priors: Mapping[str, torch.Tensor], batches: Iterable[Any],
                pattern: Any = "2:4", steps: int = 150, lr: float = 0.05, prior_strength: float = 3.0,
                tau: tuple[float, float] = (1.0, 0.05), sources: Optional[Mapping[str, torch.Tensor]] = None,
                gumbel: bool = False, progress: bool = True, **distill_opts) -> dict:
    """Learn an N:M mask for each layer named in ``priors`` by distillation from ``teacher``.

    ``model``: the network to train the masks in (typically a copy of the dense teacher); each
    named ``nn.Linear`` is swapped, for the run only, for one whose weight is ``source ⊙ mask``
    (``sources[name]`` or, by default, its own weight) and restored untouched afterwards.
    ``priors[name]``: the starting keep mask (bool, the layer's shape, exactly N:M), whose pattern
    gets logit ``prior_strength`` (:func:`prior_logits`). The softmax temperature falls
    geometrically from ``tau[0]`` to ``tau[1]``; ``gumbel=True`` samples the relaxed mask as
    MaskLLM does, the default is the plain softmax relaxation (no sampling noise, which measured
    better at this budget: module docstring); the logits train by AdamW at ``lr``;
    ``distill_opts`` go to :func:`sparselora.distill.distill` (``layers``, ``loss``, ``aux_loss``,
    ``output_fn``, ``schedule`` ...). Returns ``{"masks": {name: keep}, "changed": {name:
    fraction of groups whose pattern differs from the prior}, "loss_first", "loss_last"}``.
    """
    from ..distill import distill

    p = parse_pattern(pattern)
    if not p.is_nm:
        raise SparsityError(f"learn_masks: pattern must be N:M, got {pattern!r}")
    if steps < 1:
        raise ValueError(f"learn_masks: steps must be >= 1, got {steps}")
    if not (len(tau) == 2 and tau[0] > 0 and tau[1] > 0):
        raise ValueError(f"learn_masks: tau must be two positive temperatures (start, end), got {tau!r}")
    if not priors:
        raise ValueError("learn_masks: priors is empty (no layer to learn a mask for)")
    swapped: dict[str, tuple[nn.Module, str, nn.Linear, _SoftMaskLinear]] = {}
    try:
        for name, keep in priors.items():
            lin = model.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                raise SparsityError(f"learn_masks: {name} is a {type(lin).__name__}, not an nn.Linear")
            p.check_keep(keep, lin.weight.shape, f"learn_masks: prior mask of {name}", name)
            src = sources[name] if sources is not None else lin.weight
            if src.shape != lin.weight.shape:
                raise SparsityError(f"learn_masks: source weight of {name} has shape {tuple(src.shape)}, expected {tuple(lin.weight.shape)}")
            soft = _SoftMaskLinear(lin, src.to(lin.weight.dtype), prior_logits(keep.to(lin.weight.device), p, prior_strength), p)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            soft.gumbel = gumbel
            setattr(parent, child, soft)
            swapped[name] = (parent, child, lin, soft)
        softs = [s for *_, s in swapped.values()]
        # the logits, their gradients and AdamW's two moments: what learning adds to the model
        extra = 4 * sum(s.mask_logits.numel() * s.mask_logits.element_size() for s in softs)
        log.info("learn_masks: %d layers, %.1f MiB of mask logits, gradients and optimizer state", len(softs), extra / 2**20)
        t0, t1 = tau
        ratio = math.log(t1 / t0)

        def anneal(step: int, total: int) -> None:
            t = t0 * math.exp(ratio * step / max(1, total - 1))
            for s in softs:
                s.tau = t

        stats = distill(model, teacher, batches, steps=steps, lr=lr, progress=progress, params=[s.mask_logits for s in softs],
                        on_step=anneal, **distill_opts)
        with torch.no_grad():
            masks = {n: s.hard_keep() for n, (*_, s) in swapped.items()}
        changed = {n: (masks[n] != priors[n].to(masks[n].device)).reshape(masks[n].shape[0], -1, p.m).any(-1).float().mean().item()
                   for n in masks}
    finally:
        for parent, child, lin, _ in swapped.values():
            setattr(parent, child, lin)
    return {"masks": masks, "changed": changed, "loss_first": stats["first"], "loss_last": stats["last"]}

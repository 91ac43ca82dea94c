"""The default restoration recipe: SparseLoRA adapters on every pruned layer, distilled from the
dense teacher block by block (every repeated transformer block's output, vision and language
alike, plus the final output), with a warm-up + cosine learning-rate schedule.

Why this recipe (all-MiniLM-L6-v2, ``benchmarks/results/eval_ood.md``, measured on five held-out
domains): matching every block tells each adapter what its own block should produce and closed
more of the cosine gap than matching the final output only. For sentence-embedding models add
``contrastive=EMBEDDING_CONTRASTIVE`` (with an ``output_fn`` that pools): it keeps the
nearest-neighbour order that cosine matching alone loses. Feed it varied data, as many distinct
examples as the steps can visit: 2048 distinct sentences beat 512 cycled at the same cost
(:func:`sparselora.text_sources.calibration_texts` mixes several sources). What it does not do
there: recover the labelled retrieval task lost by one-shot 2:4 pruning (see the README).

What it starts from matters as much: SparseGPT calibrated on ~2048 varied sentences (not 512) and
followed by the kept-weight refit (``prune(..., refit_iters=100)``) gave the best restored model
measured (held-out cosine 0.900 over 3 seeds, against 0.881 from the plain 512-sentence base).
The better the base, the less the restore adds (+0.034 on the plain base, +0.014 on that one).
Masks learned end to end before restoring (:mod:`sparselora.pruning.learned_masks`) raised the
one-shot model slightly, but not the restored one.

What trains matters too: ``method="masked"`` (the kept weights themselves, gradient masked) beat
the rank-16 adapters on that base on every seed (held-out cosine 0.906 against 0.900, 3 seeds, at
less CPU time; 0.912 with 400 steps) and training every weight then re-pruning (0.900); SparseLoRA
needed 5x the steps (0.905, seed 0) to match it (``benchmarks/results/eval_ood_masked.md``). It
needs float32 weights and 3x the pruned weights' bytes for gradients and Adam state, so adapters
stay the default: they train in any dtype at any size and keep the frozen base shareable.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from .distill import distill, info_nce
from .lora import add_sparse_lora
from .masked_training import masked_gradients, masked_layers, pruned_linears

__all__ = ["RECIPE", "METHODS", "MASKED_LR", "DEFAULT_LR", "EMBEDDING_CONTRASTIVE", "restore", "pruned_linears"]

# the default budget and objective; the CLI's ``restore`` uses these
RECIPE = dict(steps=200, rank=16, alpha_per_rank=2.0, lr=4e-3, schedule="cosine", warmup=10, layers="blocks",
              layer_weight=1.0)

#: ``sparselora``: low-rank adapters whose update is masked (memory-light, any weight dtype, merged
#: afterwards); ``masked``: the kept weights themselves train in place, their gradient masked, so the
#: pruned entries never move (no adapters, nothing to merge; optimizer state 2x the pruned weights;
#: float32 weights only). Same recipe otherwise.
METHODS = ("sparselora", "masked")

#: peak learning rate of ``method="masked"`` (Adam on the weights themselves, not on adapters);
#: on all-MiniLM-L6-v2 (seed 0) 1e-4 under-trained, 1e-3 fitted the training text and lost out of domain
MASKED_LR = 3e-4

#: the peak learning rate ``restore`` (and the CLI) uses when none is given, by method
DEFAULT_LR = {"sparselora": RECIPE["lr"], "masked": MASKED_LR}

#: weight of the :func:`sparselora.distill.info_nce` term for sentence-embedding models (pass
#: ``contrastive=EMBEDDING_CONTRASTIVE`` with an ``output_fn`` that returns one embedding per
#: example): on all-MiniLM-L6-v2 it kept the restored model's nearest-neighbour order, which cosine
#: matching alone lost (``benchmarks/results/eval_ood.md``)
EMBEDDING_CONTRASTIVE = 0.5


def restore(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], steps: int = RECIPE["steps"],
            rank: int = RECIPE["rank"], alpha: Optional[float] = None, lr: Optional[float] = None, loss: str = "mse",
            output_fn: Optional[Callable[[Any], Any]] = None, progress: bool = True, contrastive: float = 0.0,
            method: str = "sparselora", **overrides) -> dict:
    """Restore ``student`` (pruned, e.g. by :func:`sparselora.pruning.prune`) by distilling from
    ``teacher`` with the default recipe; ``overrides`` replace any other :data:`RECIPE` entry
    (``schedule``, ``warmup``, ``layers``, ``layer_weight``) or pass further :func:`distill` options.

    ``method`` (:data:`METHODS`): ``"sparselora"`` attaches SparseLoRA adapters (rank ``rank``) to the
    pruned layers if it has none yet; merge them with :func:`sparselora.lora.merge_sparse_lora`
    (exactly 2:4, same mask). ``"masked"`` trains the kept weights of every pruned layer in place
    (gradient masked, exactly the same mask afterwards, nothing to merge). ``lr`` defaults to
    :data:`DEFAULT_LR` of the method.
    ``contrastive`` > 0 adds that weight times :func:`sparselora.distill.info_nce` on the compared
    outputs, which must then be ``[batch, dim]`` embeddings (see :data:`EMBEDDING_CONTRASTIVE`).
    Returns distill's stats plus ``"names"`` (the restored layers) and ``"method"``."""
    from .lora import SparseLoRALinear

    if method not in METHODS:
        raise ValueError(f"restore: method must be one of {', '.join(METHODS)}, got {method!r}")
    if not contrastive >= 0:
        raise ValueError(f"restore: contrastive must be >= 0, got {contrastive!r}")
    layers = None
    if method == "masked":
        if "params" in overrides:
            raise ValueError("restore(method='masked'): the pruned weights are the parameters; do not pass params")
        layers = masked_layers(student, "restore(method='masked')")
        names = list(layers)
        overrides["params"] = [lin.weight for lin in layers.values()]
    else:
        names = [n for n, m in student.named_modules() if isinstance(m, SparseLoRALinear)]
        if not names:
            names = add_sparse_lora(student, r=rank, alpha=alpha if alpha is not None else RECIPE["alpha_per_rank"] * rank)
        if not names:
            raise ValueError("restore: the student has no pruned (2:4) Linear layers to attach adapters to")
    lr = DEFAULT_LR[method] if lr is None else lr
    opts = {k: RECIPE[k] for k in ("schedule", "warmup", "layers", "layer_weight")}
    if contrastive:
        if "aux_loss" in overrides:
            raise ValueError("restore: pass either contrastive or aux_loss, not both")
        opts["aux_loss"] = lambda s, t: contrastive * info_nce(s, t)
    opts.update(overrides)
    if steps <= opts["warmup"]:
        opts["warmup"] = steps // 10
    with masked_gradients(layers) if layers else contextlib.nullcontext():
        stats = distill(student, teacher, batches, steps=steps, lr=lr, loss=loss, output_fn=output_fn, progress=progress, **opts)
    return dict(stats, names=names, method=method)

"""Restoration: recover what pruning lost from the dense teacher without leaving the 2:4 masks.

Three methods (:data:`METHODS`), one entry point, :func:`restore`:

* ``"blocks"`` (the default, :data:`DEFAULT_METHOD`): block-wise reconstruction
  (:func:`sparselora.block_reconstruct.reconstruct_blocks`): each transformer block's kept weights
  are fitted in place, one block at a time, to what the dense block produces on the student's own
  inputs. Any dtype (a float32 working copy of one block), optimizer state for one block only,
  nothing to merge.
* ``"sparselora"``: SparseLoRA adapters on every pruned layer, distilled end to end (every
  repeated block's output plus the final output, warm-up + cosine learning rate), merged
  afterwards with exactly the same mask; the frozen base stays shareable.
* ``"masked"``: the kept weights distilled end to end in place, gradient masked (float32 only;
  gradients and Adam state add 3x the pruned weights' bytes).

Why the default (all-MiniLM-L6-v2, every Linear 2:4 by SparseGPT on 2048 mixed sentences + the
kept-weight refit; five held-out domains, ``benchmarks/results/eval_ood_blocks.md``, 3 seeds):
block-wise reconstruction at 512 steps per block reached held-out cosine 0.937 (one-shot 0.887,
SparseLoRA 0.900, masked 0.906 at 200 steps and 0.912 at 400, "LoRA, merge, re-prune" 0.896-0.900
at 200-600 steps), kept the dense model's nearest neighbours best (top-1 agreement 0.79 against
0.70-0.72) and was the only restoration that raised the labelled retrieval task at all (over
one-shot, 5 seeds: MRR +0.014 on every seed, acc@1 +0.013 ± 0.016), ahead of every LoRA re-prune
budget on every metric and seed; ~385 CPU-s on one thread, 230 s wall on two. On the five
calibration domains of today's default text (``eval_ood_blocks_mix5.md``, 5 seeds): cosine 0.941,
acc@1 and MRR +0.016 over one-shot on every seed, acc@1 − dense −0.018 ± 0.008. A local objective
tells every weight exactly what its block should produce, and a step costs one block's forward and
backward, with no teacher pass. On text-only batches each token's error is weighted by its
frequency ** -0.5 (:data:`TEXT_RARE_TOKENS`): acc@1 −0.014 ± 0.009 of dense instead of −0.018, MRR up
on every seed, at a held-out cosine of 0.937 instead of 0.941 (``eval_ood_rare_tokens.md``).
Following it with end-to-end distillation lowered the held-out cosine (0.9185 against 0.9235 at
128 steps per block, seed 0).

For the end-to-end methods: matching every block closed more of the cosine gap than matching the
final output only; for sentence-embedding models add ``contrastive=EMBEDDING_CONTRASTIVE`` (with an
``output_fn`` that pools). Feed any method varied data, as many distinct examples as the steps can
visit (:func:`sparselora.text_sources.calibration_texts` mixes several sources). Restoration keeps
more fidelity on text like its calibration text (MiniLM, the default: 0.968 cosine on unseen
sentences of its calibration domains, 0.937 on other domains), so where you have text of the
domain the model will serve, calibrate on it. What it starts
from matters as much: SparseGPT calibrated on ~2048 varied sentences and followed by the
kept-weight refit (``prune(..., refit_iters=100)``) was the best base measured. What none of them
does there: bring the labelled retrieval task back to the dense model's accuracy (see the README).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from .block_reconstruct import RECONSTRUCT, reconstruct_blocks
from .distill import distill, info_nce
from .lora import add_sparse_lora
from .masked_training import masked_gradients, masked_layers, pruned_linears

log = logging.getLogger(__name__)

__all__ = ["RECIPE", "METHODS", "DEFAULT_METHOD", "MASKED_LR", "DEFAULT_LR", "DEFAULT_STEPS", "EMBEDDING_CONTRASTIVE",
           "TEXT_RARE_TOKENS", "restore", "pruned_linears"]

# the default budget and objective; the CLI's ``restore`` uses these
RECIPE = dict(steps=200, rank=16, alpha_per_rank=2.0, lr=4e-3, schedule="cosine", warmup=10, layers="blocks",
              layer_weight=1.0)

#: ``sparselora``: low-rank adapters whose update is masked (memory-light, any weight dtype, merged
#: afterwards); ``masked``: the kept weights themselves train in place, their gradient masked, so the
#: pruned entries never move (no adapters, nothing to merge; optimizer state 2x the pruned weights;
#: float32 weights only). Same recipe otherwise. ``blocks``: block-wise reconstruction
#: (:func:`sparselora.block_reconstruct.reconstruct_blocks`): each transformer block's kept weights
#: fitted in place, one block at a time, to what the dense block produces (any dtype: a float32
#: working copy of one block; optimizer state for one block only; nothing to merge).
METHODS = ("blocks", "sparselora", "masked")

#: what ``restore`` and the CLI's ``restore`` run when no method is given
DEFAULT_METHOD = "blocks"

#: peak learning rate of ``method="masked"`` (Adam on the weights themselves, not on adapters);
#: on all-MiniLM-L6-v2 (seed 0) 1e-4 under-trained, 1e-3 fitted the training text and lost out of domain
MASKED_LR = 3e-4

#: the peak learning rate ``restore`` (and the CLI) uses when none is given, by method
DEFAULT_LR = {"blocks": RECONSTRUCT["lr"], "sparselora": RECIPE["lr"], "masked": MASKED_LR}

#: the steps ``restore`` (and the CLI) runs when none are given, by method (``blocks``: per block)
DEFAULT_STEPS = {"blocks": RECONSTRUCT["steps"], "sparselora": RECIPE["steps"], "masked": RECIPE["steps"]}

#: weight of the :func:`sparselora.distill.info_nce` term for sentence-embedding models (pass
#: ``contrastive=EMBEDDING_CONTRASTIVE`` with an ``output_fn`` that returns one embedding per
#: example): on all-MiniLM-L6-v2 it kept the restored model's nearest-neighbour order, which cosine
#: matching alone lost (``benchmarks/results/eval_ood.md``)
EMBEDDING_CONTRASTIVE = 0.5


#: the further options ``restore(method="blocks")`` passes to :func:`reconstruct_blocks`
BLOCK_OPTIONS = ("warmup", "mask_steps", "rare_tokens", "pooled")

#: ``restore(method="blocks")``'s ``rare_tokens`` on text-only batches (each token's error weighted
#: by its frequency ** -0.5 in the calibration text): on all-MiniLM-L6-v2 (5 seeds,
#: ``eval_ood_rare_tokens.md``) it raised held-out retrieval MRR on every seed and acc@1 on four of
#: five, at a held-out cosine 0.004 lower. Image-text batches keep equal weights: their image
#: placeholder tokens, the most frequent of all, would lose nearly all their weight (unmeasured).
TEXT_RARE_TOKENS = 0.5

#: the keys of a text-only batch (anything else, e.g. ``pixel_values``, makes it image-text)
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})


def restore(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], steps: Optional[int] = None,
            rank: Optional[int] = None, alpha: Optional[float] = None, lr: Optional[float] = None, loss: Optional[str] = None,
            output_fn: Optional[Callable[[Any], Any]] = None, progress: bool = True, contrastive: float = 0.0,
            method: str = DEFAULT_METHOD, **overrides) -> dict:
    """Restore ``student`` (pruned, e.g. by :func:`sparselora.pruning.prune`) by distilling from
    ``teacher`` with the default recipe; ``overrides`` replace any other :data:`RECIPE` entry
    (``schedule``, ``warmup``, ``layers``, ``layer_weight``) or pass further :func:`distill` options.

    ``method`` (:data:`METHODS`): ``"sparselora"`` attaches SparseLoRA adapters (rank ``rank``) to the
    pruned layers if it has none yet; merge them with :func:`sparselora.lora.merge_sparse_lora`
    (exactly 2:4, same mask). ``"masked"`` trains the kept weights of every pruned layer in place
    (gradient masked, exactly the same mask afterwards, nothing to merge).
    ``contrastive`` > 0 adds that weight times :func:`sparselora.distill.info_nce` on the compared
    outputs, which must then be ``[batch, dim]`` embeddings (see :data:`EMBEDDING_CONTRASTIVE`).
    ``"blocks"`` runs :func:`sparselora.block_reconstruct.reconstruct_blocks` (``steps`` per block;
    ``batches`` of forward-kwargs dicts; in place, nothing to merge, any dtype); the distillation
    options (``rank``, ``alpha``, ``loss``, ``output_fn``, ``contrastive``, overrides) do not apply to
    it and are refused; its own options (:data:`BLOCK_OPTIONS`: ``warmup``, ``mask_steps``,
    ``rare_tokens``, ``pooled``) pass through as overrides; ``rare_tokens`` defaults to :data:`TEXT_RARE_TOKENS`
    on text-only batches and 0 otherwise. ``steps`` and ``lr`` default to :data:`DEFAULT_STEPS` / :data:`DEFAULT_LR` of
    the method.
    Returns distill's stats (``"blocks"``: reconstruct_blocks' report and the mean block error before
    and after) plus ``"names"`` (the restored layers) and ``"method"``."""
    from .lora import SparseLoRALinear

    if method not in METHODS:
        raise ValueError(f"restore: method must be one of {', '.join(METHODS)}, got {method!r}")
    if not contrastive >= 0:
        raise ValueError(f"restore: contrastive must be >= 0, got {contrastive!r}")
    steps = DEFAULT_STEPS[method] if steps is None else steps
    lr = DEFAULT_LR[method] if lr is None else lr
    if method == "blocks":
        given = {k for k, v in dict(rank=rank, alpha=alpha, loss=loss, output_fn=output_fn).items() if v is not None}
        given |= {"contrastive"} if contrastive else set()
        foreign = given | (set(overrides) - set(BLOCK_OPTIONS))
        if foreign:
            raise ValueError(f"restore(method='blocks'): {', '.join(sorted(foreign))} do not apply: each block "
                             "matches its dense block's output (use method='sparselora' or 'masked' for end-to-end distillation; "
                             f"block-wise options: {', '.join(BLOCK_OPTIONS)})")
        if "rare_tokens" not in overrides:
            batches = list(batches)
            text_only = bool(batches) and all(isinstance(b, dict) and "input_ids" in b and set(b) <= _TEXT_KEYS for b in batches)
            overrides["rare_tokens"] = TEXT_RARE_TOKENS if text_only else 0.0
            log.info("restore(method='blocks'): %s batches, rare_tokens=%s", "text-only" if text_only else "image-text",
                     overrides["rare_tokens"])
        report = reconstruct_blocks(student, teacher, batches, steps=steps, lr=lr, progress=progress, **overrides)
        fitted = [r for r in report["blocks"] if "before" in r]
        mean = (lambda key: sum(r[key] for r in fitted) / len(fitted)) if fitted else (lambda key: float("nan"))
        loose = set(report["loose"])
        names = [n for n in pruned_linears(student) if n not in loose]
        return dict(report, names=names, method=method, steps=steps, rare_tokens=overrides["rare_tokens"],
                    block_error_before=mean("before"), block_error_after=mean("after"))
    if method != "sparselora" and (rank is not None or alpha is not None):
        raise ValueError(f"restore(method={method!r}): rank and alpha are the adapters' (method='sparselora')")
    rank = RECIPE["rank"] if rank is None else rank
    loss = "mse" if loss is None else loss
    layers = None
    if method == "masked":
        if "params" in overrides:
            raise ValueError("restore(method='masked'): the pruned weights are the parameters; do not pass params")
        layers = masked_layers(student, "restore(method='masked')")
        nbytes = sum(lin.weight.numel() * lin.weight.element_size() for lin in layers.values())
        log.info("masked restoration: %d weights of %d layers train in place; gradients and Adam state add %.1f MiB "
                 "(3x the trained weights)", sum(lin.weight.numel() for lin in layers.values()), len(layers), 3 * nbytes / 2**20)
        names = list(layers)
        overrides["params"] = [lin.weight for lin in layers.values()]
    else:
        names = [n for n, m in student.named_modules() if isinstance(m, SparseLoRALinear)]
        if not names:
            names = add_sparse_lora(student, r=rank, alpha=alpha if alpha is not None else RECIPE["alpha_per_rank"] * rank)
        if not names:
            raise ValueError("restore: the student has no pruned (2:4) Linear layers to attach adapters to")
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

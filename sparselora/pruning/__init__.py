"""Pruning for VLMs: magnitude, Wanda, SparseGPT; modality-aware strategies; ECoFLaP ratios.

    from sparselora.pruning import prune
    report = prune(model, method="wanda", pattern="2:4", calib=batches, strategy="language")
    print(report.to_markdown()); report.to_json("prune.json")

After pruning, each selected ``nn.Linear`` stays an ``nn.Linear`` whose weight is zero outside
its mask and which carries the boolean buffer ``sparse_mask`` ([out, in], non-persistent):
what SparseLoRA and the sparse kernels consume.

Modules: :mod:`.methods` (criteria), :mod:`.calibrate` (block-by-block statistics),
:mod:`.strategy` (which layers; default skips), :mod:`.ecoflap` (layer-wise ratios),
:mod:`.report` (table/JSON).
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..families import DEFAULT_SKIP_PARTS, Family, reads_padded_positions
from ..format import SparsityError, check_finite
from ..progress import progress_bar
from .calibrate import (MemoryProbe, StatsCollector, as_batches, calibration_batches, capture_block_inputs, check_sequential,
                        find_block_lists, in_call_order, real_tokens, run_block, run_model)
from .ecoflap import allocate_ratios, zeroth_order_scores
from .offload import host_model_on_device, is_offloaded, layer_weight
from .methods import Pattern, magnitude_mask, parse_pattern, sparsegpt_prune, wanda_mask
from .report import LayerRow, PruneReport
from .strategy import Target, select_targets

log = logging.getLogger(__name__)

__all__ = ["prune", "apply_mask", "PruneReport", "LayerRow", "Pattern", "parse_pattern", "magnitude_mask", "wanda_mask",
           "sparsegpt_prune", "select_targets", "calibration_batches", "allocate_ratios", "zeroth_order_scores", "DEFAULT_SKIP_PARTS",
           "METHODS"]

METHODS = ("magnitude", "wanda", "sparsegpt")


@torch.no_grad()
def apply_mask(module: nn.Linear, keep: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
    """Zero ``module.weight`` (or write ``weight``) outside ``keep`` and store ``sparse_mask``."""
    w = module.weight
    if keep.shape != w.shape or keep.dtype != torch.bool:
        raise SparsityError(f"mask must be bool of shape {tuple(w.shape)}, got {keep.dtype} {tuple(keep.shape)}")
    keep = keep.to(w.device)
    src = w if weight is None else weight.to(w.device, w.dtype)
    w.copy_(torch.where(keep, src, torch.zeros((), dtype=w.dtype, device=w.device)))
    if "sparse_mask" in module._buffers:
        module._buffers["sparse_mask"] = keep
    else:
        module.register_buffer("sparse_mask", keep, persistent=False)


@torch.no_grad()  # calibration forwards must not build autograd graphs (memory)
def prune(
    model: nn.Module,
    method: str = "wanda",
    pattern: Union[str, float] = "2:4",
    calib: Any = None,
    strategy: Union[str, Mapping] = "language",
    ratios: str = "uniform",
    family: Optional[Union[Family, str]] = None,
    skip: Iterable[str] = (),
    progress: bool = True,
    *,
    percdamp: float = 0.01,
    refit_iters: int = 0,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    blocksize: int = 128,
    ecoflap_max: Optional[float] = None,
    ecoflap_min: float = 0.0,
    ecoflap_eps: float = 1e-2,
    ecoflap_samples: int = 2,
    ecoflap_granularity: str = "block",
    ecoflap_temperature: float = 1.0,
    ecoflap_batches: Optional[int] = None,
    loss_fn: Optional[Callable] = None,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    exclude_padding: bool = True,
    sentence_rows: float = 0.0,
) -> PruneReport:
    """Prune the Linear layers a strategy selects, in place.

    Args:
        method: ``"magnitude"`` (no calibration), ``"wanda"`` or ``"sparsegpt"``.
        pattern: ``"2:4"``, ``"4:8"`` (any ``"N:M"``) or an unstructured ratio in ``[0, 1)``;
            overridden per part by a strategy dict.
        calib: calibration batches, an iterable of ``model(**batch)`` kwargs dicts (a
            DataLoader, :func:`calibration_batches` over images + prompts, or for tiny models
            ``[sparselora.tiny_models.example_inputs(...)]``). Needed by Wanda, SparseGPT and ECoFLaP.
        strategy: ``"both"``, ``"language"``, ``"vision"`` or ``{part: ratio-or-pattern}``
            (see :mod:`sparselora.pruning.strategy` for the default skips).
        ratios: ``"uniform"`` (every layer at its pattern) or ``"ecoflap"`` (per-layer ratios
            from zeroth-order global importance, meeting each part's ratio on average;
            unstructured patterns only).
        family: a :class:`~sparselora.families.Family`, a family name, or None (from
            ``config.model_type``); unknown models need ``custom_family(...)``.
        skip: layer names to leave dense (exact name, prefix, or ``.suffix``).
        percdamp, blocksize: SparseGPT dampening (fraction of mean diag H) and lazy block width.
        refit_iters: SparseGPT only: conjugate-gradient iterations that re-solve the kept weights
            for the final mask (``methods.refit_kept``; 0 = off).
        masks: ``{layer name: bool keep mask}`` to use instead of choosing one (e.g. learned by
            :func:`sparselora.pruning.learned_masks.learn_masks`); each must fit the layer's pattern.
            Magnitude and Wanda then just apply it; SparseGPT compensates the kept weights for it.
        device: calibrate a model that lives on the host on this device, one module's weights
            there at a time (accelerate's ``cpu_offload`` hooks for the duration; the pruned
            weights are the host tensors afterwards). A model already dispatched by accelerate
            (``device_map`` with CPU/disk offload) is pruned as it is, through its own hooks,
            with ``device=None``.
        ecoflap_*: ECoFLaP per-layer max/min ratio, perturbation size, random directions,
            ``"block"`` or ``"layer"`` granularity, temperature, and how many of the
            calibration batches score importance (None: all; it costs
            ``2 * samples * groups`` forwards per batch). ``loss_fn(outputs, batch)``
            replaces its default loss.
        exclude_padding: Wanda's norms and SparseGPT's Hessians count only the positions a batch's
            2-D ``attention_mask`` keeps, in layers whose input runs along it (see
            :mod:`.calibrate`); False counts padded positions too (the behaviour before 2026-12-08).
            A model whose output reads padded positions (SigLIP's text tower pools its last one;
            :func:`sparselora.families.reads_padded_positions`) counts them either way.
        sentence_rows: with padding excluded, each sequence's mean input row is added to its
            layers' statistics, weighted this many times its real-token count (sentence-level
            inputs; an experiment, 0 = off).
    Returns: a :class:`PruneReport`.
    """
    if refit_iters and method != "sparsegpt":
        raise ValueError(f"prune: refit_iters is a SparseGPT option (method={method!r})")
    if device is not None:
        with host_model_on_device(model, device):
            return prune(model, method, pattern, calib, strategy, ratios, family, skip, progress, percdamp=percdamp,
                         refit_iters=refit_iters, masks=masks, blocksize=blocksize, ecoflap_max=ecoflap_max, ecoflap_min=ecoflap_min, ecoflap_eps=ecoflap_eps,
                         ecoflap_samples=ecoflap_samples, ecoflap_granularity=ecoflap_granularity,
                         ecoflap_temperature=ecoflap_temperature, ecoflap_batches=ecoflap_batches, loss_fn=loss_fn, seed=seed,
                         exclude_padding=exclude_padding, sentence_rows=sentence_rows)
    t_start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {METHODS}")
    if ratios not in ("uniform", "ecoflap"):
        raise ValueError(f"ratios must be 'uniform' or 'ecoflap', got {ratios!r}")
    targets = select_targets(model, strategy, pattern, family, skip)
    masks = _check_given_masks(masks, targets, ratios)
    for name, t in targets.items():  # fail before anything is modified (offloaded layers: onloaded one at a time)
        with layer_weight(model, name) as lin:
            check_finite(lin.weight.detach(), name)
    if ratios == "ecoflap":
        offloaded = [n for n in targets if is_offloaded(model, n)]
        if offloaded:  # its zeroth-order scores perturb the weights in place, between forwards
            raise ValueError(f"ratios='ecoflap' needs resident weights; {len(offloaded)} target layers are offloaded by "
                             f"accelerate (first: {offloaded[0]}); use ratios='uniform' or load the model without offload")
    need_calib = method != "magnitude" or ratios == "ecoflap"
    batches = as_batches(calib) if need_calib else None

    was_training = model.training
    model.eval()
    probe = MemoryProbe()
    report = PruneReport(meta={"method": method, "strategy": strategy if isinstance(strategy, str) else dict((k, str(v)) for k, v in strategy.items()),
                               "ratios": ratios})
    if not sentence_rows >= 0 or (sentence_rows and not exclude_padding):
        raise ValueError(f"prune: sentence_rows must be >= 0 and needs exclude_padding=True (the attention mask says which "
                         f"rows are a sentence's), got sentence_rows={sentence_rows!r}, exclude_padding={exclude_padding!r}")
    if exclude_padding and reads_padded_positions(model):
        log.info("prune: %s reads hidden states at padded positions (it pools its last position): padding counts",
                 type(model).__name__)
        exclude_padding = False
    if method != "magnitude":
        positions = [real_tokens(b) for b in batches]
        report.meta.update(exclude_padding=exclude_padding,
                           padded_positions=sum(int((~k).sum()) for k in positions if k is not None),
                           positions=sum(k.numel() for k in positions if k is not None))
    try:
        if ratios == "ecoflap":
            eco_batches = batches if ecoflap_batches is None else batches[: max(1, int(ecoflap_batches))]
            _ecoflap(model, targets, eco_batches, report, progress, max_ratio=ecoflap_max, min_ratio=ecoflap_min, eps=ecoflap_eps,
                     samples=ecoflap_samples, granularity=ecoflap_granularity, temperature=ecoflap_temperature, loss_fn=loss_fn, seed=seed)
        rows: dict[str, LayerRow] = {}

        def prune_layer(name: str, stats=None) -> None:
            with layer_weight(model, name, write=True):  # offloaded: onloaded, and the pruned weight stored back
                _prune_layer(name, stats)

        def _prune_layer(name: str, stats) -> None:
            t = targets[name]
            t0 = time.perf_counter()
            w = t.module.weight.detach()
            label = method
            if method != "magnitude" and (stats is None or stats.tokens == 0):
                warnings.warn(f"layer {name} saw no calibration tokens; pruned by magnitude instead of {method}", stacklevel=3)
                label = "magnitude(no-calib)"
            given = masks.get(name)
            if given is not None and (method != "sparsegpt" or label.startswith("magnitude")):
                keep, new = given.to(w.device), None
            elif label.startswith("magnitude"):
                keep, new = magnitude_mask(w, t.pattern, name), None
            elif method == "wanda":
                keep, new = wanda_mask(w, stats.sq_norm, t.pattern, name), None
            else:
                new, keep = sparsegpt_prune(w, stats.hessian, t.pattern, percdamp=percdamp, blocksize=blocksize, name=name,
                                            refit_iters=refit_iters, keep=given)
            if given is not None:
                label = f"{label}(given mask)"
            apply_mask(t.module, keep, new)
            rows[name] = LayerRow(name, t.part, label, str(t.pattern), t.pattern.sparsity, (~keep).sum().item() / keep.numel(), tuple(w.shape),
                                  time.perf_counter() - t0)

        if method == "magnitude":
            for name in progress_bar(targets, desc="magnitude", enabled=progress):
                prune_layer(name)
        else:
            _sequential(model, targets, batches, method, prune_layer, probe, progress,
                        positions if exclude_padding else None, sentence_rows)
        report.rows = [rows[n] for n in targets]  # module order
    finally:
        model.train(was_training)
    report.meta.update(peak_live_layer_stats=probe.peak, seconds_total=round(time.perf_counter() - t_start, 3))
    return report


def _check_given_masks(masks, targets: dict[str, Target], ratios: str) -> dict:
    """``prune(masks=)``: every mask names a target layer, has its shape and meets its pattern."""
    if not masks:
        return {}
    if ratios != "uniform":
        raise ValueError("prune: masks= fixes every layer's mask; it cannot be combined with ratios='ecoflap'")
    unknown = [n for n in masks if n not in targets]
    if unknown:
        raise SparsityError(f"prune: masks given for layers the strategy does not prune: {unknown[:3]}")
    for name, keep in masks.items():
        targets[name].pattern.check_keep(keep, targets[name].module.weight.shape, f"prune: mask for {name}", name)
    return dict(masks)


#: the parts whose Linears see the text tokens' hidden states (the batch's attention_mask applies)
TOKEN_PARTS = ("language", "head")


def _sequential(model, targets: dict[str, Target], batches, method, prune_layer, probe: MemoryProbe, progress: bool,
                keeps: Optional[list] = None, sentence_rows: float = 0.0) -> None:
    """Wanda/SparseGPT: calibrate and prune block by block (see :mod:`.calibrate`); ``keeps``: each
    batch's real tokens (:func:`.calibrate.real_tokens`), None to count every position."""
    need_norms, need_hessian = method == "wanda", method == "sparsegpt"
    keeps = keeps or [None] * len(batches)
    along = {n for n, t in targets.items() if t.part in TOKEN_PARTS}

    def counted(sc: StatsCollector, b: int, run):
        sc.keep, sc.sentence_rows = keeps[b], sentence_rows
        return run()

    block_lists, loose = find_block_lists(model, targets)
    block_lists = in_call_order(model, block_lists, batches[0])  # upstream parts first

    for bl in block_lists:
        cap = capture_block_inputs(model, bl, batches)
        hidden = cap.hidden
        for i in progress_bar(range(len(bl)), desc=f"{method} {bl.name}", enabled=progress):
            block, names = bl.module[i], bl.targets[i]
            if names:
                with StatsCollector({n: targets[n].module for n in names}, need_norms, need_hessian, probe, along) as sc:
                    dense = [counted(sc, b, lambda: run_block(block, cap, b, i, h)) for b, h in enumerate(hidden)]
                    if i == 0:
                        check_sequential(bl, cap, dense[0])
                    del dense
                    for n in names:
                        prune_layer(n, sc.stats[n])
            hidden_next = [run_block(block, cap, b, i, h) for b, h in enumerate(hidden)]
            if i == 0 and not names:
                check_sequential(bl, cap, hidden_next[0])
            for b, h in enumerate(hidden_next):
                if not torch.isfinite(h).all():
                    raise SparsityError(f"output of block {bl.name}.{i} contains NaN/Inf on calibration batch {b} after pruning "
                                        f"{names or 'nothing'}")
            hidden = hidden_next
        del cap, hidden
    if loose:
        # few Linears outside any block list (pooling heads, poolers): one pass with hooks on all of them
        with StatsCollector({n: targets[n].module for n in loose}, need_norms, need_hessian, probe, along) as sc:
            for b, batch in enumerate(progress_bar(batches, desc=f"{method} loose layers", enabled=progress)):
                counted(sc, b, lambda: run_model(model, batch))
            for n in loose:
                prune_layer(n, sc.stats[n])


def _ecoflap(model, targets: dict[str, Target], batches, report: PruneReport, progress: bool, *, max_ratio, min_ratio, eps, samples,
             granularity, temperature, loss_fn, seed) -> None:
    """Replace each target's unstructured ratio by its ECoFLaP per-layer ratio (per part)."""
    bad = [n for n, t in targets.items() if t.pattern.is_nm]
    if bad:
        raise SparsityError(f"ratios='ecoflap' needs unstructured ratios (an N:M pattern fixes each layer's sparsity); "
                            f"layers {bad[:3]}{'...' if len(bad) > 3 else ''} have N:M patterns")
    if granularity not in ("block", "layer"):
        raise ValueError(f"ecoflap_granularity must be 'block' or 'layer', got {granularity!r}")
    group_of: dict[str, str] = {}
    if granularity == "block":
        block_lists, loose = find_block_lists(model, targets)
        for bl in block_lists:
            for i, names in enumerate(bl.targets):
                for n in names:
                    group_of[n] = f"{bl.name}.{i}"
        for n in loose:
            group_of[n] = n
    else:
        group_of = {n: n for n in targets}
    groups: dict[str, list[nn.Linear]] = {}
    for n, g in group_of.items():
        groups.setdefault(g, []).append(targets[n].module)
    scores = zeroth_order_scores(model, groups, batches, loss_fn=loss_fn, eps=eps, samples=samples, seed=seed, progress=progress)
    by_part: dict[tuple[str, float], list[str]] = {}
    for n, t in targets.items():
        by_part.setdefault((t.part, t.pattern.ratio), []).append(n)
    alloc = {}
    for (part, target), names in by_part.items():
        r = allocate_ratios({n: scores[group_of[n]] for n in names}, {n: targets[n].module.weight.numel() for n in names},
                            target, max_ratio=max_ratio, min_ratio=min_ratio, temperature=temperature)
        alloc.update(r)
    for n, r in alloc.items():
        targets[n].pattern = Pattern(ratio=r)
    report.meta["ecoflap_scores"] = {g: round(s, 6) for g, s in scores.items()}

"""ECoFLaP layer-wise sparsity (Sung, Yoon & Bansal, arXiv 2310.02998): coarse then fine.

Coarse step — a *global* importance per block (or per layer) from forward passes only:
for each group ``g`` of Linear weights and a few random directions ``ξ ~ N(0, I)``, perturb
the group's weights by ``±ε·|W|⊙ξ`` (relative, so groups of different weight scale are
comparable), run the model, and record the mean absolute loss change

    score_g = E_ξ[ (|L(W + ε|W|ξ) − L(W)| + |L(W − ε|W|ξ) − L(W)|) / 2 ] / ε.

No backward pass and no optimizer state: the memory of inference. For a loss with nonzero
gradient (the model's own LM loss when the batches carry ``labels``, or a user
``loss_fn``) this is the zeroth-order estimate of ``|⟨∇L, W⊙ξ⟩|``, i.e. the first-order
Taylor importance ``|W·∇L|`` that ECoFLaP approximates. The default loss without labels is
the distance of the outputs to the dense model's outputs; its gradient at the dense
weights is zero, so the score then measures curvature (``ε ξᵀ(W H W)ξ / 2``) — still "how much
the model output moves when this group is disturbed".

Conversion to ratios (the allocation of the ECoFLaP reference code, solved in closed
form): every layer keeps at least ``1 − max_ratio`` of its weights, and the rest of the
keep budget is shared in proportion to importance (normalised to a parameter-weighted mean
of 1 and raised to ``1/temperature``):
``s_l = clip(max_ratio − c·imp_l, min_ratio, max_ratio)``, with ``c`` found by bisection so
that the parameter-weighted mean of ``s_l`` equals the target. More important groups are
pruned less; no layer is pruned beyond ``max_ratio`` (ECoFLaP's per-layer maximum).

Fine step — local pruning (magnitude, Wanda or SparseGPT) of each layer at its ratio;
done by :func:`sparselora.pruning.prune` with ``ratios="ecoflap"``. ECoFLaP needs
unstructured targets: an N:M pattern fixes every layer at ``1 − N/M``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from ..format import SparsityError
from ..progress import progress_bar
from .calibrate import run_model

__all__ = ["zeroth_order_scores", "allocate_ratios", "output_tensors"]


def output_tensors(out: Any) -> list[torch.Tensor]:
    """All floating-point tensors in a model output (ModelOutput / tuple / dict, nested)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []


def _distance(out: Any, ref: list[torch.Tensor]) -> torch.Tensor:
    cur = output_tensors(out)
    tot = 0.0
    for a, b in zip(cur, ref):
        b = b.double()
        tot = tot + ((a.double() - b) ** 2).sum() / ((b ** 2).sum() + 1e-30)
    return tot / max(1, len(ref))


@torch.no_grad()
def zeroth_order_scores(
    model: nn.Module,
    groups: Mapping[str, list[nn.Linear]],
    batches: list[dict],
    loss_fn: Optional[Callable[[Any, dict], torch.Tensor]] = None,
    eps: float = 1e-2,
    samples: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Zeroth-order importance of each group of Linear weights (see the module docstring).

    ``loss_fn(outputs, batch) -> scalar`` overrides the default loss (the model's ``loss``
    if every batch has ``labels``, else the output distance to the unperturbed model).
    Weights are restored bit-exactly afterwards."""
    if eps <= 0 or samples < 1:
        raise ValueError(f"ECoFLaP needs eps > 0 and samples >= 1, got eps={eps}, samples={samples}")
    use_labels = loss_fn is None and all("labels" in b for b in batches)
    refs = None
    if loss_fn is None and not use_labels:
        refs = [[t.detach().clone() for t in output_tensors(run_model(model, b))] for b in batches]

    def loss() -> float:
        tot = 0.0
        for k, b in enumerate(batches):
            out = run_model(model, b)
            if loss_fn is not None:
                v = loss_fn(out, b)
            elif use_labels:
                v = out.loss
            else:
                v = _distance(out, refs[k])
            v = float(v)
            if v != v:
                raise SparsityError(f"ECoFLaP loss is NaN on calibration batch {k}")
            tot += v
        return tot / len(batches)

    base = loss()
    gen = torch.Generator().manual_seed(seed)
    scores: dict[str, float] = {}
    for gname, mods in progress_bar(groups.items(), desc="ecoflap scores", enabled=progress):
        saved = [m.weight.detach().clone() for m in mods]
        tot = 0.0
        for _ in range(samples):
            deltas = [eps * w.abs() * torch.randn(w.shape, generator=gen).to(w.device, w.dtype) for w in saved]
            for m, w, d in zip(mods, saved, deltas):
                m.weight.copy_(w + d)
            lp = loss()
            for m, w, d in zip(mods, saved, deltas):
                m.weight.copy_(w - d)
            lm = loss()
            tot += (abs(lp - base) + abs(lm - base)) / 2
        for m, w in zip(mods, saved):
            m.weight.copy_(w)
        scores[gname] = tot / samples / eps
    return scores


def allocate_ratios(importance: Mapping[str, float], sizes: Mapping[str, int], target: float,
                    max_ratio: Optional[float] = None, min_ratio: float = 0.0, temperature: float = 1.0) -> dict[str, float]:
    """Per-layer sparsity ratios with parameter-weighted mean ``target``, pruning more
    important layers less, each within ``[min_ratio, max_ratio]`` (see the module docstring).

    ``importance``/``sizes`` are per layer (a block's score repeated for its layers).
    ``max_ratio`` defaults to ``min(0.99, target + 0.2)``."""
    if not (0.0 <= target < 1.0):
        raise SparsityError(f"ECoFLaP target sparsity must lie in [0, 1), got {target}")
    hi = min(0.99, target + 0.2) if max_ratio is None else float(max_ratio)
    lo = float(min_ratio)
    if not (0.0 <= lo <= target <= hi < 1.0):
        raise SparsityError(f"ECoFLaP needs 0 <= min_ratio <= target <= max_ratio < 1, got min={lo}, target={target}, max={hi}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    names = list(importance)
    n = torch.tensor([float(sizes[k]) for k in names], dtype=torch.float64)
    imp = torch.tensor([float(importance[k]) for k in names], dtype=torch.float64)
    if (imp < 0).any() or not torch.isfinite(imp).all():
        raise SparsityError(f"ECoFLaP importance must be finite and >= 0, got {dict(zip(names, imp.tolist()))}")
    mean = (imp * n).sum() / n.sum()
    if mean <= 0:  # nothing measurable: uniform
        return {k: float(target) for k in names}
    imp = (imp / mean) ** (1.0 / temperature)

    def avg(c: float) -> float:
        return float(((hi - c * imp).clamp(lo, hi) * n).sum() / n.sum())

    a, b = 0.0, 1.0
    while avg(b) > target:  # avg is non-increasing in c; find an upper bracket
        b *= 2
        if b > 1e12:
            break
    for _ in range(200):
        c = (a + b) / 2
        if avg(c) > target:
            a = c
        else:
            b = c
    s = (hi - b * imp).clamp(lo, hi)
    got = float((s * n).sum() / n.sum())
    if abs(got - target) > 1e-9:  # e.g. layers with zero importance pinned at max_ratio
        raise SparsityError(f"ECoFLaP cannot meet target sparsity {target} within [{lo}, {hi}] (best {got:.6f}); "
                            f"raise max_ratio or check the importance scores")
    return {k: float(v) for k, v in zip(names, s.tolist())}

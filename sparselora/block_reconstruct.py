"""Block-wise reconstruction: the kept weights of each transformer block, trained in place so the
pruned block reproduces the dense block (as EBFT does, arXiv 2402.12419), one block at a time.

For every block list holding pruned layers (vision tower, language model; the order the model
runs them, as :mod:`sparselora.pruning.calibrate` finds them), and for each block ``i`` in turn:

* the **input** is what the already-reconstructed student feeds block ``i`` (so each block
  corrects the error its predecessors left), the **target** what the dense teacher's block ``i``
  returns on the teacher's own input;
* the pruned Linears of that block train with their gradients masked
  (:mod:`sparselora.masked_training`: exactly the same 2:4 masks afterwards, nothing to merge),
  on the relative squared error ‖s − t‖² / ‖t‖² (padding excluded), Adam with a warm-up + cosine
  schedule, ``steps`` steps cycling over the batches;
* then the block's new outputs become block ``i + 1``'s inputs.

Optionally (``mask_steps``) the 2:4 masks are learned first: for the first ``mask_steps`` steps of
each block the forward sees each weight's 2:4 projection (its two largest magnitudes per group of
4) while the gradient reaches every entry (straight-through, as SR-STE and MaskLLM train masks),
starting from the pruning masks; then the masks are fixed, recorded in ``sparse_mask``, and the
kept weights train on. The result is exactly 2:4, on the learned mask. Off by default: on
MiniLM it moved 7-11 % of the kept entries and fitted the blocks no better (see the README).

Why: a step costs one block's forward and backward (no teacher, no other block), and the
objective tells every weight exactly what its block should produce. It is the local stage before
(or instead of) end-to-end distillation, :func:`sparselora.restore.restore` with
``method="masked"``.

Memory: for every batch, the student's input to the current block and the teacher's output of it
stay resident, each replaced batch by batch as the blocks advance: about 2 × batches × tokens ×
hidden × the model's bytes per element (logged); pass as many batches as that allows. Pruned
Linears outside any block list (poolers, heads) are left as they are.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from types import SimpleNamespace
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .distill import _relative_error, lr_factor
from .families import is_vision_module, reads_padded_positions
from .masked_training import masked_gradients, masked_layers
from .progress import progress_bar
from .pruning.calibrate import (as_batches, capture_block_inputs, check_sequential, find_block_lists, in_call_order, real_tokens,
                                run_block)

__all__ = ["reconstruct_blocks", "RECONSTRUCT"]

log = logging.getLogger(__name__)

#: the default budget: steps per block, Adam's peak learning rate, linear warm-up steps
RECONSTRUCT = dict(steps=512, lr=1e-3, warmup=8)

#: the first batches, at most this many, on which each block's error is reported before and after
PROBE_BATCHES = 8


def _teacher_lists(teacher: nn.Module, student_lists) -> dict:
    """The teacher's block list of the same name and length as each of the student's."""
    out = {}
    for bl in student_lists:
        try:
            mod = teacher.get_submodule(bl.name)
        except AttributeError:
            raise ValueError(f"reconstruct_blocks: the teacher has no block list {bl.name!r} (the student's); "
                             "teacher and student must be the same architecture with the same module names") from None
        if not isinstance(mod, nn.ModuleList) or len(mod) != len(bl.module):
            raise ValueError(f"reconstruct_blocks: teacher {bl.name!r} is not a ModuleList of {len(bl.module)} blocks")
        out[bl.name] = type(bl)(bl.name, mod, bl.targets)
    return out


def reconstruct_blocks(student: nn.Module, teacher: nn.Module, batches: Iterable[dict], steps: int = RECONSTRUCT["steps"],
                       lr: float = RECONSTRUCT["lr"], warmup: Optional[int] = None, mask_steps: int = 0,
                       teacher_inputs: float = 0.0, rare_tokens: float = 0.0, pooled: float = 0.0, progress: bool = True) -> dict:
    """Reconstruct every block of ``student`` (pruned; any floating dtype) from ``teacher`` (dense,
    same architecture) on ``batches`` (forward-kwargs dicts, as for pruning), ``steps`` steps per
    block. One progress bar counts every step of every block.

    ``warmup`` (linear warm-up steps) defaults to :data:`RECONSTRUCT`'s, at most a tenth of ``steps``.
    ``mask_steps`` (at most ``steps``): the first steps of each block in which its 2:4 masks may
    change (module docstring); 0 keeps the pruning masks exactly.
    ``teacher_inputs`` (in [0, 1)): in every training step, each element of the block's input is the
    teacher's input to that block with this probability instead of the student's (QDrop's mixing,
    arXiv 2203.05740: the block sees inputs between its own and the clean ones); 0 trains on the
    student's inputs only. It keeps the teacher's inputs of the current block resident as well.
    ``rare_tokens`` (>= 0): each token's error is weighted by ``frequency ** -rare_tokens``, its
    ``input_ids``' frequency in ``batches`` (weights normalised to mean 1), so rare (content) words
    count more than common ones; it applies to blocks whose hidden states run along ``input_ids``
    (a language model's, not a vision tower's); 0 weights every token alike.
    ``pooled`` (>= 0): adds this weight times the relative squared error of the block output's mean
    over the real tokens (the attention mask's; every position where it does not apply), the
    sentence-level summary an embedding model's mean pooling reads; 0 matches tokens only.
    Both models run in ``eval()`` (no dropout; restored afterwards). Returns ``{"blocks": [{"name",
    "layers", "before", "after"[, "mask_changed"]}], "loose": [pruned layers outside any block list]}``, where
    ``before`` / ``after`` are the block's mean relative error before and after its steps, on the
    student's inputs, over the first :data:`PROBE_BATCHES` batches (``before`` only where it trained),
    and ``mask_changed`` the fraction of the block's kept entries that mask learning moved."""
    if steps < 0:
        raise ValueError(f"reconstruct_blocks: steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"reconstruct_blocks: lr must be > 0, got {lr!r}")
    if warmup is None:
        warmup = min(RECONSTRUCT["warmup"], steps // 10)
    if not 0 <= mask_steps <= steps:
        raise ValueError(f"reconstruct_blocks: mask_steps must be in [0, steps={steps}], got {mask_steps}")
    if not 0.0 <= teacher_inputs < 1.0:
        raise ValueError(f"reconstruct_blocks: teacher_inputs must be in [0, 1), got {teacher_inputs!r}")
    if not rare_tokens >= 0.0:
        raise ValueError(f"reconstruct_blocks: rare_tokens must be >= 0, got {rare_tokens!r}")
    if not pooled >= 0.0:
        raise ValueError(f"reconstruct_blocks: pooled must be >= 0, got {pooled!r}")
    if warmup < 0 or (steps and warmup >= steps):
        raise ValueError(f"reconstruct_blocks: warmup must be in [0, steps), got {warmup} for {steps} steps")
    layers = masked_layers(student, "reconstruct_blocks", low_precision=True)
    try:
        batches = as_batches(batches)
    except TypeError as e:  # block inputs are captured from a forward of the whole model: forward() kwargs only
        raise ValueError(f"reconstruct_blocks: {e}; for tensor or tuple batches use restore(method='sparselora' or 'masked')") from None
    lists, loose = find_block_lists(student, layers)
    if not lists:
        raise ValueError("reconstruct_blocks: no pruned layer lives in a block list (nn.ModuleList of blocks)")
    if loose:
        log.info("reconstruct_blocks: %d pruned layers outside any block list stay as they are: %s", len(loose), loose[:4])
    lists = in_call_order(student, lists, batches[0])
    weights = _token_weights(batches, rare_tokens) if rare_tokens else None
    largest = max(sum(layers[n].weight.numel() for n in names) for bl in lists for names in bl.targets)
    log.info("reconstruct_blocks: one block at a time; the largest trains %d weights (float32 gradients and Adam "
             "state: %.1f MiB, plus a float32 working copy of a lower-precision block)", largest, 12 * largest / 2**20)
    t_lists = _teacher_lists(teacher, lists)
    was_training = student.training, teacher.training
    grads = [(p, p.requires_grad) for p in student.parameters()]
    student.eval()
    teacher.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    report = []
    probe = range(min(len(batches), PROBE_BATCHES))  # the batches the before/after errors are measured on
    fitted = sum(1 for bl in lists for names in bl.targets if names)
    bar = progress_bar(total=fitted * steps, desc="reconstruct blocks", enabled=progress and steps > 0)
    try:
        for bl in lists:
            tl = t_lists[bl.name]
            with torch.no_grad():
                cap_s, cap_t = capture_block_inputs(student, bl, batches), capture_block_inputs(teacher, tl, batches)
            hs, ht = cap_s.hidden, cap_t.hidden
            scored, wts = _scored_batches(student, bl.name, batches, weights)
            if len(bl) > 1:  # block 0 replayed must give what the model fed block 1, or every replayed input is wrong
                with torch.no_grad():
                    check_sequential(bl, cap_s, run_block(bl.module[0], cap_s, 0, 0, hs[0]),
                                     instead="use restore(method='masked') or method='sparselora' for this model")
            nbytes = 2 * sum(h.numel() * h.element_size() for h in hs)
            log.info("reconstruct_blocks %s: %d blocks, hidden states of %d batches resident (~%.1f MiB)",
                     bl.name, len(bl), len(batches), nbytes / 2**20)
            for i in range(len(bl)):
                block = bl.module[i]
                names = bl.targets[i]
                row = {"name": f"{bl.name}.{i}", "layers": len(names)}
                xt = list(ht) if teacher_inputs else None  # the teacher's inputs to this block (references, no copy)
                with torch.no_grad():
                    for b, h in enumerate(ht):  # this block's targets, in place: one batch more resident, not a copy
                        ht[b] = run_block(tl.module[i], cap_t, b, i, h)
                    if names and steps:
                        row["before"] = _mean_error([run_block(block, cap_s, b, i, hs[b]) for b in probe], ht, scored, probe)
                if names and steps:
                    bar.set_postfix_str(row["name"])
                    row.update(_fit_block(block, {n: layers[n] for n in names}, cap_s, i, hs, ht, scored, steps, lr, warmup, bar,
                                          mask_steps, xt, teacher_inputs, wts, pooled))
                xt = None
                with torch.no_grad():
                    for b, h in enumerate(hs):
                        hs[b] = run_block(block, cap_s, b, i, h)
                    row["after"] = _mean_error([hs[b] for b in probe], ht, scored, probe)
                for b, h in enumerate(hs):
                    if not torch.isfinite(h).all():
                        raise FloatingPointError(f"reconstruct_blocks: block {row['name']} output is not finite on batch {b}")
                report.append(row)
            del cap_s, cap_t, hs, ht
    finally:
        bar.close()
        for p, req in grads:
            p.requires_grad_(req)
        student.train(was_training[0])
        teacher.train(was_training[1])
    return {"blocks": report, "loose": loose}


def _scored_batches(model: nn.Module, name: str, batches: list[dict], weights: Optional[list]) -> tuple[list[dict], Optional[list]]:
    """The batches whose attention masks the losses of block list ``name`` read, and its token
    weights. The text's padding mask and token weights apply to the text's hidden states only: a
    vision tower's (known from the model's family) never gets them, even where its patch count
    equals a batch's text length; and a model whose output reads padded positions
    (:func:`sparselora.families.reads_padded_positions`, SigLIP) counts every position."""
    vision = is_vision_module(model, f"{name}.0")  # no known family (a text model): masks apply where shapes match
    reads = reads_padded_positions(model)
    if reads and weights is not None and not vision:
        log.warning("reconstruct_blocks %s: rare_tokens not applied (the model's output reads padded positions)", name)
    if vision or reads:
        return [{k: v for k, v in b.items() if k != "attention_mask"} for b in batches], None
    return batches, weights


def _token_weights(batches: list[dict], power: float) -> list[torch.Tensor]:
    """Per batch, each token's weight ``frequency ** -power`` (its id's count over every batch),
    0 on padding, normalised to mean 1 over the real tokens."""
    if not all(isinstance(b.get("input_ids"), torch.Tensor) for b in batches):
        raise ValueError("reconstruct_blocks: rare_tokens needs input_ids in every batch")
    keep = [b["attention_mask"].bool() if isinstance(b.get("attention_mask"), torch.Tensor) else torch.ones_like(b["input_ids"], dtype=torch.bool)
            for b in batches]
    ids = torch.cat([b["input_ids"][k] for b, k in zip(batches, keep)])
    counts = torch.bincount(ids, minlength=max(int(b["input_ids"].max()) for b in batches) + 1).double()
    weights = [counts[b["input_ids"]].clamp_min(1).pow(-power) * k for b, k in zip(batches, keep)]
    mean = torch.cat([w[k] for w, k in zip(weights, keep)]).mean()
    return [(w / mean).float() for w in weights]


def _weighted_error(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The relative squared error with each token's terms weighted by ``w`` ([batch, tokens])."""
    s, t = s.float(), t.float()
    return ((s - t).pow(2).sum(-1) * w).sum() / (t.pow(2).sum(-1) * w).sum().clamp_min(1e-12)


def _pooled_error(s: torch.Tensor, t: torch.Tensor, batch: dict) -> torch.Tensor:
    """The relative squared error of the per-sequence means over the real tokens ([batch, tokens, ...]
    hidden states; every position counts where the batch's attention mask does not match them)."""
    s, t = s.float(), t.float()
    keep = real_tokens(batch)
    m = keep.to(s.dtype) if keep is not None and tuple(s.shape[:2]) == tuple(keep.shape) else torch.ones(s.shape[:2], dtype=s.dtype, device=s.device)
    m = m.reshape(*m.shape, *([1] * (s.dim() - 2))).to(s.device)
    ps, pt = (s * m).sum(1) / m.sum(1).clamp_min(1), (t * m).sum(1) / m.sum(1).clamp_min(1)
    return (ps - pt).pow(2).sum() / pt.pow(2).sum().clamp_min(1e-12)


def _mean_error(outs: list, target: list, batches: list, probe) -> float:
    return sum(_relative_error(o, target[b], batches[b]).item() for o, b in zip(outs, probe)) / len(probe)


def _as_float32(x: Any) -> Any:
    """Floating tensors (in tuples, lists, dicts) in float32; everything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float64 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_as_float32(v) for v in x)
    if isinstance(x, dict):
        return {k: _as_float32(v) for k, v in x.items()}
    return x


@contextlib.contextmanager
def _float32_working_copy(block: nn.Module):
    """Inside, every bfloat16/float16 parameter and buffer of ``block`` is float32 (so Adam's small
    updates accumulate instead of rounding away); on leaving, each is cast back to its own dtype,
    rounding the accumulated update once. A float32/64 block is left as it is."""
    low = {t for t in itertools.chain(block.parameters(), block.buffers())
           if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64)}
    dtypes = {id(t): t.dtype for t in low}
    for t in low:
        t.data = t.data.float()
    try:
        yield bool(low)
    finally:
        for t in low:
            t.data = t.data.to(dtypes[id(t)])


def _top2_of_4(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask of ``w``'s two largest magnitudes in each group of 4 along the input dimension;
    ties (zeros) go to the entries ``mask`` keeps, so a weight that is already ``mask``-sparse keeps ``mask``."""
    score = w.detach().abs() + mask.to(w.dtype) * torch.finfo(w.dtype).tiny
    idx = score.reshape(-1, 4).topk(2, dim=1).indices
    return torch.zeros(score.numel() // 4, 4, dtype=torch.bool, device=w.device).scatter_(1, idx, True).view_as(w)


class _Straight24(nn.Module):
    """Parametrization for mask learning: the forward sees the weight's 2:4 projection, the gradient
    reaches every entry (straight-through), so a pruned entry the block needs grows until it
    displaces a kept one of its group. ``mask`` follows the projection."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask.to(torch.bool).clone()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.mask = _top2_of_4(w, self.mask)
        return w + (w * self.mask.to(w.dtype) - w).detach()


def _fit_block(block: nn.Module, layers: dict[str, nn.Linear], cap, i: int, hs: list, target: list, batches: list[dict],
               steps: int, lr: float, warmup: int, bar, mask_steps: int = 0, xt: Optional[list] = None,
               teacher_inputs: float = 0.0, weights: Optional[list] = None, pooled: float = 0.0) -> dict:
    """Train ``layers`` (the block's pruned Linears) for ``steps`` steps; during the first ``mask_steps``
    the 2:4 masks move with the weights (:class:`_Straight24`), then they are fixed and the kept
    weights train on with masked gradients. Returns ``{"mask_changed": fraction of kept entries
    that changed}``. On an error every weight and mask of the block is as it was."""
    params = [lin.weight for lin in layers.values()]
    saved = {n: (lin.weight.detach().clone(), lin.sparse_mask.clone()) for n, lin in layers.items()} if mask_steps else {}
    changed = 0
    with _float32_working_copy(block) as upcast:
        if upcast:  # the block's other inputs (masks, position embeddings) in float32 too, for this block only
            cap = SimpleNamespace(args={b: {i: _as_float32(a[i])} for b, a in enumerate(cap.args)},
                                  kwargs={b: {i: _as_float32(k[i])} for b, k in enumerate(cap.kwargs)},
                                  hidden_in_kwargs=cap.hidden_in_kwargs)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, steps, "cosine", warmup))

        def train(first: int, last: int) -> None:
            for k in range(first, last):
                b = k % len(hs)
                h = hs[b].float() if upcast else hs[b]
                if xt is not None:  # QDrop: each element from the teacher's input with probability teacher_inputs
                    h = torch.where(torch.rand(h.shape, device=h.device) < teacher_inputs, xt[b].to(h.dtype), h)
                out = run_block(block, cap, b, i, h)
                w = weights[b] if weights is not None and out.shape[:2] == weights[b].shape else None
                loss = _relative_error(out, target[b], batches[b]) if w is None else _weighted_error(out, target[b], w)
                if pooled:
                    loss = loss + pooled * _pooled_error(out, target[b], batches[b])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"reconstruct_blocks: non-finite loss at step {k} of block {i} ({list(layers)[:2]})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)

        try:
            if mask_steps:
                for lin in layers.values():
                    parametrize.register_parametrization(lin, "weight", _Straight24(lin.sparse_mask))
                try:
                    train(0, mask_steps)
                finally:
                    with torch.no_grad():
                        for lin, p in zip(layers.values(), params):
                            new = _top2_of_4(p, lin.parametrizations.weight[0].mask)
                            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
                            changed += int((new & ~lin.sparse_mask.bool()).sum())
                            p.mul_(new.to(p.dtype))  # exactly 2:4 on the learned mask
                            lin.sparse_mask.copy_(new.to(lin.sparse_mask.dtype))
                            for st in opt.state.get(p, {}).values():  # Adam's moments of the dropped entries: gone
                                if isinstance(st, torch.Tensor) and st.shape == p.shape:
                                    st.mul_(new.to(st.dtype))
            with masked_gradients(layers):
                train(mask_steps, steps)
        except BaseException:
            with torch.no_grad():
                for n, (w, m) in saved.items():
                    layers[n].weight.copy_(w)
                    layers[n].sparse_mask.copy_(m)
            raise
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
    kept = sum(int(lin.sparse_mask.bool().sum()) for lin in layers.values())
    return {"mask_changed": changed / max(1, kept)}

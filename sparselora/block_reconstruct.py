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

Why: a step costs one block's forward and backward (no teacher, no other block), and the
objective tells every weight exactly what its block should produce. It is the local stage before
(or instead of) end-to-end distillation, :func:`sparselora.restore.restore` with
``method="masked"``.

Memory: the student's and the teacher's hidden states at the current block for every batch (and
the targets) stay resident: about 3 × batches × tokens × hidden × 4 bytes (logged); pass as many
batches as that allows. Pruned Linears outside any block list (poolers, heads) are left as they are.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from types import SimpleNamespace
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from .distill import _relative_error, lr_factor
from .masked_training import masked_gradients, masked_layers
from .progress import progress_bar
from .pruning.calibrate import as_batches, capture_block_inputs, check_sequential, find_block_lists, in_call_order, run_block

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
                       lr: float = RECONSTRUCT["lr"], warmup: Optional[int] = None, progress: bool = True) -> dict:
    """Reconstruct every block of ``student`` (pruned; any floating dtype) from ``teacher`` (dense,
    same architecture) on ``batches`` (forward-kwargs dicts, as for pruning), ``steps`` steps per
    block. One progress bar counts every step of every block.

    ``warmup`` (linear warm-up steps) defaults to :data:`RECONSTRUCT`'s, at most a tenth of ``steps``.
    Both models run in ``eval()`` (no dropout; restored afterwards). Returns ``{"blocks": [{"name",
    "layers", "before", "after"}], "loose": [pruned layers outside any block list]}``, where
    ``before`` / ``after`` are the block's mean relative error before and after its steps, on the
    student's inputs, over the first :data:`PROBE_BATCHES` batches (``before`` only where it trained)."""
    if steps < 0:
        raise ValueError(f"reconstruct_blocks: steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"reconstruct_blocks: lr must be > 0, got {lr!r}")
    if warmup is None:
        warmup = min(RECONSTRUCT["warmup"], steps // 10)
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
            if len(bl) > 1:  # block 0 replayed must give what the model fed block 1, or every replayed input is wrong
                with torch.no_grad():
                    check_sequential(bl, cap_s, run_block(bl.module[0], cap_s, 0, 0, hs[0]),
                                     instead="use restore(method='masked') or method='sparselora' for this model")
            nbytes = 3 * sum(h.numel() * h.element_size() for h in hs)
            log.info("reconstruct_blocks %s: %d blocks, hidden states of %d batches resident (~%.1f MiB)",
                     bl.name, len(bl), len(batches), nbytes / 2**20)
            for i in range(len(bl)):
                block = bl.module[i]
                names = bl.targets[i]
                row = {"name": f"{bl.name}.{i}", "layers": len(names)}
                with torch.no_grad():
                    ht = [run_block(tl.module[i], cap_t, b, i, h) for b, h in enumerate(ht)]  # this block's targets
                    if names and steps:
                        row["before"] = _mean_error([run_block(block, cap_s, b, i, hs[b]) for b in probe], ht, batches, probe)
                if names and steps:
                    bar.set_postfix_str(row["name"])
                    _fit_block(block, {n: layers[n] for n in names}, cap_s, i, hs, ht, batches, steps, lr, warmup, bar)
                with torch.no_grad():
                    hs = [run_block(block, cap_s, b, i, h) for b, h in enumerate(hs)]
                    row["after"] = _mean_error([hs[b] for b in probe], ht, batches, probe)
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


def _fit_block(block: nn.Module, layers: dict[str, nn.Linear], cap, i: int, hs: list, target: list, batches: list[dict],
               steps: int, lr: float, warmup: int, bar) -> None:
    params = [lin.weight for lin in layers.values()]
    with _float32_working_copy(block) as upcast:
        if upcast:  # the block's other inputs (masks, position embeddings) in float32 too, for this block only
            cap = SimpleNamespace(args={b: {i: _as_float32(a[i])} for b, a in enumerate(cap.args)},
                                  kwargs={b: {i: _as_float32(k[i])} for b, k in enumerate(cap.kwargs)},
                                  hidden_in_kwargs=cap.hidden_in_kwargs)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, steps, "cosine", warmup))
        try:
            with masked_gradients(layers):
                for k in range(steps):
                    b = k % len(hs)
                    h = hs[b].float() if upcast else hs[b]
                    loss = _relative_error(run_block(block, cap, b, i, h), target[b], batches[b])
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"reconstruct_blocks: non-finite loss at step {k} of block {i} ({list(layers)[:2]})")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(1)
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None

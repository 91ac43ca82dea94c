"""Knowledge distillation of a pruned student (with LoRA / SparseLoRA adapters) from its dense teacher.

Only the adapter parameters (``lora_A`` / ``lora_B``, see :func:`sparselora.lora.lora_parameters`)
are trained; everything else in the student is frozen for the run and restored afterwards. The
teacher runs in ``eval()`` under ``torch.no_grad()``.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import lora_parameters

__all__ = ["distill", "default_output", "distill_loss"]


def default_output(out: Any) -> torch.Tensor:
    """logits, else last_hidden_state, else the tensor itself (or the first element of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if v is None and isinstance(out, dict):
            v = out.get(key)
        if v is not None:
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"distill: cannot find a tensor in model output of type {type(out).__name__}; pass output_fn")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, loss: str = "kl", temperature: float = 2.0) -> torch.Tensor:
    """``kl``: KL(softmax(t/T) || softmax(s/T))·T² over the last dim (Hinton); ``mse``; ``cosine``:
    mean (1 − cos) over the last dim."""
    if student.shape != teacher.shape:
        raise ValueError(f"distill: student output {tuple(student.shape)} != teacher output {tuple(teacher.shape)}")
    s, t = student.float(), teacher.float()
    if loss == "kl":
        d = s.shape[-1]
        logp = F.log_softmax(s.reshape(-1, d) / temperature, -1)
        logq = F.log_softmax(t.reshape(-1, d) / temperature, -1)
        return F.kl_div(logp, logq, log_target=True, reduction="batchmean") * temperature**2
    if loss == "mse":
        return F.mse_loss(s, t)
    if loss == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"distill: unknown loss {loss!r} (kl, mse, cosine)")


def _call(model: nn.Module, batch: Any):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], steps: int, lr: float = 1e-3,
            temperature: float = 2.0, loss: str = "kl", output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
            progress: bool = True) -> dict:
    """Train the student's adapters to match the teacher on ``batches`` (cycled) for ``steps`` steps.

    Each batch is passed as ``model(**b)`` (dict), ``model(*b)`` (tuple/list) or ``model(b)``.
    ``output_fn`` maps a model output to the tensor compared (default :func:`default_output`).
    Returns ``{"loss": [per-step loss], "first": ..., "last": ..., "steps": steps}``.
    """
    if steps < 1:
        raise ValueError(f"distill: steps must be >= 1, got {steps}")
    params = lora_parameters(student)
    if not params:
        raise ValueError("distill: the student has no lora_A/lora_B parameters (add_sparse_lora first)")
    output_fn = output_fn or default_output
    adapter_ids = {id(p) for p in params}
    frozen = [(p, p.requires_grad) for p in student.parameters() if id(p) not in adapter_ids]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    was_training = student.training, teacher.training
    student.train()
    teacher.eval()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = itertools.cycle(batches) if not isinstance(batches, torch.Tensor) else itertools.repeat(batches)
    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"distill ({loss})", leave=False)
    try:
        for _ in range(steps):
            batch = next(data)
            with torch.no_grad():
                target = output_fn(_call(teacher, batch))
            value = distill_loss(output_fn(_call(student, batch)), target, loss, temperature)
            if not torch.isfinite(value):
                raise FloatingPointError(f"distill: non-finite loss {value.item()} at step {len(history)}")
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            history.append(value.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.4g}")
    finally:
        if bar is not None:
            bar.close()
        for p, req in frozen:
            p.requires_grad_(req)
        student.train(was_training[0])
        teacher.train(was_training[1])
    return {"loss": history, "first": history[0], "last": history[-1], "steps": steps}

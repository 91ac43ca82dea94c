"""Knowledge distillation of a pruned student (with LoRA / SparseLoRA adapters) from its dense teacher.

Besides the final output, the student can match the teacher block by block (``layers="blocks"``:
the output of every repeated transformer block, found generically as the children of each
outermost ``nn.ModuleList`` of identical modules, so vision towers and language models alike),
or at any named modules (e.g. attention and MLP outputs). Each matched tensor contributes its
relative squared error ‖s − t‖² / ‖t‖² (padding tokens excluded when the batch has an
``attention_mask`` of the same length), averaged over the matched modules. The final output's loss
skips padded positions the same way; a model whose output reads padded positions
(:func:`sparselora.families.reads_padded_positions`: SigLIP) counts them in both. Layer-wise matching
tells every adapter what its own block should produce, which generalises beyond the
distillation text far better than the final output alone.

Only the adapter parameters (``lora_A`` / ``lora_B``, see :func:`sparselora.lora.lora_parameters`)
are trained; everything else in the student is frozen for the run and restored afterwards. The
teacher runs in ``eval()`` under ``torch.no_grad()``.

Teacher caching: when ``batches`` is a finite sequence (list / tuple) shorter than ``steps``, the
teacher's outputs for each batch (the compared output and the matched modules' outputs) are kept,
detached, after its first pass and reused on every later cycle, so the teacher runs once per
distinct batch instead of once per step. The losses are the same step by step (the teacher is in
``eval()``, hence deterministic). The cache is bounded by ``teacher_cache_mb`` (counted as the bytes
of the distinct storages held, on whatever device the teacher's outputs live); past the cap further
batches are not cached (logged once at INFO); ``teacher_cache_mb=0`` disables it (on a GPU the
cache takes device memory: lower the cap where memory is tight). Iterators,
generators and a single tensor are never cached. Each entry is dropped at its batch's last visit.

Measured (``nice python benchmarks/distill_cache_speed.py --steps 40 --batches 8 --repeats 2``:
all-MiniLM-L6-v2, every Linear 2:4 by SparseGPT, :func:`sparselora.restore.restore`'s default
recipe with cosine loss, r=16, batches of 16 sentences, one thread, on a shared 2-core CPU with
other jobs running, so wall times are noisy): 1.31 → 1.11 CPU s per step (2.20 → 1.83 s wall)
with 32 of 40 teacher forwards cached; one teacher forward (all blocks hooked) takes 0.21 s, about
16 % of a step, which bounds the saving. Prediction for the default 200 steps over 32 batches (168
of 200 forwards skipped): about 35 CPU s of roughly 260 saved (~13 %); the same losses step by step
(``benchmarks/results/distill_cache_speed.md``).
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .families import is_vision_module, reads_padded_positions
from .lora import lora_parameters
from .pruning.calibrate import real_tokens

__all__ = ["distill", "default_output", "distill_loss", "find_blocks", "info_nce", "lr_factor"]

log = logging.getLogger(__name__)


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


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, loss: str = "kl", temperature: float = 2.0,
                 keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``kl``: KL(softmax(t/T) || softmax(s/T))·T² over the last dim (Hinton); ``mse``; ``cosine``:
    mean (1 − cos) over the last dim. ``keep`` (bool ``[batch, tokens]``, the batch's real tokens):
    outputs of at least 3 dims whose leading two match it are compared at the kept positions only."""
    if student.shape != teacher.shape:
        raise ValueError(f"distill: student output {tuple(student.shape)} != teacher output {tuple(teacher.shape)}")
    s, t = student.float(), teacher.float()
    if keep is not None and s.dim() >= 3 and tuple(s.shape[:2]) == tuple(keep.shape):
        keep = keep.to(s.device)
        s, t = s[keep], t[keep]
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


def info_nce(student: torch.Tensor, teacher: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """Contrastive term for embedding models: each student embedding (a row of ``[batch, dim]``) must
    pick its own teacher embedding among the batch's, and each teacher embedding its own student
    one (symmetric InfoNCE on cosine similarities at temperature ``tau``). Cosine matching alone
    lets a restored encoder drift towards the batch's common direction, which keeps the cosine
    high but loses nearest-neighbour order; this term keeps the order."""
    if student.dim() != 2 or student.shape != teacher.shape or student.shape[0] < 2:
        raise ValueError(f"info_nce: needs [batch >= 2, dim] sentence embeddings from student and teacher, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)} (pass an output_fn that pools)")
    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    logits = s @ t.T / tau
    target = torch.arange(len(s), device=s.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def pair_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """Ranking term for embedding models on a batch of pairs laid out ``[q_1..q_B, a_1..a_B]``
    (:func:`sparselora.text_sources.calibration_pairs`): the student's in-batch retrieval
    distribution q -> a, softmax of cosine similarities at ``tau``, must match the teacher's, and
    likewise a -> q (mean of the two KL divergences). It distils the teacher's retrieval behaviour,
    not the pairs' labels."""
    if student.dim() != 2 or student.shape != teacher.shape or student.shape[0] < 4 or student.shape[0] % 2:
        raise ValueError(f"pair_kl: needs [2 x pairs (>= 2 pairs), dim] embeddings laid out [queries, answers] from student "
                         f"and teacher, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    b = len(student) // 2
    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    ls, lt = s[:b] @ s[b:].T / tau, t[:b] @ t[b:].T / tau

    def kl(x, y):  # KL(softmax(y) || softmax(x)) per row, averaged
        return F.kl_div(F.log_softmax(x, -1), F.log_softmax(y, -1), log_target=True, reduction="batchmean")

    return 0.5 * (kl(ls, lt) + kl(ls.T, lt.T))


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the repeated blocks of ``model``: the children of every outermost ``nn.ModuleList``
    holding at least two modules of one class that have parameters (not bare Linears)."""
    lists, out = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or any(name.startswith(p + ".") for p in lists):
            continue
        kinds = {type(c) for c in mod}
        first = mod[0]
        if len(kinds) == 1 and not isinstance(first, (nn.Linear, nn.Embedding)) and any(True for _ in first.parameters()):
            lists.append(name)
            out.extend(f"{name}.{i}" if name else str(i) for i in range(len(mod)))
    return out


def _resolve(model: nn.Module, names: list[str], role: str) -> list[nn.Module]:
    """Each name exactly, else the one module whose name ends with ``.name`` (a wrapper such as
    peft's adds a prefix)."""
    table = dict(model.named_modules())
    out = []
    for n in names:
        if n in table:
            out.append(table[n])
            continue
        hits = [m for k, m in table.items() if k.endswith("." + n)]
        if len(hits) != 1:
            raise ValueError(f"distill: {role} has {len(hits)} modules named {n!r} (need exactly one)")
        out.append(hits[0])
    return out


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    v = getattr(out, "last_hidden_state", None)
    if isinstance(v, torch.Tensor):
        return v
    raise TypeError(f"distill: a matched module returned {type(out).__name__}, not a tensor")


class _Recorder:
    """Forward hooks that keep the outputs of ``modules`` (in order) for one forward pass."""

    def __init__(self, modules: list[nn.Module]):
        self.outputs: list[Optional[torch.Tensor]] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i):
        def hook(_module, _inputs, out):
            self.outputs[i] = _first_tensor(out)
        return hook

    def take(self) -> list[torch.Tensor]:
        outs, self.outputs = self.outputs, [None] * len(self.outputs)
        return outs

    def close(self):
        for h in self.handles:
            h.remove()


def _relative_error(s: torch.Tensor, t: torch.Tensor, batch: Any) -> torch.Tensor:
    s, t = s.float(), t.float()
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and s.dim() == 3 and s.shape[:2] == mask.shape:
        keep = mask.bool()
        s, t = s[keep], t[keep]
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def lr_factor(step: int, steps: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up for ``warmup`` steps, then
    constant or a cosine decay to zero at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    raise ValueError(f"distill: unknown schedule {schedule!r} (constant, cosine)")


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, copied when it is a view of a larger storage (so the cache holds, and
    counts, only the bytes it uses)."""
    t = t.detach()
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        t = t.clone()
    return t


class _TeacherCache:
    """The teacher's outputs per batch index, up to ``cap`` bytes (distinct storages counted once)."""

    def __init__(self, cap: int):
        self.cap, self.bytes, self.full = cap, 0, False
        self.entries: dict[int, tuple[torch.Tensor, list[torch.Tensor], int]] = {}

    def get(self, i: int):
        e = self.entries.get(i)
        return None if e is None else e[:2]

    def put(self, i: int, target: Any, layer_outs: list) -> None:
        if self.full:
            return
        if not isinstance(target, torch.Tensor) or not all(isinstance(t, torch.Tensor) for t in layer_outs):
            self.full = True
            log.info("distill: the teacher's outputs are not all tensors; not caching them")
            return
        target, layer_outs = _owned(target), [_owned(t) for t in layer_outs]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [target, *layer_outs]}
        size = sum(storages.values())
        if self.bytes + size > self.cap:
            self.full = True
            log.info("distill: teacher cache full at %.1f MiB (%d batches, cap %.0f MiB); the teacher runs again for "
                     "the other batches (raise teacher_cache_mb to cache more)", self.bytes / 2**20, len(self.entries),
                     self.cap / 2**20)
            return
        self.entries[i] = (target, layer_outs, size)
        self.bytes += size

    def drop(self, i: int) -> None:
        e = self.entries.pop(i, None)
        if e is not None:
            self.bytes -= e[2]


def _call(model: nn.Module, batch: Any):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], steps: int, lr: float = 1e-3,
            temperature: float = 2.0, loss: str = "kl", output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
            progress: bool = True, layers: Any = None, layer_weight: float = 1.0, output_weight: float = 1.0,
            schedule: str = "constant", warmup: int = 0,
            aux_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
            teacher_cache_mb: float = 1024, params: Optional[list[nn.Parameter]] = None,
            on_step: Optional[Callable[[int, int], None]] = None) -> dict:
    """Train the student's adapters to match the teacher on ``batches`` (cycled) for ``steps`` steps.

    Each batch is passed as ``model(**b)`` (dict), ``model(*b)`` (tuple/list) or ``model(b)``.
    ``output_fn`` maps a model output to the tensor compared (default :func:`default_output`).
    ``layers``: None (final output only), ``"blocks"`` (every block, :func:`find_blocks`) or a list
    of module names; their mean relative error is added with weight ``layer_weight`` to
    ``output_weight`` × the output loss. ``schedule`` (``constant`` / ``cosine``) and ``warmup``
    shape the learning rate (:func:`lr_factor`). ``aux_loss(student_out, teacher_out)`` adds any
    further term on the compared outputs (e.g. a contrastive one for embedding models).
    ``teacher_cache_mb``: the cap of the teacher-output cache (module docstring); 0 disables it.
    ``params``: the parameters to train instead of the adapters (e.g. learned-mask logits,
    :mod:`sparselora.pruning.learned_masks`); ``on_step(step, steps)`` runs before each step's
    forward (schedules such as a temperature).
    Returns ``{"loss": [per-step loss], "first": ..., "last": ..., "steps": steps,
    "teacher_forwards": how many times the teacher ran}``.
    """
    if steps < 1:
        raise ValueError(f"distill: steps must be >= 1, got {steps}")
    if not 0 <= warmup < steps:
        raise ValueError(f"distill: warmup must be in [0, steps), got {warmup} for {steps} steps")
    lr_factor(0, steps, schedule, warmup)  # validates the schedule name before any work
    if teacher_cache_mb is None or teacher_cache_mb < 0:
        raise ValueError(f"distill: teacher_cache_mb must be >= 0 (0 disables the cache), got {teacher_cache_mb!r}")
    finite = isinstance(batches, (list, tuple))
    if finite and not batches:
        raise ValueError("distill: batches is empty")
    s_names = []
    if layers == "blocks":
        s_names = find_blocks(student)
        t_mods, s_mods = _resolve(teacher, find_blocks(teacher), "the teacher"), _resolve(student, s_names, "the student")
        if not t_mods or len(t_mods) != len(s_mods):
            raise ValueError(f"distill: layers='blocks' needs the same repeated blocks in both models "
                             f"(teacher {len(t_mods)}, student {len(s_mods)})")
    elif layers is None:
        t_mods = s_mods = []
    elif isinstance(layers, (list, tuple)) and layers and all(isinstance(n, str) for n in layers):
        s_names = list(layers)
        t_mods, s_mods = _resolve(teacher, s_names, "the teacher"), _resolve(student, s_names, "the student")
    else:
        raise ValueError(f"distill: layers must be None, 'blocks' or a non-empty list of module names, got {layers!r}")
    if params is None:
        params = lora_parameters(student)
        if not params:
            raise ValueError("distill: the student has no lora_A/lora_B parameters (add_sparse_lora first)")
    elif not params or not all(isinstance(p, nn.Parameter) for p in params):
        raise ValueError("distill: params must be a non-empty list of nn.Parameter")
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps, schedule, warmup))
    if finite:
        n = len(batches)
        data = ((i % n, batches[i % n]) for i in itertools.count())
    else:
        data = zip(itertools.repeat(None), itertools.repeat(batches) if isinstance(batches, torch.Tensor) else itertools.cycle(batches))
    # caching pays only when some batch is seen again
    cache = _TeacherCache(int(teacher_cache_mb * 2**20)) if finite and teacher_cache_mb > 0 and len(batches) < steps else None
    teacher_forwards = 0
    history = []
    bar = None
    if progress:
        from .progress import progress_bar

        bar = progress_bar(total=steps, desc=f"distill ({loss})")
    recorders = [_Recorder(s_mods), _Recorder(t_mods)] if t_mods else []
    try:
        count_padding = reads_padded_positions(student)  # SigLIP: its output reads padded positions
        # the text's padding mask applies to text-side modules only, never a vision tower's (shapes can coincide)
        text_side = [not count_padding and not is_vision_module(student, n) for n in s_names]
        for step in range(steps):
            index, batch = next(data)
            if on_step is not None:
                on_step(step, steps)
            hit = cache.get(index) if cache is not None else None
            if hit is None:
                with torch.no_grad():
                    target = output_fn(_call(teacher, batch))
                teacher_forwards += 1
                t_outs = recorders[1].take() if recorders else []
                if cache is not None and step + len(batches) < steps:
                    cache.put(index, target, t_outs)
            else:
                target, t_outs = hit
            if cache is not None and step + len(batches) >= steps:
                cache.drop(index)  # this batch's last visit
            out = output_fn(_call(student, batch))
            keep = None if count_padding else real_tokens(batch)
            value = output_weight * distill_loss(out, target, loss, temperature, keep) if output_weight else out.sum() * 0
            if recorders:
                errs = [_relative_error(s, t, batch if txt else None) for s, t, txt in zip(recorders[0].take(), t_outs, text_side)]
                value = value + layer_weight * torch.stack(errs).mean()
            if aux_loss is not None:
                value = value + aux_loss(out, target)
            if not torch.isfinite(value):
                raise FloatingPointError(f"distill: non-finite loss {value.item()} at step {len(history)}")
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            sched.step()
            history.append(value.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.4g}")
    finally:
        if bar is not None:
            bar.close()
        for r in recorders:
            r.close()
        for p, req in frozen:
            p.requires_grad_(req)
        student.train(was_training[0])
        teacher.train(was_training[1])
    return {"loss": history, "first": history[0], "last": history[-1], "steps": steps, "teacher_forwards": teacher_forwards}

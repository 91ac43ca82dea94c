"""Calibration: activation statistics per ``nn.Linear``, collected block by block.

What each method needs from a layer's inputs ``X [tokens, in]``:

* Wanda: ``sum_t x_tj^2`` per input channel (``||x_j||^2``);
* SparseGPT: the Hessian ``XᵀX`` (``[in, in]``).

Sequential processing (as in the Wanda and SparseGPT reference code): for each *block list*
(the ``nn.ModuleList`` of transformer layers of a part) we

1. run the full model on every calibration batch until the first block is about to run,
   recording its inputs (positional args and kwargs such as attention masks and position
   embeddings); a forward pre-hook raises :class:`_StopForward` to end the forward early
   — the kwargs of the later blocks are recorded in the same pass (they can differ per
   layer, e.g. sliding-window masks), their hidden states are not kept;
2. for block ``i``: hook only the target Linears of that block, run the block on the
   recorded inputs (statistics), prune it, run it again with the pruned weights, and feed
   those outputs to block ``i + 1``.

So at any time only one block's hooks and statistics are alive, plus one hidden-state
tensor per calibration batch. Block lists are processed in the order the model calls them,
and each capture runs the model's already-pruned upstream parts (e.g. the language model
is calibrated on the outputs of the pruned vision tower).

Target Linears outside any block list (e.g. SigLIP's pooling-head MLP, BERT's pooler) are
calibrated afterwards in one full-model pass over the batches.

Padding: a layer whose input runs along the batch's 2-D ``attention_mask`` (``[batch, tokens]``)
counts only the positions the mask keeps (:func:`real_tokens`). The model computes hidden states
at padded positions too, but no real token attends to them and (in most models) no output reads
them; a random batch of 16 sentences is about 45 % padding, which would otherwise make up nearly
half of every Hessian and norm. Inputs of other shapes (a vision tower's patches) count every
position, and so does a model whose output reads padded positions
(:func:`sparselora.families.reads_padded_positions`: SigLIP pools its text tower's last position).

How block lists are found: for a target layer, the ``nn.ModuleList`` ancestor with the
most parameters whose children are the blocks (``<list>.<index>.…``). The replay assumes a
plain sequential stack (block ``i``'s first output is block ``i+1``'s hidden-state input);
on the first batch this is checked against what the model itself fed block 1 and a
warning is raised if it does not hold.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
import torch.nn as nn

from ..format import SparsityError

__all__ = [
    "LayerStats",
    "StatsCollector",
    "BlockList",
    "find_block_lists",
    "in_call_order",
    "calibration_batches",
    "as_batches",
    "run_model",
    "capture_block_inputs",
    "block_output",
    "MemoryProbe",
    "real_tokens",
]


class _StopForward(Exception):
    """Raised from a pre-hook to stop a calibration forward once the inputs are captured."""


# --------------------------------------------------------------------------- statistics


@dataclass
class LayerStats:
    """Running sums over the calibration tokens seen by one Linear."""

    name: str
    in_features: int
    need_norms: bool
    need_hessian: bool
    tokens: int = 0
    sq_norm: Optional[torch.Tensor] = None  # [in] sum_t x_tj^2 (float32)
    hessian: Optional[torch.Tensor] = None  # [in, in] sum_t x_t x_tᵀ (float32)

    def add(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None, sentence_rows: float = 0.0) -> None:
        """Add the rows of ``x [..., in]``; with ``keep`` (bool, ``x.shape[:-1]``) only those it keeps.
        ``sentence_rows`` (with ``keep``, ``x`` as ``[batch, tokens, in]``): each sequence's mean kept
        row is added too, weighted ``sentence_rows`` × its kept-token count."""
        x = x.detach()
        if keep is not None and sentence_rows and x.dim() == 3:
            k = keep.to(x.device, torch.float32)
            n = k.sum(1).clamp_min(1)
            means = (x.float() * k[..., None]).sum(1) / n[:, None]
            extra = means * (sentence_rows * k.sum(1)).sqrt()[:, None]
        else:
            extra = None
        x = (x[keep.to(x.device)] if keep is not None else x.reshape(-1, x.shape[-1])).to(torch.float32)
        if extra is not None:
            x = torch.cat([x, extra])
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise SparsityError(
                f"calibration input of layer {self.name} contains NaN/Inf (token {bad[0]}, channel {bad[1]}): "
                f"an upstream layer or the calibration batch is broken"
            )
        if self.need_norms:
            s = (x * x).sum(0)
            self.sq_norm = s if self.sq_norm is None else self.sq_norm + s
        if self.need_hessian:
            h = x.t() @ x
            self.hessian = h if self.hessian is None else self.hessian + h
        self.tokens += x.shape[0] - (0 if extra is None else extra.shape[0])


class MemoryProbe:
    """Counts live statistics objects, to show (and test) that calibration is block-bounded."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.blocks = 0

    def enter(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def exit(self, n: int) -> None:
        self.live -= n


def real_tokens(batch: Mapping) -> Optional[torch.Tensor]:
    """The positions of ``batch`` that are not padding: its 2-D ``attention_mask`` as bool, or None
    (no such mask: every position counts)."""
    m = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(m, torch.Tensor) or m.dim() != 2:
        return None
    return m != 0


class StatsCollector:
    """Context manager: forward hooks on ``layers`` that fill one :class:`LayerStats` each.

    ``along_tokens`` names the layers whose inputs run along the batch's text tokens (language
    model, head; not a vision tower or projector, whose inputs could match the mask's shape by
    chance). Set :attr:`keep` to the running batch's :func:`real_tokens` before each forward: such
    a layer's input whose leading dimensions are that mask's shape then counts only the kept
    positions."""

    def __init__(self, layers: Mapping[str, nn.Linear], need_norms: bool, need_hessian: bool, probe: Optional[MemoryProbe] = None,
                 along_tokens: Iterable[str] = ()):
        self.layers = dict(layers)
        self.stats = {n: LayerStats(n, m.in_features, need_norms, need_hessian) for n, m in self.layers.items()}
        self.probe = probe
        self.along_tokens = set(along_tokens)
        self.keep: Optional[torch.Tensor] = None
        self.sentence_rows = 0.0
        self._handles: list = []

    def _add(self, name: str, x: torch.Tensor) -> None:
        keep = self.keep
        if name not in self.along_tokens or keep is None or tuple(x.shape[:-1]) != tuple(keep.shape):
            keep = None
        self.stats[name].add(x, keep, self.sentence_rows if keep is not None else 0.0)

    def __enter__(self) -> "StatsCollector":
        for n, m in self.layers.items():
            self._handles.append(m.register_forward_hook(lambda mod, inp, out, n=n: self._add(n, inp[0])))
        if self.probe:
            self.probe.enter(len(self.stats))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.probe:
            self.probe.exit(len(self.stats))


# --------------------------------------------------------------------------- block lists


@dataclass
class BlockList:
    """A ``ModuleList`` of sequential blocks and which target Linears live in each block."""

    name: str
    module: nn.ModuleList
    targets: list[list[str]] = field(default_factory=list)  # per block index

    def __len__(self) -> int:
        return len(self.module)


def _param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def find_block_lists(model: nn.Module, targets: Iterable[str]) -> tuple[list[BlockList], list[str]]:
    """Group target Linear names by the block list they live in.

    Returns ``(block_lists, loose)``: block lists in module order (each with its targets per
    block index) and the target names that live in no block list."""
    lists = {n: m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0}
    sizes: dict[str, int] = {}
    found: dict[str, BlockList] = {}
    loose: list[str] = []
    for t in targets:
        best = None
        for ln, lm in lists.items():
            pre = ln + "." if ln else ""
            if not t.startswith(pre):
                continue
            idx = t[len(pre):].split(".", 1)[0]
            if not idx.isdigit() or int(idx) >= len(lm):
                continue
            if ln not in sizes:
                sizes[ln] = _param_count(lm)
            if best is None or sizes[ln] > sizes[best[0]]:
                best = (ln, int(idx))
        if best is None:
            loose.append(t)
            continue
        ln, i = best
        bl = found.setdefault(ln, BlockList(ln, lists[ln], [[] for _ in range(len(lists[ln]))]))
        bl.targets[i].append(t)
    order = {n: k for k, (n, _) in enumerate(model.named_modules())}
    return sorted(found.values(), key=lambda b: order[b.name]), loose


def in_call_order(model: nn.Module, block_lists: list[BlockList], batch: Mapping) -> list[BlockList]:
    """``block_lists`` sorted by when one forward of ``model`` on ``batch`` first enters each (so a
    language model comes after the vision tower feeding it); a list never entered is an error."""
    first_call: list[str] = []
    hooks = [bl.module[0].register_forward_pre_hook(lambda *a, n=bl.name: first_call.append(n) if n not in first_call else None)
             for bl in block_lists]
    try:
        run_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    rank = {n: k for k, n in enumerate(first_call)}
    never = [bl.name for bl in block_lists if bl.name not in rank]
    if never:
        raise SparsityError(f"the calibration forward never ran block list(s) {never}: the batches do not exercise those parts")
    return sorted(block_lists, key=lambda bl: rank[bl.name])


# --------------------------------------------------------------------------- batches


def as_batches(calib: Any) -> list[dict]:
    """Normalise calibration input to a list of forward-kwargs dicts.

    Accepts one dict (a single batch), or any iterable of dicts (a DataLoader, a list,
    a generator; materialised once because every block list replays the batches)."""
    if calib is None:
        raise ValueError("this method needs calibration data: pass calib=<iterable of forward-kwargs dicts> "
                         "(e.g. a DataLoader, or sparselora.pruning.calibration_batches(processor, images, prompts))")
    if isinstance(calib, Mapping):
        return [dict(calib)]
    try:
        batches = list(calib)
    except TypeError:
        raise TypeError(f"calib must be a dict of forward kwargs or an iterable of them, got {type(calib).__name__}") from None
    if not batches:
        raise ValueError("calib is empty: give at least one batch")
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping):
            raise TypeError(f"calibration batch {i} is a {type(b).__name__}, expected a dict of forward() kwargs")
    return [dict(b) for b in batches]


def calibration_batches(processor: Callable, images: Optional[list] = None, prompts: Optional[list] = None, batch_size: int = 1,
                        **processor_kwargs) -> Iterator[dict]:
    """Forward-kwargs batches from images and prompts through a transformers processor
    (``processor(images=..., text=..., return_tensors="pt")``); text-only if ``images`` is None."""
    if images is None and prompts is None:
        raise ValueError("calibration_batches needs images, prompts, or both")
    n = len(images) if images is not None else len(prompts)
    if images is not None and prompts is not None and len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    for i in range(0, n, batch_size):
        kw = dict(return_tensors="pt", **processor_kwargs)
        if images is not None:
            kw["images"] = images[i:i + batch_size]
        if prompts is not None:
            kw["text"] = prompts[i:i + batch_size]
        yield dict(processor(**kw))


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _accepts_use_cache(model: nn.Module) -> bool:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return False
    return "use_cache" in sig.parameters


def run_model(model: nn.Module, batch: Mapping) -> Any:
    """``model(**batch)`` on the model's device, without a KV cache (a cache would make
    replayed blocks attend to stale keys)."""
    from .offload import execution_device

    dev = execution_device(model)  # a dispatched model's parameters may be on meta
    kw = _to_device(dict(batch), dev)
    if _accepts_use_cache(model) and "use_cache" not in kw:
        kw["use_cache"] = False
    return model(**kw)


# --------------------------------------------------------------------------- capture / replay


def _is_cache(x: Any) -> bool:
    return type(x).__name__.endswith("Cache") or any(c.__name__ == "Cache" for c in type(x).__mro__)


def _strip_cache(kwargs: dict) -> dict:
    return {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}


@dataclass
class _Captured:
    hidden: list[torch.Tensor]  # per batch: block-0 hidden states (then: current block's input)
    args: list[list[tuple]]  # [batch][block] positional args without the hidden state
    kwargs: list[list[dict]]  # [batch][block]
    hidden_in_kwargs: bool
    next_hidden0: Optional[torch.Tensor]  # batch 0: what the model fed block 1 (sequential check)


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict, bool]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs), False
    if "hidden_states" in kwargs:
        kw = dict(kwargs)
        return kw.pop("hidden_states"), (), kw, True
    raise SparsityError("cannot find the hidden-state input of a block (no positional arg, no 'hidden_states' kwarg)")


def capture_block_inputs(model: nn.Module, blocks: BlockList, batches: list[dict]) -> _Captured:
    """Run the model on each batch until the last block of ``blocks`` is reached, keeping
    block 0's inputs and every block's extra args/kwargs (not their hidden states)."""
    n = len(blocks.module)
    cap = _Captured([], [], [], False, None)
    state: dict = {}

    def pre_hook(i):
        def hook(mod, args, kwargs):
            h, a, kw, in_kw = _split(args, kwargs)
            state["args"][i] = a
            state["kwargs"][i] = _strip_cache(kw)
            state["in_kw"] = in_kw
            if i == 0:
                state["hidden"] = h.detach()
            if i == 1 and state["batch"] == 0:
                cap.next_hidden0 = h.detach().clone()
            if i == n - 1:
                raise _StopForward
        return hook

    handles = [blk.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, blk in enumerate(blocks.module)]
    try:
        for b, batch in enumerate(batches):
            state.update(batch=b, args=[None] * n, kwargs=[None] * n, hidden=None)
            try:
                run_model(model, batch)
            except _StopForward:
                pass
            if state["hidden"] is None:
                raise SparsityError(
                    f"the calibration forward never reached block list {blocks.name!r} (batch {b}): the batches do not "
                    f"exercise this part (e.g. no pixel_values for a vision tower, no input_ids for a text model)")
            if any(a is None for a in state["args"]):
                raise SparsityError(f"block list {blocks.name!r}: not every block was called in order during the calibration forward")
            cap.hidden.append(state["hidden"])
            cap.args.append(state["args"])
            cap.kwargs.append(state["kwargs"])
            cap.hidden_in_kwargs = state["in_kw"]
    finally:
        for h in handles:
            h.remove()
    return cap


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first element of a tuple/ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        return out[0]
    raise SparsityError(f"cannot read hidden states from a block output of type {type(out).__name__}")


def run_block(block: nn.Module, cap: _Captured, b: int, i: int, hidden: torch.Tensor) -> torch.Tensor:
    args, kwargs = cap.args[b][i], cap.kwargs[b][i]
    if cap.hidden_in_kwargs:
        out = block(*args, hidden_states=hidden, **kwargs)
    else:
        out = block(hidden, *args, **kwargs)
    return block_output(out)


def check_sequential(blocks: BlockList, cap: _Captured, dense_out0: torch.Tensor, instead: Optional[str] = None) -> None:
    """Warn if replaying block 0 does not reproduce the input the model fed block 1; with ``instead``
    (what to do for such a model), raise a :class:`SparsityError` saying so rather than warn (for
    callers whose results would be wrong, not merely off)."""
    ref = cap.next_hidden0
    if ref is None:
        return
    if ref.shape != dense_out0.shape:
        head = (f"block list {blocks.name!r}: block 0 output shape {tuple(dense_out0.shape)} differs from block 1 input "
                f"{tuple(ref.shape)}")
        tail = "sequential calibration may be wrong for this model"
    else:
        err = (dense_out0.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item() + 1e-12
        if err <= 1e-3 * scale:
            return
        head = (f"block list {blocks.name!r} is not a plain sequential stack (replayed block 0 output differs from the "
                f"model's block 1 input by {err:.3g}, max |x| {scale:.3g})")
        tail = "calibration statistics may be off"
    if instead is not None:
        raise SparsityError(f"{head}: replayed block inputs would be wrong; {instead}")
    warnings.warn(f"{head}; {tail}", stacklevel=3)

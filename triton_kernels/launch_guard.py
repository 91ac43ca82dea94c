"""What every Triton launch needs on a real GPU, kept in one place.

* **The tensor's device made current.** Triton launches on the *current* CUDA device and that
  device's current stream, not on the device of the tensors it is given: with tensors on
  ``cuda:1`` while ``cuda:0`` is current, a launch would run on the wrong GPU (illegal address, or
  a silent race with the stream PyTorch ordered the inputs on). :func:`on_tensor_device` wraps a
  launcher so it runs under ``torch.cuda.device(<its first tensor>.device)``, whose current stream
  is the one PyTorch uses for that device.
* **No autotuning inside a CUDA-graph capture.** The autotuner times configs with host
  synchronisations, which a capture forbids. :func:`capturing` tells a launcher that it is being
  captured, so it can run an untuned config for this capture without remembering it as tuned.
"""
from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["on_device", "on_tensor_device", "capturing"]


def on_device(t):
    """Context that makes ``t``'s CUDA device current (nothing for CPU tensors: the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _device_source(arg):
    return arg.values if hasattr(arg, "values") and isinstance(getattr(arg, "values"), torch.Tensor) else arg


def on_tensor_device(fn):
    """Decorator: run the launcher ``fn`` with its first argument's device current (a tensor, or
    a ``Packed24`` whose values give the device)."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        src = _device_source(first)
        if not isinstance(src, torch.Tensor):  # the launcher's own type check reports it
            return fn(first, *args, **kwargs)
        with on_device(src):  # looked up at call time (tests patch it)
            return fn(first, *args, **kwargs)

    return wrapper


def capturing() -> bool:
    """Is the current CUDA stream being captured into a graph?"""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

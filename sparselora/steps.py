"""The steps the command line and the demo share: pruning a model (with the pruning package, or
the built-in 2:4 magnitude fallback), the output a distillation compares, per-layer latency, and
the user-facing error type. Heavy imports happen inside the functions, so importing this module (as
``sparselora --help`` does) stays instant."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

STRATEGIES = ("language", "vision", "both")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name in (module, module.rsplit(".", 1)[0]) or (e.name or "").startswith("sparselora"):
            raise CLIError(f"'{what}' needs {module}, which is not part of this installation ({e}).") from None
        raise


def have(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
        return True
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name)):
            return False
        raise


def output_fn(out):
    for k in ("last_hidden_state", "logits", "logits_per_image"):
        v = getattr(out, k, None)
        if v is not None:
            return v
    return out[0]


def pattern_arg(p: str):
    """'2:4' / '4:8' stay strings; '0.5' becomes the unstructured ratio 0.5."""
    try:
        return float(p)
    except ValueError:
        return p


def prune_model(model, method: str, pattern: str, strategy, family, calib, progress: bool = True, skip=(), device=None,
                refit_iters: int = 0):
    """Returns (rows, method actually used, the pruning package's markdown report or None).
    ``device``: calibrate the host model there, one module's weights at a time (prune(device=...)).
    ``refit_iters``: SparseGPT's kept-weight refit (prune(refit_iters=...))."""
    pattern = pattern_arg(pattern) if isinstance(pattern, str) else pattern
    if have("sparselora.pruning"):
        from .pruning import prune

        rep = prune(model, method=method, pattern=pattern, calib=calib if method != "magnitude" else None,
                    strategy=strategy, family=family, progress=progress, skip=skip or (), device=device,
                    **({"refit_iters": refit_iters} if refit_iters else {}))
        return list(getattr(rep, "rows", [])), method, (rep.to_markdown() if hasattr(rep, "to_markdown") else None)
    if method != "magnitude":
        log.warning("sparselora.pruning is not installed; using magnitude 2:4 instead of %s", method)
    if pattern != "2:4":
        raise CLIError(f"pattern {pattern} needs sparselora.pruning (the built-in fallback does 2:4 magnitude only)")
    return magnitude_24(model, strategy, family, skip), "magnitude", None


def magnitude_24(model, strategy: str, family, skip=()) -> list[dict]:
    import torch

    from .families import linear_layers
    from .format import nm_mask

    parts = {"language": ["language"], "vision": ["vision"], "both": ["vision", "language"]}.get(strategy)
    if parts is None:
        raise CLIError(f"--strategy {strategy!r}: the built-in magnitude pruning knows {', '.join(STRATEGIES)}")
    rows = []
    for name, lin in linear_layers(model, parts, family=family).items():
        if lin.in_features % 4 or any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip or ()):
            continue
        mask = nm_mask(lin.weight.detach().abs().float(), name=name)
        with torch.no_grad():
            lin.weight.mul_(mask)
        lin.register_buffer("sparse_mask", mask, persistent=False)
        rows.append({"layer": name, "shape": list(lin.weight.shape), "method": "magnitude", "pattern": "2:4"})
    return rows


def layer_latency(model, tokens: int, iters: int, progress: bool = True) -> list[dict]:
    """Per distinct sparse layer shape: dense F.linear on the unpacked weight vs the SparseLinear,
    and the bytes each holds (every resident byte of the SparseLinear, backend buffers included)."""
    import torch
    import torch.nn.functional as F

    from .memory import dense_linear_bytes
    from .patch import sparse_layers
    from .progress import progress_bar
    from .timing import median_ms

    rows, seen = [], set()
    layers = [(n, m) for n, m in sparse_layers(model).items()]
    for name, m in progress_bar(layers, desc="timing layers", enabled=progress):
        key = (m.out_features, m.in_features, m.weight_dtype)
        if key in seen:
            continue
        seen.add(key)
        x = torch.randn(tokens, m.in_features, dtype=m.weight_dtype, device=m.weight_device)
        w = m.dense_weight()
        dense = median_ms(lambda: F.linear(x, w, m.bias), iters, x.device, warmup=3)
        sparse = median_ms(lambda: m(x), iters, x.device, warmup=3)
        rows.append({"layer": name, "shape": f"{m.out_features}x{m.in_features}", "tokens": tokens, "backend": m.backend.name,
                     "device": str(x.device), "dense_ms": dense, "sparse_ms": sparse, "speedup": dense / sparse,
                     "dense_bytes": dense_linear_bytes(m.out_features, m.in_features, m.weight_dtype, m.bias is not None),
                     "resident_bytes": m.resident_bytes(), "weight_copies": m.weight_copies})
    return rows
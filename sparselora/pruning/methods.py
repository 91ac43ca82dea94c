"""Per-layer pruning criteria: magnitude, Wanda and SparseGPT.

Every function here works on one weight matrix ``W [out, in]`` plus the calibration
statistics of that layer, and returns a boolean *keep* mask (True = weight stays).
SparseGPT also returns the updated weights (the OBS error compensation changes kept weights).

Patterns (:class:`Pattern`):

* ``"N:M"`` — keep ``N`` of every ``M`` consecutive inputs of each row (``"2:4"``, ``"4:8"``).
* a float ``r`` in ``[0, 1)`` — unstructured, prune the fraction ``r``.

Comparison groups (which weights compete for the kept slots), as in the papers:

* magnitude, unstructured: the whole layer (global threshold within the layer);
* Wanda, unstructured: each output row separately (Wanda paper, sec. 3: per-output
  comparison is what makes the ``|W|·‖x‖`` score work for LLMs);
* SparseGPT, unstructured: each lazy column block of ``blocksize`` columns, all rows
  together (the adaptive mask selection of the SparseGPT paper, sec. 3.3);
* N:M: each group of ``M`` inputs of each row, for every method.

Counts are exact: an unstructured ratio ``r`` prunes ``round(r * size)`` weights of each
comparison group (SparseGPT spreads the rounding over its column blocks so the layer total
is ``round(r * numel)``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..format import SparsityError, check_finite

__all__ = ["Pattern", "parse_pattern", "magnitude_mask", "wanda_mask", "sparsegpt_prune", "refit_kept", "topk_keep_mask"]


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: N:M (``n`` kept of ``m``) or an unstructured pruning ``ratio``."""

    n: int = 0
    m: int = 0
    ratio: float = 0.0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned."""
        return 1.0 - self.n / self.m if self.is_nm else self.ratio

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"

    def check_layer(self, shape: tuple[int, ...], name: Optional[str] = None) -> None:
        """Raise unless this pattern fits a weight of ``shape`` (N:M needs ``in % M == 0``)."""
        if self.is_nm and shape[-1] % self.m != 0:
            raise SparsityError(
                f"layer {name or '?'} has in_features={shape[-1]}, not divisible by M={self.m}: "
                f"the {self} pattern does not divide it; leave the layer dense (skip=[{name!r}]; on the command line --skip {name}) or use an unstructured ratio"
            )

    def check_keep(self, keep, shape: tuple[int, ...], what: str, name: Optional[str] = None) -> None:
        """Raise unless ``keep`` is a bool mask of ``shape`` that this pattern allows: exactly N of
        every M for N:M, the pattern's ratio (to one element) otherwise. ``what`` names it in the error."""
        shape = tuple(shape)
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != shape:
            raise SparsityError(f"{what} is {getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}, "
                                f"expected torch.bool of shape {shape}")
        self.check_layer(shape, name)
        if self.is_nm:
            if not (keep.reshape(shape[0], -1, self.m).sum(-1) == self.n).all():
                raise SparsityError(f"{what} does not keep exactly {self.n} of every {self.m} weights")
        elif abs((~keep).float().mean().item() - self.ratio) > 1.0 / keep.numel() + 1e-6:
            raise SparsityError(f"{what} prunes {(~keep).float().mean().item():.4f}, the pattern asks {self.ratio}")


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: Union[str, float, int, Pattern]) -> Pattern:
    """``"2:4"`` / ``"4:8"`` / ``0.5`` / ``"0.5"`` -> :class:`Pattern`, with clear errors."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, bool):
        raise TypeError(f"sparsity pattern must be 'N:M' or a ratio in [0, 1), got {pattern!r}")
    if isinstance(pattern, str):
        mt = _NM.match(pattern)
        if mt:
            n, m = int(mt.group(1)), int(mt.group(2))
            if not (0 < n < m):
                raise SparsityError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
            return Pattern(n=n, m=m)
        try:
            pattern = float(pattern)
        except ValueError:
            raise SparsityError(f"sparsity pattern must be 'N:M' (e.g. '2:4') or a ratio in [0, 1), got {pattern!r}") from None
    if isinstance(pattern, (int, float)):
        r = float(pattern)
        if not (0.0 <= r < 1.0) or math.isnan(r):
            raise SparsityError(f"sparsity ratio must lie in [0, 1), got {pattern!r}")
        return Pattern(ratio=r)
    raise TypeError(f"sparsity pattern must be 'N:M' or a ratio in [0, 1), got {type(pattern).__name__}")


def topk_keep_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep mask over a 1-D or 2-D score tensor pruning exactly ``n_prune`` lowest scores
    (per row for 2-D). Ties go to the lower index (stable sort), so the mask is deterministic."""
    flat = scores.reshape(-1, scores.shape[-1]) if scores.dim() > 1 else scores.reshape(1, -1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        # descending stable sort puts, among equal scores, the lower index first; the tail
        # (lowest scores, higher index on ties) is pruned
        order = torch.sort(flat.to(torch.float64), dim=-1, descending=True, stable=True).indices
        keep.scatter_(-1, order[:, flat.shape[-1] - n_prune:], False)
    return keep.reshape(scores.shape)


def _nm_keep(scores: torch.Tensor, p: Pattern) -> torch.Tensor:
    rows, cols = scores.shape
    g = scores.reshape(rows, cols // p.m, p.m).to(torch.float64)
    # keep the N highest of each group; ties -> lower column (stable descending sort)
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., : p.n]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(rows, cols)


def magnitude_mask(w: torch.Tensor, pattern: Union[str, float, Pattern], name: Optional[str] = None) -> torch.Tensor:
    """Keep the largest ``|W|``: per N:M group, or layer-wide for an unstructured ratio."""
    p = parse_pattern(pattern)
    p.check_layer(tuple(w.shape), name)
    check_finite(w, name)
    s = w.detach().abs()
    if p.is_nm:
        return _nm_keep(s, p)
    return topk_keep_mask(s.reshape(-1), round(p.ratio * s.numel())).reshape(s.shape)


def wanda_mask(w: torch.Tensor, sq_norm: torch.Tensor, pattern: Union[str, float, Pattern], name: Optional[str] = None) -> torch.Tensor:
    """Wanda: score ``|W_ij| * ||x_j||_2`` (``sq_norm[j] = ||x_j||^2`` over calibration tokens),
    compared per output row (unstructured) or per N:M group."""
    p = parse_pattern(pattern)
    p.check_layer(tuple(w.shape), name)
    check_finite(w, name)
    if sq_norm.shape != (w.shape[1],):
        raise SparsityError(f"layer {name}: input norms have shape {tuple(sq_norm.shape)}, expected ({w.shape[1]},)")
    s = w.detach().abs().to(torch.float64) * sq_norm.to(torch.float64).sqrt().unsqueeze(0)
    if p.is_nm:
        return _nm_keep(s, p)
    return topk_keep_mask(s, round(p.ratio * s.shape[1]))


def sparsegpt_prune(
    w: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Union[str, float, Pattern],
    percdamp: float = 0.01,
    blocksize: int = 128,
    name: Optional[str] = None,
    refit_iters: int = 0,
    keep: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, arXiv 2301.00774, Algorithm 1): prune column by column,
    compensating each pruned weight's error on the not-yet-processed columns through the
    inverse Hessian (OBS update), with lazy batched updates over column blocks.

    ``hessian`` is ``XᵀX`` (any positive scale) of the layer's calibration inputs. Dampening
    adds ``percdamp * mean(diag(H))`` to the diagonal; inputs that were never active
    (``H_jj == 0``) get ``H_jj = 1`` and their weights are zeroed, as in the reference code.
    Returns ``(new_weight, keep_mask)``; ``new_weight`` is zero outside the mask and has
    ``w``'s dtype. Computation is in float32 (float64 if ``w`` is float64). ``refit_iters`` > 0
    then re-solves the kept weights for the final mask (:func:`refit_kept`). ``keep``: a given
    bool mask to compensate for instead of choosing one by saliency (the caller checks it).
    """
    if not isinstance(refit_iters, int) or refit_iters < 0:
        raise SparsityError(f"layer {name}: refit_iters must be a non-negative integer, got {refit_iters!r}")
    p = parse_pattern(pattern)
    p.check_layer(tuple(w.shape), name)
    check_finite(w, name)
    check_finite(hessian, f"{name} (calibration Hessian)" if name else "calibration Hessian")
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise SparsityError(f"layer {name}: Hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().to(cdt).clone()
    H = hessian.detach().to(cdt).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, dtype=cdt, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        Hinv = torch.linalg.cholesky(Hinv, upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise SparsityError(f"layer {name}: the dampened Hessian is not positive definite ({e}); raise percdamp") from e

    if p.is_nm:
        # blocks must hold whole N:M groups
        blocksize = max(p.m, (blocksize // p.m) * p.m)
    given = keep.to(W.device) if keep is not None else None
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    total_prune = round(p.ratio * rows * cols) if not p.is_nm else 0
    n_pruned_so_far = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        keep1 = torch.ones_like(W1, dtype=torch.bool) if given is None else given[:, i1:i2].clone()
        if not p.is_nm and given is None:
            # OBS saliency w^2 / [H^-1]_jj^2 (Cholesky diag), selected once per block over all rows;
            # the block's quota spreads the layer-wide rounding so the total is exact.
            target = round(p.ratio * rows * i2) - n_pruned_so_far if i2 < cols else total_prune - n_pruned_so_far
            target = max(0, min(target, rows * count))
            sal = W1 ** 2 / d.unsqueeze(0) ** 2
            keep1 = topk_keep_mask(sal.reshape(-1), target).reshape(rows, count)
            n_pruned_so_far += target
        for i in range(count):
            if p.is_nm and given is None and i % p.m == 0:
                sal = W1[:, i: i + p.m] ** 2 / d[i: i + p.m].unsqueeze(0) ** 2
                keep1[:, i: i + p.m] = _nm_keep(sal, p)
            col = W1[:, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            Q1[:, i] = q
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W = torch.where(keep, W, torch.zeros_like(W))
    if refit_iters:
        W0 = w.detach().to(cdt).clone()
        W0[:, dead] = 0
        W = refit_kept(W0, H, keep, W, refit_iters)
    check_finite(W, f"{name} (after SparseGPT)" if name else "SparseGPT result")
    return W.to(w.dtype), keep


def refit_kept(w0: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, start: torch.Tensor, iters: int) -> torch.Tensor:
    """The kept weights that best reproduce the dense layer on the calibration inputs, for a fixed
    mask: per row, minimise (w − w0)ᵀ H (w − w0) with w zero outside the row's kept columns.

    SparseGPT compensates each pruned weight only on the columns to its right, so its kept
    weights are not the optimum for the mask it ends with; this finishes the job. Each row is an
    independent quadratic (optimum ``H_SS w_S = (H w0)_S``); all rows advance together by
    Jacobi-preconditioned conjugate gradients from ``start``, one [rows, cols] x [cols, cols]
    product per iteration, so it costs ``iters`` GEMMs of the layer's size at any scale (an exact
    per-row solve would cost rows x (cols/2)^3). ``hessian`` must already be dampened.
    Returns the refitted weight, zero outside ``keep``.
    """
    m = keep.to(start.dtype)
    w = start * m
    inv_diag = 1.0 / torch.diag(hessian).unsqueeze(0)
    r = (w0 - w) @ hessian * m  # minus the gradient, on the support (H is symmetric)
    z = r * inv_diag
    d = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    for _ in range(iters):
        hd = (d @ hessian) * m
        dhd = (d * hd).sum(1, keepdim=True)
        alpha = torch.where(dhd > 0, rz / dhd.clamp_min(torch.finfo(dhd.dtype).tiny), torch.zeros_like(dhd))
        w = w + alpha * d
        r = r - alpha * hd
        z = r * inv_diag
        rz_new = (r * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(torch.finfo(rz.dtype).tiny), torch.zeros_like(rz))
        d = z + beta * d
        rz = rz_new
    return w * m

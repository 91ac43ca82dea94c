"""The ``cusparselt`` backend: 2:4 GEMM on the sparse tensor cores through cuSPARSELt.

The kernels live in the C++ extension ``sparselora._C`` (``csrc/cusparselt/``), registered as
``torch.ops.sparselora.cslt_*``; this module adds their fake (meta) kernels so ``torch.compile``
traces them, thin Python wrappers, the tuning-file I/O and the backend itself.

* ``prepare`` unpacks the canonical layout once and compresses it into cuSPARSELt's own buffer
  (``cslt_compress``; the buffer depends on the GPU, so it is never saved: checkpoints keep the
  canonical layout). The dense temporary is freed right away.
* ``linear`` calls ``cslt_linear``: any number of tokens M (padded to a multiple of 8 inside),
  output dtype = input dtype, bias fused in the epilogue, fp32 accumulation. Plans are cached and
  the algorithm is searched once per (shape, M bucket) in C++; ``save_tuning`` / ``load_tuning``
  ship those choices, and a file ``tables/cusparselt_tuning_<gpu>.json`` in the package is loaded
  automatically the first time a weight is prepared on that GPU (``SPARSELORA_CSLT_AUTOLOAD=0``
  turns that off).
* Non-finite inputs: the sparse MMA skips x at pruned columns, so ``linear`` marks every output of a
  token with a NaN/Inf input NaN afterwards (:func:`sparselora.ops.propagate_nonfinite`), the
  semantics of every backend. Predicted cost (not measured): one read of x by a Triton kernel
  (``triton_kernels/nonfinite_rows.py``), M·K·2 bytes; at 4096 tokens through a 4096x4096 bf16
  weight, 32 MB, ~7 us at 4.8 TB/s next to a sparse GEMM of ~0.1 ms, i.e. a fraction of about
  250/N of the GEMM time for an N-output layer (larger for narrow layers such as CLIP's 1024).
* Autograd: cuSPARSELt only runs the forward product. When a gradient is needed (grad mode on and
  the input, weight or bias requires grad), ``linear`` runs the canonical ``sparse24_linear`` op
  instead, which has the backward. Run inference under ``torch.inference_mode()`` or
  ``torch.no_grad()`` to use cuSPARSELt.

Memory: a ``SparseLinear`` on this backend holds 2 copies of the weight: the canonical values +
meta (its state dict) and the compressed buffer (about the same size: 9/16 of dense bytes each),
about 1.125x the dense bytes. So ``auto`` never picks it unless ``allow_extra_copy=True``; naming
it (``backend="cusparselt"``) is an opt-in too.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Optional

import torch

from ..format import Packed24, SparsityError, unpack_24
from ..ops import propagate_nonfinite, sparse24_linear
from .base import Backend, register_backend

__all__ = [
    "extension_error", "cslt_compress", "cslt_linear", "compress_packed", "save_tuning", "load_tuning",
    "cache_stats", "set_search", "clear_cache", "CusparseLtBackend", "WEIGHT_ALIGN",
]

#: cuSPARSELt's rule for 16-bit structured matrices: rows and columns multiples of 16.
WEIGHT_ALIGN = 16
DTYPES = (torch.float16, torch.bfloat16)
TUNING_FORMAT = "sparselora-cusparselt-tuning"
_RECORD = ("n", "k", "m_bucket", "bias", "alg_id", "split_k", "split_k_mode", "split_k_buffers", "time_ns")


def _load_extension() -> Optional[str]:
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.sparselora.cslt_*)
    except ImportError as e:
        return (f"sparselora._C is not built or does not load ({e}); build it on a machine with a CUDA torch, "
                f"nvcc and nvidia-cusparselt: SPARSELORA_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    return None


_EXT_ERROR = _load_extension()


def extension_error() -> Optional[str]:
    """None if ``sparselora._C`` is loaded, else why not."""
    return _EXT_ERROR


def _require_extension() -> None:
    if _EXT_ERROR:
        raise RuntimeError(_EXT_ERROR)


if _EXT_ERROR is None:

    @torch.library.register_fake("sparselora::cslt_compress")
    def _compress_fake(weight, check=True):
        n, k = weight.shape
        # The size is set by cuSPARSELt (device dependent), not by the data: ask it.
        size = torch.ops.sparselora.cslt_compressed_size(n, k, weight.dtype, weight.device.index or 0)
        return weight.new_empty(size, dtype=torch.uint8)

    @torch.library.register_fake("sparselora::cslt_linear")
    def _linear_fake(x, compressed, out_features, in_features, bias=None):
        torch._check(x.shape[-1] == in_features, lambda: f"cslt_linear: input has {x.shape[-1]} features, expected {in_features}")
        return x.new_empty(*x.shape[:-1], out_features)

    def _linear_setup(ctx, inputs, output):
        pass

    def _linear_backward(ctx, grad):
        # The compressed buffer alone cannot give W^T dy; fail loudly instead of returning no grad.
        raise RuntimeError(
            "sparselora::cslt_linear is forward-only (cuSPARSELt's compressed weight has no backward here); "
            "use sparselora.ops.sparse24_linear when gradients are needed (SparseLinear does this itself)")

    torch.library.register_autograd("sparselora::cslt_linear", _linear_backward, setup_context=_linear_setup)


# -- thin wrappers ---------------------------------------------------------------------------
def cslt_compress(weight: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Compress a dense 2:4 ``[N, K]`` fp16/bf16 CUDA weight into cuSPARSELt's buffer (uint8).
    ``check`` verifies the 2:4 pattern on the GPU first (cuSPARSELt would silently compress garbage)."""
    _require_extension()
    return torch.ops.sparselora.cslt_compress(weight, check)


def cslt_linear(x: torch.Tensor, compressed: torch.Tensor, out_features: int, in_features: int,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T + bias`` with a weight compressed by :func:`cslt_compress`; ``x`` is ``[..., K]``."""
    _require_extension()
    return torch.ops.sparselora.cslt_linear(x, compressed, out_features, in_features, bias)


def compress_packed(packed: Packed24, check: bool = False) -> torch.Tensor:
    """cuSPARSELt buffer from the canonical layout. The canonical layout is 2:4 by construction,
    so the GPU pattern check is off by default."""
    dense = unpack_24(packed)
    try:
        return cslt_compress(dense, check)
    finally:
        del dense


# -- caches and tuning -------------------------------------------------------------------------
def cache_stats() -> dict:
    """Plan-cache and tuning counters of this process."""
    _require_extension()
    keys = ("plans", "plan_hits", "plan_misses", "searches", "tuned", "bias_rebinds")
    return dict(zip(keys, torch.ops.sparselora.cslt_cache_stats()))


def set_search(enabled: bool) -> None:
    """Turn the per-shape algorithm search on (default; ``SPARSELORA_CSLT_SEARCH=0`` turns it off)
    or off (untuned shapes then use cuSPARSELt's default algorithm)."""
    _require_extension()
    torch.ops.sparselora.cslt_set_search(bool(enabled))


def clear_cache(plans: bool = True, tuning: bool = False) -> None:
    _require_extension()
    torch.ops.sparselora.cslt_clear_cache(plans, tuning)


def _runtime_version() -> int:
    return int(torch.ops.sparselora.cslt_version(torch.cuda.current_device()))


def save_tuning(path: str | os.PathLike) -> int:
    """Write the algorithm choices found so far to a JSON file (atomically); returns the count."""
    _require_extension()
    strings, records = torch.ops.sparselora.cslt_tuning_export()
    entries = []
    for i in range(len(strings) // 2):
        rec = dict(zip(_RECORD, records[i * len(_RECORD):(i + 1) * len(_RECORD)]))
        rec["bias"] = bool(rec["bias"])
        entries.append({"device": strings[2 * i], "dtype": strings[2 * i + 1], **rec})
    payload = {
        "format": TUNING_FORMAT,
        "version": 1,
        "cusparselt": _runtime_version() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "entries": sorted(entries, key=lambda e: (e["device"], e["dtype"], e["n"], e["k"], e["m_bucket"], e["bias"])),
    }
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    return len(entries)


def load_tuning(path: str | os.PathLike) -> int:
    """Load algorithm choices saved by :func:`save_tuning`; returns how many were loaded.

    Entries carry the device name and are used only on that device. A file written with another
    cuSPARSELt version is ignored with a warning (algorithm ids are not stable across versions).
    Loading drops cached plans, so the next calls use the loaded choices."""
    _require_extension()
    with open(path) as f:
        payload = json.load(f)
    if not isinstance(payload, dict) or payload.get("format") != TUNING_FORMAT:
        raise ValueError(f"{path}: not a sparselora cuSPARSELt tuning file (format != {TUNING_FORMAT!r})")
    file_version, ours = payload.get("cusparselt"), _runtime_version()
    if file_version is not None and file_version != ours:
        warnings.warn(f"{path}: tuned with cuSPARSELt {file_version}, this process runs {ours}; ignoring it")
        return 0
    strings, records = [], []
    for i, e in enumerate(payload.get("entries", [])):
        try:
            strings += [str(e["device"]), str(e["dtype"])]
            records += [int(e[k]) for k in _RECORD]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: tuning entry {i} is malformed ({err!r}): {e}") from None
    return int(torch.ops.sparselora.cslt_tuning_import(strings, records))


def shipped_tuning_path(device_name: str):
    """Where a tuning file shipped with the package for this GPU lives (may not exist)."""
    from .device_tables import TABLE_DIR, slug

    return TABLE_DIR / f"cusparselt_tuning_{slug(device_name)}.json"


_AUTOLOADED: set = set()


def _autoload_tuning(device: torch.device) -> None:
    """Load the shipped tuning file of this GPU once per process, if there is one."""
    name = torch.cuda.get_device_name(device)
    if name in _AUTOLOADED:
        return
    _AUTOLOADED.add(name)
    path = shipped_tuning_path(name)
    if path.is_file():
        try:
            load_tuning(path)
        except (OSError, ValueError, RuntimeError) as e:
            warnings.warn(f"sparselora: ignoring shipped cuSPARSELt tuning {path}: {e}")


# -- CUDA-graph capture ------------------------------------------------------------------------
_log = logging.getLogger("sparselora.cusparselt")
#: (device, dtype, N, K, M bucket, bias) run outside any capture: their algorithm is searched
_WARM: set = set()


def _m_bucket(m: int) -> int:
    """The C++ plan cache's tuning bucket of ``m`` rows (padded to 8, then a power of two)."""
    padded, bucket = -(-m // 8) * 8, 8
    while bucket < padded:
        bucket *= 2
    return bucket


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _note_capture(x: torch.Tensor, n: int, k: int, has_bias: bool) -> None:
    """Warn when a (shape, M bucket) is first seen inside a CUDA-graph capture: the algorithm
    search cannot run there, so the capture records cuSPARSELt's default algorithm (the C++ cache
    marks that plan provisional and searches on the first call outside a capture)."""
    key = (x.device, x.dtype, n, k, _m_bucket(x.numel() // k if k else 0), has_bias)
    if key in _WARM:
        return
    if not _capturing():
        _WARM.add(key)
        return
    _log.warning("sparselora: cuSPARSELt GEMM [%d, %d] with M=%d first seen inside a CUDA-graph capture: the "
                 "algorithm search cannot run there, this graph uses cuSPARSELt's default algorithm. Run the "
                 "layer once with this M before capturing.", n, k, x.numel() // k if k else 0)


# -- the backend -------------------------------------------------------------------------------
def _needs_grad(x: torch.Tensor, packed: Packed24, bias: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or packed.values.requires_grad or (bias is not None and bias.requires_grad)
    )


def shape_reason(dtype: torch.dtype, out_features: int, in_features: int) -> Optional[str]:
    """Why cuSPARSELt cannot take this weight (device-independent rules), or None."""
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported by cuSPARSELt here (float16, bfloat16)"
    bad = [f"{name}={v}" for name, v in (("out_features", out_features), ("in_features", in_features)) if v % WEIGHT_ALIGN]
    if bad:
        return f"{', '.join(bad)} not a multiple of {WEIGHT_ALIGN} (cuSPARSELt structured-matrix rule for 16-bit types)"
    return None


class CusparseLtBackend(Backend):
    name = "cusparselt"
    priority = 30
    copies = 2  # auto skips it unless allow_extra_copy=True
    weight_copies = ("2 (canonical values+meta, the module's state dict; plus the cuSPARSELt compressed buffer, "
                     "about the same size); auto only with allow_extra_copy=True")

    def unavailable_reason(self):
        if _EXT_ERROR:
            return _EXT_ERROR
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def unsupported_reason(self, device, dtype, out_features, in_features):
        device = torch.device(device)
        if device.type != "cuda":
            return f"cuSPARSELt runs on CUDA devices only, not {device}"
        why = shape_reason(dtype, out_features, in_features)
        if why:
            return why
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                return f"compute capability {major}.{minor} < 8.0 (no sparse tensor cores)"
        return None

    def prepare(self, packed: Packed24) -> dict[str, torch.Tensor]:
        if packed.device.type != "cuda":
            raise SparsityError(f"cusparselt backend: weight is on {packed.device}, needs a CUDA device")
        if os.environ.get("SPARSELORA_CSLT_AUTOLOAD", "1") != "0":
            _autoload_tuning(packed.device)
        return {"cslt_compressed": compress_packed(packed)}

    def linear(self, x, packed, extra, bias):
        if _needs_grad(x, packed, bias):
            return sparse24_linear(x, packed.values, packed.meta, bias)
        if x.dtype != packed.dtype:
            raise SparsityError(f"cusparselt backend: input dtype {x.dtype} != weight dtype {packed.dtype}")
        n, k = packed.shape
        _note_capture(x, n, k, bias is not None)
        y = cslt_linear(x, extra["cslt_compressed"], n, k, bias)
        # the sparse tensor cores never read x at pruned columns: a NaN/Inf there would vanish.
        # Masked-dense semantics (sparselora.ops) cost one more read of x here.
        return propagate_nonfinite(y, x)


CUSPARSELT = register_backend(CusparseLtBackend())

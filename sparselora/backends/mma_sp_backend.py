"""The ``mma-sp`` backend: hand-written 2:4 kernels on the sparse tensor cores (``csrc/sparse_mma/``).

The weight is held in the GPU layout of ``csrc/sparse_mma/layout.h`` (:mod:`sparselora.gpu_layout`,
a reversible reorder of the canonical layout), and ``y = x W^T + b`` runs as the op
``sparselora::mma_sp_linear``. Memory: one copy. The backend is ``resident = "own"``: a
``SparseLinear`` on it holds only the GPU layout (9/16 of the dense bytes for the VLM shapes; small
shapes are padded to whole tiles) and rebuilds the canonical layout with ``to_canonical`` for its
state dict, checkpoints and backend switches.

* schema, CPU reference and fake kernel are defined here, so the op works anywhere (the CPU kernel
  reorders back to canonical and runs the reference) and ``torch.compile`` traces it;
* the CUDA kernel comes from the extension ``sparselora._C`` (``csrc/bindings.cpp``), built on a
  machine with CUDA torch and nvcc.
* non-finite inputs: ``mma.sp`` never reads x at pruned columns, so the kernels (decode and
  prefill) fold the masked-dense rule in themselves: every x fragment they load is tested for an
  all-ones exponent (3 integer ops per register, ``csrc/sparse_mma/mma_sp.h``
  ``nonfinite_halves``), and a flagged token's accumulators are set to NaN before the split-K sum
  and bias. The CTAs of a tile (one, or ``splits`` with split-K across CTAs) read all K columns
  of its tokens between them, and a flagged partial makes the sum NaN, so the flag is complete;
  no extra launch (``propagate_nonfinite`` is not called).
* split-K across CTAs (decode configs, ``csrc/sparse_mma/split_k.h``): the launcher splits K over
  up to 16 CTAs per tile when the grid would fill the GPU's CTA slots badly (e.g. N = 3584: 112
  tiles on 132 SMs x 2). Partials go through a workspace the op keeps per device (2 MiB of fp32
  partials + 32 KiB of counters, allocated zeroed once, in :meth:`MmaSpBackend.prepare` or at the
  first call; never cleared again: the last CTA of each tile resets its counter). It is memory but
  not a weight copy: :func:`sparselora.memory.workspace_bytes` counts it once per device, and the
  ``sparsify`` report adds it. Launches on one device must be stream-ordered (they share it).

``config`` (-1 = the generated table's choice, see :mod:`sparselora.mma_sp_configs`) forces a tile
config, for tests. Decode configs serve M < 64 (8..32 tokens per CTA); from M = 64 on the table picks
a prefill config (``csrc/sparse_mma/prefill_kernel.cuh``: 128 rows x 64..128 tokens per CTA, the same
GPU layout, no second copy). Prefill speed is a static prediction, not measured yet, which is why the backend's
priority (25) sits above ``triton`` and below ``cusparselt``/``hybrid`` until a GPU measurement
says otherwise (those two hold a second weight copy, so ``auto`` takes them only with
``allow_extra_copy=True``). Whether ``sparsify(backend="auto")`` takes it for a layer at all, or
leaves the layer dense, is its speed verdict (:mod:`sparselora.backends.mma_sp_policy`: a measured
per-device table, else a documented conservative prior).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..format import Packed24, SparsityError, unpack_24
from ..gpu_layout import GpuPacked24, from_gpu_layout, gpu_layout_sizes, to_gpu_layout
from ..mma_sp_configs import CONFIGS, PREFILL_CONFIGS
from ..ops import sparse24_linear
from .base import Backend, register_backend
from .mma_sp_policy import mma_sp_verdict

DTYPES = (torch.float16, torch.bfloat16)
SCHEMA = ("mma_sp_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias, int out_features, int config=-1, "
          "int splits=-1) -> Tensor")

_LIB = torch.library.Library("sparselora", "FRAGMENT")
_LIB.define(SCHEMA)


def _load_extension() -> Optional[str]:
    try:
        from .. import _C  # noqa: F401  (registers the CUDA kernel of sparselora::mma_sp_linear)
    except ImportError as e:
        return (f"sparselora._C is not built or does not load ({e}); build it on a machine with a CUDA torch and "
                f"nvcc: SPARSELORA_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("sparselora::mma_sp_linear", "CUDA"):
        return "sparselora._C loads but has no CUDA kernel for sparselora::mma_sp_linear (an older build?)"
    return None


_EXT_ERROR = _load_extension()


_CONFIG_IDS = frozenset(c.id for c in CONFIGS + PREFILL_CONFIGS)


def check_args(x, values, meta, bias, out_features: int, config: int, splits: int = -1) -> tuple[int, int]:
    """The checks the CUDA op makes (minus device-specific ones), with the same messages; returns (N, K)."""
    op = "sparselora.mma_sp_linear"
    if x.dtype not in DTYPES:
        raise SparsityError(f"{op}: x must be float16 or bfloat16, got {x.dtype}")
    if values.dtype != x.dtype:
        raise SparsityError(f"{op}: values dtype {values.dtype} != x dtype {x.dtype}")
    if meta.dtype != torch.int32:
        raise SparsityError(f"{op}: meta must be int32, got {meta.dtype}")
    n, k = int(out_features), int(x.shape[-1])
    if n <= 0 or k <= 0:
        raise SparsityError(f"{op}: out_features={n}, in_features={k} out of range")
    if k % 8:
        raise SparsityError(f"{op}: in_features={k} must be a multiple of 8 (x is staged in 16-byte chunks)")
    mt, kt, kq = gpu_layout_sizes(n, k)
    if tuple(values.shape) != (mt, kt, 32, 8):
        raise SparsityError(f"{op}: values must be the GPU layout [{mt}, {kt}, 32, 8] of a [{n}, {k}] weight, "
                            f"got {list(values.shape)}")
    if tuple(meta.shape) != (mt, kq, 32, 4):
        raise SparsityError(f"{op}: meta must be the GPU layout [{mt}, {kq}, 32, 4] of a [{n}, {k}] weight, "
                            f"got {list(meta.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise SparsityError(f"{op}: bias must be [{n}] {x.dtype}, got {list(bias.shape)} {bias.dtype}")
    if config != -1 and config not in _CONFIG_IDS:
        raise SparsityError(f"{op}: config={config}; valid: -1 (auto), 0..{len(CONFIGS) - 1} (decode) or "
                            f"{', '.join(str(c.id) for c in PREFILL_CONFIGS)} (prefill)")
    if splits != -1 and not 1 <= splits <= kq:
        raise SparsityError(f"{op}: splits={splits}; valid: -1 (auto) or 1..{kq} (the 256-column k-blocks of "
                            f"in_features={k})")
    if splits > 1 and config >= 100:
        raise SparsityError(f"{op}: splits={splits} with prefill config {config}: prefill configs do not split K "
                            f"across CTAs (splits must be -1 or 1)")
    return n, k


@torch.library.impl(_LIB, "mma_sp_linear", "CPU")
def _mma_sp_linear_cpu(x, values, meta, bias, out_features, config=-1, splits=-1):
    # the reference: back to canonical (exact), dense, fp32 matmul, cast (config and splits only validated)
    n, k = check_args(x, values, meta, bias, out_features, config, splits)
    w = unpack_24(from_gpu_layout(GpuPacked24(values, meta, (n, k))))
    y = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


@torch.library.register_fake("sparselora::mma_sp_linear")
def _mma_sp_linear_fake(x, values, meta, bias, out_features, config=-1, splits=-1):
    check_args(x, values, meta, bias, out_features, config, splits)
    return x.new_empty(*x.shape[:-1], out_features)


def mma_sp_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor],
                  out_features: int, config: int = -1, splits: int = -1) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` in the GPU layout (``values``, ``meta`` from :func:`to_gpu_layout`).
    ``splits``: split-K across CTAs of the decode configs (-1: the launcher's choice, see
    :func:`sparselora.mma_sp_configs.choose_splits`; >= 1 forces it, for tests)."""
    return torch.ops.sparselora.mma_sp_linear(x, values, meta, bias, out_features, config, splits)


def workspace_bytes(device, allocate: bool = False) -> int:
    """Bytes of the split-K workspace the CUDA op keeps on ``device`` (one per device, shared by
    every layer: fp32 partial tiles + arrival counters, :data:`sparselora.mma_sp_configs.WORKSPACE_BYTES`
    once allocated; 0 before, without the extension, or off CUDA). ``allocate``: allocate it now
    (outside a CUDA graph capture) so that a later capture gets split-K."""
    device = torch.device(device)
    if device.type != "cuda" or _EXT_ERROR:
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(torch.ops.sparselora.mma_sp_workspace_bytes(index, allocate))


def extension_error() -> Optional[str]:
    return _EXT_ERROR


class MmaSpBackend(Backend):
    name = "mma-sp"
    priority = 25
    resident = "own"  # the layer holds only the GPU layout; to_canonical rebuilds the canonical one bit for bit
    weight_copies = "1 (the GPU layout only, replacing the canonical values+meta; 9/16 of dense bytes, small shapes padded)"

    def unavailable_reason(self) -> Optional[str]:
        if _EXT_ERROR:
            return _EXT_ERROR
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def unsupported_reason(self, device, dtype, out_features, in_features) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cuda":
            return f"mma.sp kernels run on CUDA devices only, not {device}"
        if dtype not in DTYPES:
            return f"dtype {dtype} not supported ({self.name} takes float16, bfloat16)"
        if in_features % 8:
            return f"in_features={in_features} not a multiple of 8 (x is staged in 16-byte chunks)"
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                return f"compute capability {major}.{minor} < 8.0 (no sparse tensor cores)"
        return None

    def speed_verdict(self, profile, dtype, out_features, in_features, tokens=None):
        return mma_sp_verdict(profile, out_features, in_features, tokens)

    def workspace_bytes(self, device) -> int:
        """The split-K workspace of ``device`` (fp32 partial tiles + arrival counters, shared by every
        layer; :data:`sparselora.mma_sp_configs.WORKSPACE_BYTES` once allocated, else 0)."""
        return workspace_bytes(device)

    def prepare(self, packed: Packed24) -> dict[str, torch.Tensor]:
        gpu = to_gpu_layout(packed)
        # the split-K workspace now, outside any CUDA graph capture (a capture cannot allocate it)
        workspace_bytes(packed.values.device, allocate=True)
        return {"mma_sp_values": gpu.values, "mma_sp_meta": gpu.meta}

    def to_canonical(self, extra: dict[str, torch.Tensor], shape: tuple[int, int]) -> Packed24:
        """The exact inverse of :meth:`prepare` (bit for bit)."""
        return from_gpu_layout(GpuPacked24(extra["mma_sp_values"], extra["mma_sp_meta"], tuple(shape)))

    def linear(self, x, packed, extra, bias, config: int = -1, shape=None, splits: int = -1):
        # SparseLinear passes packed=None and shape (it holds only the GPU layout); benchmarks may pass packed
        shape = tuple(packed.shape) if packed is not None else shape
        if shape is None:
            raise SparsityError("mma-sp backend: linear needs the canonical packed weight or shape=(N, K)")
        weight_grad = packed is not None and packed.values.requires_grad
        if torch.is_grad_enabled() and (x.requires_grad or weight_grad or (bias is not None and bias.requires_grad)):
            p = packed if packed is not None else self.to_canonical(extra, shape)
            return sparse24_linear(x, p.values, p.meta, bias)  # the op with autograd
        dtype = extra["mma_sp_values"].dtype
        if x.dtype != dtype:
            raise SparsityError(f"mma-sp backend: input dtype {x.dtype} != weight dtype {dtype}")
        # non-finite x at pruned columns: the CUDA kernels fold the flag in, the CPU kernel is the
        # dense reference
        return mma_sp_linear(x, extra["mma_sp_values"], extra["mma_sp_meta"], bias, shape[0], config, splits)


MMA_SP = register_backend(MmaSpBackend())

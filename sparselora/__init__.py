"""sparselora: fast 2:4 sparse kernels, pruning and SparseLoRA for vision-language models."""
from .format import Packed24, SparsityError, nm_mask, check_nm, validate_24, pack_24, unpack_24
from . import ops  # noqa: F401  (registers the torch.library ops)
from .backends import Backend, register_backend, get_backend, list_backends, choose_backend
from .modules import SparseLinear
from .patch import sparsify, unsparsify, SparsifyReport
from .checkpoint import save_sparse, load_sparse, CheckpointError
from .memory import resident_bytes

__version__ = "0.1.0"

from .hf_registration import install as _install_hf_method

_install_hf_method()  # from_pretrained of packed directories, once transformers loads (see hf_quantizer)

# SparseLoRA loads on first use: it registers ops and pulls in more of torch, which
# `import sparselora` (and `sparselora --help`) should not pay for.
_LAZY = {
    "SparseLoRALinear": "lora", "add_sparse_lora": "lora", "merge_sparse_lora": "lora",
    "lora_parameters": "lora", "distill": "distill",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sparselora' has no attribute {name!r}")

__all__ = [
    "Packed24", "SparsityError", "nm_mask", "check_nm", "validate_24", "pack_24", "unpack_24",
    "Backend", "register_backend", "get_backend", "list_backends", "choose_backend", "SparseLinear",
    "sparsify", "unsparsify", "SparsifyReport", "save_sparse", "load_sparse", "CheckpointError", "resident_bytes",
    "SparseLoRALinear", "add_sparse_lora", "merge_sparse_lora", "lora_parameters", "distill",
]

"""sparselora: fast 2:4 sparse kernels, pruning and SparseLoRA for vision-language models."""
from .format import Packed24, SparsityError, nm_mask, check_nm, validate_24, pack_24, unpack_24
from . import ops  # noqa: F401  (registers the torch.library ops)
from .backends import Backend, register_backend, get_backend, list_backends, choose_backend
from .modules import SparseLinear
from .patch import sparsify, unsparsify, SparsifyReport
from .checkpoint import save_sparse, load_sparse, CheckpointError
from .lora import SparseLoRALinear, add_sparse_lora, merge_sparse_lora, lora_parameters
from .distill import distill

__version__ = "0.1.0"

__all__ = [
    "Packed24", "SparsityError", "nm_mask", "check_nm", "validate_24", "pack_24", "unpack_24",
    "Backend", "register_backend", "get_backend", "list_backends", "choose_backend", "SparseLinear",
    "sparsify", "unsparsify", "SparsifyReport", "save_sparse", "load_sparse", "CheckpointError",
    "SparseLoRALinear", "add_sparse_lora", "merge_sparse_lora", "lora_parameters", "distill",
]

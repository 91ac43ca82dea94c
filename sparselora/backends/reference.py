"""The reference backend: decompress the canonical layout, then a dense matmul.

It runs anywhere and is the numerical oracle of the conformance tests. On CPU it goes
through the ``sparselora::sparse24_linear`` op (whose CPU kernel is this reference), so a
packed layer traces under ``torch.compile``.
"""
from __future__ import annotations


from ..format import SUPPORTED_DTYPES
from ..ops import reference_sparse24_linear, sparse24_linear
from .base import Backend, SpeedVerdict, register_backend


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    weight_copies = "1 (canonical packed values + meta; a dense copy is rebuilt per call)"

    def unsupported_reason(self, device, dtype, out_features, in_features):
        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype} not in {SUPPORTED_DTYPES}"
        if in_features % 4:
            return f"in_features={in_features} not a multiple of 4"
        return None

    def speed_verdict(self, profile, dtype, out_features, in_features, tokens=None):
        # on CPU there is no fast kernel to compare (a packed layer is there for memory and
        # correctness); on an accelerator, decompress + F.linear is slower than F.linear alone
        if profile.kind in ("cpu", "meta"):
            return None
        return SpeedVerdict(True, "prior", "decompresses the weight per call, then the same dense matmul")

    def linear(self, x, packed, extra, bias):
        if x.device.type in ("cpu", "meta"):  # meta: the op's fake kernel gives the output's shape
            return sparse24_linear(x, packed.values, packed.meta, bias)
        # on accelerators the op's kernel is a fast backend's; the oracle stays the oracle
        return reference_sparse24_linear(x, packed.values, packed.meta, bias)


register_backend(ReferenceBackend())

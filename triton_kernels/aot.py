"""Ahead-of-time compilation of shipped Triton configurations for real GPUs, no GPU needed.

Every kernel module in ``triton_kernels/`` exposes ``aot_specs() -> list[AotSpec]``: one entry
per shipped configuration (each autotune config, each dtype). ``tests/test_triton_aot.py``
compiles all of them for sm_80 and sm_90 and checks they fit shared memory, so a config that
would not build on real hardware fails CI.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# usable dynamic shared memory per block (bytes)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class AotSpec:
    name: str
    fn: object  # the @triton.jit function
    signature: dict  # arg name -> type string ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple = (80, 90)
    extra: dict = field(default_factory=dict)


def compile_spec(spec: AotSpec, arch: int):
    """Compile one spec for ``sm_<arch>``; returns the compiled kernel (asm + metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def all_specs() -> list[AotSpec]:
    import importlib
    import pkgutil

    import sparselora.triton_kernels as pkg

    specs = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name == "aot":
            continue
        m = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        if hasattr(m, "aot_specs"):
            specs.extend(m.aot_specs())
    return specs

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

    # attrs (e.g. 16-byte divisibility) make the check build what real launches build: wide loads, cp.async
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.extra.get("attrs"))
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


def check(specs: list[AotSpec]) -> list[dict]:
    """Compile every spec for each of its archs; one result row per (spec, arch)."""
    rows = []
    for spec in specs:
        for arch in spec.archs:
            row = {"name": spec.name, "arch": arch}
            try:
                k = compile_spec(spec, arch)
                row.update(ok=k.metadata.shared <= SHARED_LIMIT[arch], shared=k.metadata.shared,
                           wgmma="wgmma" in k.asm.get("ptx", ""), error=None)
                if not row["ok"]:
                    row["error"] = f"shared memory {k.metadata.shared} B > sm_{arch} limit {SHARED_LIMIT[arch]} B"
            except Exception as e:  # any compile failure is a failed row, reported with its cause
                row.update(ok=False, shared=None, wgmma=False, error=f"{type(e).__name__}: {e}"[:2000])
            rows.append(row)
    return rows


def main(argv=None) -> int:
    """``python -m sparselora.triton_kernels.aot [--module extra.mod] [--json]``.

    Must run with TRITON_INTERPRET unset: interpreted kernels cannot be compiled for a GPU."""
    import argparse
    import importlib
    import json
    import os

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--module", action="append", default=[], help="also compile aot_specs() of this module")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the AOT check compiles real GPU code")
    specs = all_specs() if not args.module else []
    for m in args.module:
        specs.extend(importlib.import_module(m).aot_specs())
    rows = check(specs)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{'ok ' if r['ok'] else 'FAIL'} sm_{r['arch']} {r['name']:<48} shared={r['shared']} {r['error'] or ''}")
        print(f"{sum(r['ok'] for r in rows)} passed, {sum(not r['ok'] for r in rows)} failed")
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Ahead-of-time compilation of shipped Triton configurations for real GPUs, no GPU needed.

Every kernel module in ``triton_kernels/`` exposes ``aot_specs() -> list[AotSpec]``: one entry
per shipped configuration (each autotune config, each dtype). ``tests/test_triton_aot.py``
compiles all of them for sm_80 and sm_90 and checks they fit shared memory, so a config that
would not build on real hardware fails CI.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

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


def aligned_attrs(fn, names) -> dict:
    """Specialization attrs that launches on aligned tensors get (pointers, sizes and strides
    divisible by 16; Triton specializes them at launch): with them Triton emits 16-byte loads and
    cp.async pipelining, and shared memory grows accordingly, so this is the build the checks
    must see. Put in ``AotSpec.extra["attrs"]`` (ASTSource's ``attrs``)."""
    return {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in names}


def compile_spec(spec: AotSpec, arch: int):
    """Compile one spec for ``sm_<arch>``; returns the compiled kernel (asm + metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # attrs (e.g. 16-byte divisibility) make the check build what real launches build: wide loads, cp.async
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.extra.get("attrs"))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


_PTX_COUNTS = {
    # 16-byte global loads: the weight stream must be read in wide transactions to reach bandwidth
    "wide_loads": r"ld\.global(?:\.[a-z0-9_]+)*\.v4\.",
    "cp_async": r"cp\.async\.(?:ca|cg)",  # Ampere-style asynchronous copies (software pipelining)
    "cp_async16": r"cp\.async\.cg\.shared\.global[^;]*, 0x10",  # ... of 16 bytes each
    "tma": r"cp\.async\.bulk",  # Hopper tensor-memory-accelerator copies
    "wgmma_ops": r"wgmma\.mma_async",  # Hopper warpgroup MMA
    "mma_ops": r"\bmma\.sync",  # Ampere MMA
}


def _cuobjdump() -> Optional[Path]:
    import triton

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return exe if exe.is_file() else None


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack frame and local memory per thread of a compiled kernel, read from the cubin
    with the cuobjdump that ships with Triton (no GPU needed). A nonzero stack or local size means
    register spills (or a local array): slow local-memory traffic on every iteration."""
    exe = _cuobjdump()
    if exe is None:
        return {"regs": None, "stack": None, "local": None}
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "kernel.cubin"
        f.write_bytes(cubin)
        out = subprocess.run([str(exe), "-res-usage", str(f)], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if not m:
        return {"regs": None, "stack": None, "local": None}
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(3))}


def ptx_counts(ptx: str) -> dict:
    return {k: len(re.findall(pat, ptx)) for k, pat in _PTX_COUNTS.items()}


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
                           error=None, num_warps=spec.num_warps,
                           num_stages=spec.num_stages, **resource_usage(k.asm["cubin"]), **ptx_counts(k.asm.get("ptx", "")))
                if not row["ok"]:
                    row["error"] = f"shared memory {k.metadata.shared} B > sm_{arch} limit {SHARED_LIMIT[arch]} B"
            except Exception as e:  # any compile failure is a failed row, reported with its cause
                row.update(ok=False, shared=None, error=f"{type(e).__name__}: {e}"[:2000])
            rows.append(row)
    return rows


def report_markdown(rows: list[dict]) -> str:
    """The static resource table of every compiled config (what costs no device time to read)."""
    import triton

    cols = ["name", "arch", "num_warps", "num_stages", "regs", "stack", "local", "shared", "wide_loads", "cp_async", "cp_async16", "tma",
            "wgmma_ops", "mma_ops"]
    lines = [f"# Triton kernels: static resources per shipped config (triton {triton.__version__}, no GPU)", "",
             "Command: `python -m sparselora.triton_kernels.aot --report benchmarks/results/triton_static.md`.",
             "regs/stack/local: per thread, from the cubin (`cuobjdump -res-usage`); stack or local > 0 means spills.",
             "shared: bytes per block. Other columns: instruction counts in the PTX (wide_loads = 16-byte `ld.global...v4`;",
             "cp_async16 = 16-byte `cp.async`; tma = `cp.async.bulk`; wgmma_ops / mma_ops = tensor-core instructions).",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


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
    ap.add_argument("--report", metavar="MD", help="also write a markdown resource table (registers, spills, wide loads...)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the AOT check compiles real GPU code")
    specs = all_specs() if not args.module else []
    for m in args.module:
        specs.extend(importlib.import_module(m).aot_specs())
    rows = check(specs)
    if args.report:
        Path(args.report).write_text(report_markdown(rows))
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{'ok ' if r['ok'] else 'FAIL'} sm_{r['arch']} {r['name']:<48} shared={r['shared']} {r['error'] or ''}")
        print(f"{sum(r['ok'] for r in rows)} passed, {sum(not r['ok'] for r in rows)} failed")
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

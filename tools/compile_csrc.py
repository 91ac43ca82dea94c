#!/usr/bin/env python
"""Compile-only check of every C++/CUDA source in ``csrc/`` with nvcc, no GPU and no CUDA torch needed.

    python tools/compile_csrc.py            # all csrc/**/*.cpp and *.cu; exit 1 on any failure
    python tools/compile_csrc.py FILE ...   # just these files (used by tests/test_csrc_compile.py)

It compiles against the headers of the installed torch (a CPU wheel is enough), a one-line shim for
the ``c10/cuda/impl/cuda_cmake_macros.h`` that CPU wheels lack (``tools/shim``), Python's headers and
the cuSPARSELt header found by ``csrc/build_config.py``, with the build's defines and, for ``.cu``
files, the build's ``-gencode`` flags (sm_80 and sm_90a). Objects go to a temporary directory and
are thrown away: this checks that the sources compile, the GPU machine builds the real extension.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "csrc"))
import build_config  # noqa: E402

SHIM = ROOT / "tools" / "shim"


def find_nvcc() -> str:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda-13.0/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise SystemExit("compile_csrc: nvcc not found (set NVCC=/path/to/nvcc or put it on PATH)")


def torch_flags() -> list[str]:
    import torch
    import torch.utils.cpp_extension as ext

    # The same language standard and ABI as torch's own extension builder uses.
    std = "-std=c++20" if "-std=c++20" in inspect.getsource(ext) else "-std=c++17"
    flags = [std, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    # The shim goes last: a CUDA build of torch ships the real header, which must win.
    incs = build_config.include_dirs() + ext.include_paths() + [build_config.python_include(), str(SHIM)]
    return flags + [f"-I{i}" for i in incs]


def command(nvcc: str, src: Path, obj: Path, common: list[str]) -> list[str]:
    cmd = [nvcc, "-c", str(src), "-o", str(obj), "-Xcompiler", "-fPIC"] + common
    if src.suffix == ".cu":
        cmd += build_config.NVCC_FLAGS  # includes the -gencode list: one object with every arch
    else:
        cmd += build_config.CXX_FLAGS  # host code: nvcc hands it to the host compiler, as the build does
    return cmd


def sources(all_instantiations: bool = False) -> list[Path]:
    """Every hand-written source, plus one generated mma.sp instantiation per (dtype, kernel kind).

    The generated files differ only in template arguments, and tools/sparse_mma_static.py already
    builds every config for sm_80/86/89/90a with the static gates; compiling all of them here
    again (three gencodes each) tripled CI's nvcc time for no new coverage. ``--all`` compiles
    every one (the GPU build always does)."""
    csrc = ROOT / "csrc"
    files = sorted(list(csrc.rglob("*.cpp")) + list(csrc.rglob("*.cu")))
    if all_instantiations:
        return files
    kept, seen = [], set()
    for f in files:
        if f.parent.name == "instantiations":
            dtype = f.name.split("_")[1]  # linear_<dtype>_...
            key = (dtype, "prefill" in f.name)
            if key in seen:
                continue
            seen.add(key)
        kept.append(f)
    return kept


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="sources to compile (default: every csrc/**/*.cpp, *.cu)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("-v", "--verbose", action="store_true", help="print each nvcc command")
    ap.add_argument("--all", action="store_true", help="every generated mma.sp instantiation too (default: one per dtype and kind)")
    args = ap.parse_args(argv)

    nvcc = find_nvcc()
    files = [f.resolve() for f in args.files] or sources(args.all)
    if not files:
        print("compile_csrc: no sources found", file=sys.stderr)
        return 1
    common = torch_flags()
    t0 = time.time()
    failures = []
    with tempfile.TemporaryDirectory(prefix="compile_csrc_") as tmp:

        def run(src: Path):
            obj = Path(tmp) / (src.name + ".o")
            cmd = command(nvcc, src, obj, common)
            t = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True)
            return src, cmd, p, time.time() - t

        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for src, cmd, p, dt in pool.map(run, files):
                rel = src.relative_to(ROOT) if src.is_relative_to(ROOT) else src
                status = "ok" if p.returncode == 0 else f"FAILED (exit {p.returncode})"
                print(f"compile_csrc: {rel}: {status} in {dt:.1f} s")
                if args.verbose or p.returncode:
                    print("  " + " ".join(cmd))
                if p.returncode:
                    failures.append(rel)
                    print((p.stdout + p.stderr).rstrip())
    print(f"compile_csrc: {len(files) - len(failures)}/{len(files)} compiled in {time.time() - t0:.1f} s "
          f"({nvcc}; {' '.join(build_config.GENCODE)})")
    if failures:
        print("compile_csrc: failed: " + ", ".join(map(str, failures)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

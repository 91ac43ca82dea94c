"""Build flags of the ``sparselora._C`` extension, shared by ``setup.py`` and the CI compile check.

``extension_kwargs()`` returns the keyword arguments for ``torch.utils.cpp_extension.CUDAExtension``.
``tools/compile_csrc.py`` uses the same include directories, defines and ``GENCODE`` so the
compile-only check in CI compiles what the GPU build compiles.

cuSPARSELt is looked up, first match wins:

1. ``CUSPARSELT_ROOT`` (``include/cusparseLt.h`` and ``lib/`` or ``lib64/`` with ``libcusparseLt.so*``),
   or ``CUSPARSELT_INCLUDE_DIR`` + ``CUSPARSELT_LIB_DIR``;
2. the ``nvidia-cusparselt-cu13`` / ``-cu12`` wheel (``nvidia/cu13``, ``nvidia/cusparselt``), preferring the
   one matching torch's CUDA major version: a CUDA build of torch depends on that wheel and loads its
   ``libcusparseLt.so.0``, so the extension links the very library torch already has in the process;
3. the CUDA toolkit (``$CUDA_HOME``) and the system library directories.

The extension is linked with ``-l:libcusparseLt.so.0`` (the wheels ship no unversioned ``.so``) and an
rpath to the library directory, so no ``LD_LIBRARY_PATH`` is needed at run time.
"""
from __future__ import annotations

import glob
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parent
ROOT = CSRC.parent

#: Real GPUs we build for: A100 (sm_80) and H100/H200 (sm_90a, which enables the
#: Hopper-only instructions a later hand-written mma.sp kernel may use), plus compute_90 PTX so
#: newer GPUs can JIT the kernels.
GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + GENCODE


class CusparseLtNotFound(RuntimeError):
    """cuSPARSELt (header or library) is not installed where the build can see it."""


@dataclass(frozen=True)
class CusparseLt:
    include_dir: str
    lib_dir: str
    lib_file: str  # e.g. libcusparseLt.so.0
    source: str  # where it was found, for the build log

    @property
    def link_name(self) -> str:
        return ":" + self.lib_file  # -l:libcusparseLt.so.0


def _lib_in(lib_dir: Path) -> str | None:
    for pattern in ("libcusparseLt.so.0", "libcusparseLt.so", "libcusparseLt.so.*"):
        hits = sorted(glob.glob(str(lib_dir / pattern)))
        if hits:
            return os.path.basename(hits[0])
    return None


def _candidate(include_dir: Path, lib_dirs: list[Path], source: str) -> CusparseLt | None:
    if not (include_dir / "cusparseLt.h").is_file():
        return None
    for lib_dir in lib_dirs:
        lib = _lib_in(lib_dir)
        if lib:
            return CusparseLt(str(include_dir), str(lib_dir), lib, source)
    return None


def _torch_cuda_major() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda.split(".")[0] if torch.version.cuda else None


def _wheel_roots() -> list[tuple[Path, str]]:
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    major = _torch_cuda_major()
    subdirs = ["cu13", "cusparselt", "cu12"]
    if major == "12":
        subdirs = ["cusparselt", "cu12", "cu13"]
    roots = []
    for base in map(Path, nvidia.__path__):
        for sub in subdirs:
            roots.append((base / sub, f"wheel {base / sub}"))
    return roots


def find_cusparselt() -> CusparseLt:
    """Locate cuSPARSELt (see the module docstring) or raise :class:`CusparseLtNotFound`."""
    tried = []
    env_root = os.environ.get("CUSPARSELT_ROOT")
    env_inc, env_lib = os.environ.get("CUSPARSELT_INCLUDE_DIR"), os.environ.get("CUSPARSELT_LIB_DIR")
    candidates: list[tuple[Path, list[Path], str]] = []
    if env_inc and env_lib:
        candidates.append((Path(env_inc), [Path(env_lib)], "CUSPARSELT_INCLUDE_DIR/CUSPARSELT_LIB_DIR"))
    if env_root:
        r = Path(env_root)
        candidates.append((r / "include", [r / "lib", r / "lib64"], "CUSPARSELT_ROOT"))
    for root, source in _wheel_roots():
        candidates.append((root / "include", [root / "lib", root / "lib64"], source))
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append((Path(cuda_home) / "include", [Path(cuda_home) / "lib64", Path(cuda_home) / "lib"], "CUDA toolkit"))
    candidates.append((Path("/usr/include"), [Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib")], "system"))
    for inc, libs, source in candidates:
        found = _candidate(inc, libs, source)
        if found:
            return found
        tried.append(f"{source}: {inc} + {', '.join(map(str, libs))}")
    major = _torch_cuda_major() or "13"
    raise CusparseLtNotFound(
        "sparselora: cuSPARSELt not found (needed for the sparselora._C extension). Install it with\n"
        f"    pip install nvidia-cusparselt-cu{major}\n"
        "(the wheel a CUDA build of torch already depends on), or point CUSPARSELT_ROOT at a directory with\n"
        "include/cusparseLt.h and lib/libcusparseLt.so.0. Or skip the extension with SPARSELORA_BUILD_CUDA=0.\n"
        "Looked in:\n    " + "\n    ".join(tried)
    )


def include_dirs(cslt: CusparseLt | None = None) -> list[str]:
    cslt = cslt or find_cusparselt()
    return [str(CSRC), cslt.include_dir]


def extension_kwargs() -> dict:
    """Keyword arguments for ``CUDAExtension("sparselora._C", sources, **extension_kwargs())``."""
    cslt = find_cusparselt()
    print(f"sparselora: cuSPARSELt from {cslt.source}: {cslt.include_dir}, {cslt.lib_dir}/{cslt.lib_file}")
    return {
        "include_dirs": include_dirs(cslt),
        "library_dirs": [cslt.lib_dir],
        "libraries": [cslt.link_name],
        "extra_compile_args": {"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
        "extra_link_args": [f"-Wl,-rpath,{cslt.lib_dir}"],
    }


def python_include() -> str:
    return sysconfig.get_paths()["include"]


if __name__ == "__main__":
    import json

    print(json.dumps(extension_kwargs(), indent=1))

"""Build sparselora.

The Python package always installs. The C++/CUDA extension in ``csrc/`` (cuSPARSELt-backed
ops) is built only when torch is a CUDA build and nvcc is found; ``SPARSELORA_BUILD_CUDA=1``
forces it (failing loudly), ``=0`` skips it. To build it, install with
``pip install --no-build-isolation -e .`` so the build sees the installed CUDA torch.

The kernels in ``triton_kernels/`` install as ``sparselora.triton_kernels``: the public
``triton_kernels`` distribution keeps its name, and both import side by side.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

PACKAGES = [p for p in find_packages(include=["sparselora", "sparselora.*"])] + ["sparselora.triton_kernels"]
PACKAGE_DIR = {"sparselora.triton_kernels": "triton_kernels"}


def _want_cuda():
    flag = os.environ.get("SPARSELORA_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return False, "SPARSELORA_BUILD_CUDA=0"
    try:
        import torch
    except ImportError:
        why = "torch is not importable at build time (use --no-build-isolation)"
        if flag in ("1", "true", "yes"):
            sys.exit(f"SPARSELORA_BUILD_CUDA=1 but {why}")
        return False, why
    nvcc = shutil.which("nvcc") or (os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or not os.path.exists(nvcc):
        why = f"torch.version.cuda={torch.version.cuda}, nvcc={nvcc}"
        if flag in ("1", "true", "yes"):
            sys.exit(f"SPARSELORA_BUILD_CUDA=1 but no CUDA toolchain: {why}")
        return False, why
    return True, "CUDA torch and nvcc found"


def _cuda_extensions():
    want, why = _want_cuda()
    print(f"sparselora: CUDA extension {'enabled' if want else 'skipped'} ({why})")
    if not want:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
    import build_config  # csrc/build_config.py: include/link flags (cuSPARSELt)

    try:
        kwargs = build_config.extension_kwargs()
    except build_config.CusparseLtNotFound as e:
        if os.environ.get("SPARSELORA_BUILD_CUDA", "auto").lower() in ("1", "true", "yes"):
            sys.exit(str(e))
        print(f"sparselora: CUDA extension skipped: {e}")
        return [], {}
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    ext = CUDAExtension("sparselora._C", sources, **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"sparselora.backends": ["tables/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

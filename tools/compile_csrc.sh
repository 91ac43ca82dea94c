#!/usr/bin/env bash
# CI entry point of the compile-only check of csrc/ (see tools/compile_csrc.py): every
# csrc/**/*.cpp and *.cu with nvcc, sm_80 + sm_90a, against the installed torch's headers, the
# cuda_cmake_macros.h shim and the nvidia-cusparselt wheel's header. Exits nonzero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tools/compile_csrc.py "$@"

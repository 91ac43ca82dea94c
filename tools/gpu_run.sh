#!/usr/bin/env bash
# GPU runs that fit a device lease (<= 9 minutes each, a few files back in $OUT): see tools/gpu_run.py.
#
#   bash tools/gpu_run.sh quick             # first contact: build, smoke, decode, prefill, SparseLoRA, GPU tests
#   bash tools/gpu_run.sh quick --dry-run   # the plan: stages, time budgets, output files
#   bash tools/gpu_run.sh list              # the other commands (gemm, lora_full, e2e, tune, tune_mma, tests, sanitize)
#
# PY (default python3) is the interpreter; results go to $OUT (summary.md, results.tgz, build.log).
set -uo pipefail
cd "$(dirname "$0")/.."
export PY=${PY:-${PYTHON:-python3}}
exec "$PY" tools/gpu_run.py "$@"

#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA extension, report the environment, run the GPU
# tests, run the GEMM benchmarks, and collect every result file.
#
#   tools/gpu_run.sh            # all stages
#   tools/gpu_run.sh build test # only some stages: build env test sanitize bench tune
#                               # (bench = bench_gemm bench_lora bench_e2e; tune = tune_hybrid tune_gemv)
#
# Needs: a CUDA build of torch, nvcc, nvidia-cusparselt-cu13 (or cu12), triton, pytest. No network.
# Results go to benchmarks/results/ (and are copied to $OUT when it is set). Each stage's log is
# benchmarks/results/gpu_run_<stage>.log; the script exits nonzero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build env test sanitize bench tune)
FAILED=()

want() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

# run STAGE CMD...: tee the output to the stage log, record a failure without stopping
run() {
  local stage=$1; shift
  echo "=== [$stage] $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$RESULTS/gpu_run_$stage.log"
  local rc=${PIPESTATUS[0]}
  echo "=== [$stage] exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || FAILED+=("$stage")
  return "$rc"
}

build() {
  # In-place editable build; --no-deps/--no-build-isolation: use the installed CUDA torch, offline.
  SPARSELORA_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -v --no-deps --no-build-isolation -e . || return 1
  # Some setuptools versions build editable extensions out of tree: make sure it imports, else build in place.
  $PY -c "import sparselora._C" 2>/dev/null || SPARSELORA_BUILD_CUDA=1 $PY setup.py build_ext --inplace || return 1
  $PY -c "import sparselora._C, torch; print('sparselora._C:', sparselora._C.__file__); print('cuSPARSELt', torch.ops.sparselora.cslt_version(0), 'header', torch.ops.sparselora.cslt_header_version())"
}

want build && run build build
want env && run env $PY -m sparselora.env
# every GPU-marked test of the project, plus the CPU tests of the cuSPARSELt backend and policy
gpu_tests() {
  local rc=0
  $PY -m pytest -q -rs -m gpu tests/ --junitxml="$RESULTS/gpu_tests.xml" || rc=1
  $PY -m pytest -q -rs tests/test_cusparselt_backend.py || rc=1
  return $rc
}
want test && run test gpu_tests
# compute-sanitizer over a small subset (it is slow): out-of-bounds accesses, races in our launches
if want sanitize; then
  if command -v compute-sanitizer >/dev/null; then
    run sanitize compute-sanitizer --tool memcheck --error-exitcode 1 \
      $PY -m pytest -q -x tests/test_cusparselt.py -k "leading_dims or non_contiguous or interleaved or (matches and 48-80)"
    run sanitize_triton compute-sanitizer --tool memcheck --error-exitcode 1 \
      $PY -m pytest -q -x -m gpu tests/test_triton_gemm.py tests/test_triton_gemv.py tests/test_sparse_lora.py
  else
    echo "=== [sanitize] compute-sanitizer not found: skipped"
  fi
fi
# "bench" and "tune" run all of their parts; each part is also a stage of its own, so that a
# lease with a per-command time limit can run them one per call
(want bench || want bench_gemm) && run bench_gemm $PY benchmarks/bench_gemm.py
(want bench || want bench_lora) && run bench_lora $PY benchmarks/bench_sparse_lora.py
(want bench || want bench_e2e) && run bench_e2e $PY benchmarks/bench_e2e.py
(want tune || want tune_hybrid) && run tune_hybrid $PY benchmarks/tune_hybrid.py
(want tune || want tune_gemv) && run tune_gemv $PY benchmarks/tune_gemv.py

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results" "$OUT/tables"
  cp -r "$RESULTS"/. "$OUT/results/"
  cp sparselora/backends/tables/*.json "$OUT/tables/" 2>/dev/null || true
  echo "=== copied results to $OUT"
fi
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "=== FAILED stages: ${FAILED[*]}"
  exit 1
fi
echo "=== all stages passed: ${STAGES[*]}"

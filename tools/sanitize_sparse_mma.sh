#!/usr/bin/env bash
# compute-sanitizer over the mma.sp kernels (GPU machine): memcheck (out-of-bounds, misaligned
# accesses) and racecheck (shared-memory hazards of the cp.async ring and the split-K reduction),
# one small call per tile config (tests/test_mma_sp_backend.py::test_smoke_every_config).
# Usage: bash tools/sanitize_sparse_mma.sh   (needs the built extension; exits nonzero on any report)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; exit 2; }
rc=0
for tool in memcheck racecheck; do
  echo "=== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 1 \
    "$PY" -m pytest -q -x -p no:cacheprovider tests/test_mma_sp_backend.py -k smoke_every_config || rc=1
done
exit $rc

"""Every shipped Triton configuration compiles for sm_80 and sm_90 and fits shared memory.

The compile runs in a subprocess without TRITON_INTERPRET (the suite sets it for CPU runs, and
interpreted kernels cannot be compiled for a GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _aot(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "sparselora.triton_kernels.aot", "--json", *args],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.stdout.strip(), f"AOT check printed nothing:\n{out.stderr[-3000:]}"
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shipped():
    return _aot()


def test_every_shipped_config_compiles_for_sm80_and_sm90(shipped):
    rc, rows = shipped
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['name']} sm_{r['arch']}: {r['error']}" for r in failed)
    assert rc == 0
    assert {r["arch"] for r in rows} == {80, 90}


def test_there_are_shipped_configs(shipped):
    # the kernel modules must expose their configs; an empty list would make the check vacuous
    _, rows = shipped
    assert len(rows) > 0


# The one shipped build that spills: SparseLoRA's forward with a separate (dropout) adapter input
# at rank block 64 on sm_80 spills 4 bytes (training only, rank 64, A100). Any other spill is a
# regression: a config that spills pays local-memory traffic on every K iteration.
ALLOWED_SPILLS = {("sparse_lora_fwd_large_r64_sep_fp16", 80), ("sparse_lora_fwd_large_r64_sep_bf16", 80)}


def test_no_shipped_config_spills_registers(shipped):
    _, rows = shipped
    assert all(r["regs"] is not None for r in rows), "cuobjdump (shipped with Triton) gave no resource usage"
    spills = {(r["name"], r["arch"]): (r["regs"], r["stack"], r["local"]) for r in rows if r["stack"] or r["local"]}
    unexpected = {k: v for k, v in spills.items() if k not in ALLOWED_SPILLS}
    assert not unexpected, f"configs that spill (regs, stack B, local B): {unexpected}"
    # the sm_80 replacements of the GEMM tables are what ship there
    archs = {r["name"]: set() for r in rows}
    for r in rows:
        archs[r["name"]].add(r["arch"])
    assert archs["linear_direct_bf16_m128n256k64w8s3"] == {90} and archs["linear_direct_bf16_m128n256k32w8s3"] == {80}


def test_gemv_and_gemm_weight_loads_are_16_bytes_wide(shipped):
    # the weight stream is the whole cost at decode: it must move in 16-byte transactions
    # (cp.async ... 16 into shared memory for the GEMM tiles, ld.global.v4 for the GEMV)
    _, rows = shipped
    for r in rows:
        if r["name"].startswith("gemv_"):
            assert r["wide_loads"] >= 1, r
        if r["name"].startswith(("linear_", "matmul_t_")):
            assert r["cp_async16"] >= 1, r


def test_the_check_catches_configs_that_would_not_build():
    # proves the CI gate can fail: an invalid config, and one over the shared-memory limit
    rc, rows = _aot("--module", "aot_broken")
    assert rc == 1
    by_name = {r["name"]: r for r in rows}
    assert not by_name["bad-arange"]["ok"] and by_name["bad-arange"]["error"]
    assert not by_name["huge-tile"]["ok"] and "shared memory" in by_name["huge-tile"]["error"]

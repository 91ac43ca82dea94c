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


def test_the_check_catches_configs_that_would_not_build():
    # proves the CI gate can fail: an invalid config, and one over the shared-memory limit
    rc, rows = _aot("--module", "aot_broken")
    assert rc == 1
    by_name = {r["name"]: r for r in rows}
    assert not by_name["bad-arange"]["ok"] and by_name["bad-arange"]["error"]
    assert not by_name["huge-tile"]["ok"] and "shared memory" in by_name["huge-tile"]["error"]

"""The static gates of the mma.sp kernels (tools/sparse_mma_static.py) pass the shipped kernel and
fail a deliberately bad build. CI runs the full gate over every config and arch directly
(.ci/run); here one config, sm_80 and sm_90a, to keep the test at one nvcc run per case."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "sparse_mma_static.py"


def _nvcc():
    for c in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda-13.0/bin/nvcc"):
        if c and os.path.isfile(c):
            return c
    return None


pytestmark = pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (CI has it at /usr/local/cuda-13.0/bin)")


def _run(src_root, *archs, config="0"):
    env = dict(os.environ, NVCC=_nvcc())
    return subprocess.run([sys.executable, str(TOOL), "--src", str(src_root), "--configs", config, "--archs", *archs],
                          capture_output=True, text=True, env=env, timeout=600)


def test_shipped_kernel_passes_the_gates():
    p = _run(ROOT, "sm_80", "sm_90a")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(" ok") == 2 and "B/clk/SM" in p.stdout


def test_narrow_weight_loads_fail_the_gates(tmp_path):
    # the same kernel with each 16-byte cp.async split into four 4-byte ones (a "scalar loads" build)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    hdr = tmp_path / "csrc" / "sparse_mma" / "mma_sp.h"
    text = hdr.read_text()
    old = 'asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\\n" ::"r"(smem), "l"(gmem), "r"(src_bytes));'
    assert old in text
    new = "".join(
        f'asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\\n" ::"r"(smem + {4 * i}), '
        f'"l"(static_cast<const char*>(gmem) + {4 * i}), "r"(src_bytes / 4));' for i in range(4))
    hdr.write_text(text.replace(old, new))
    p = _run(tmp_path, "sm_80")
    assert p.returncode == 1, p.stdout
    assert "not all 16 bytes wide" in p.stderr, p.stderr


def _tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("sparse_mma_static", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sparse_mma_static"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_each_gate_can_fail():
    # the gate function on loop statistics: spills, missing HMMA.SP, a narrow load, a slow loop
    t = _tool()
    from sparselora.mma_sp_configs import CONFIGS
    cfg = CONFIGS[0]
    good = t.loop_stats(["LDGSTS.E.BYPASS.128 [R1], [R2.64]"] + ["HMMA.SP.16832.F32.BF16 R1, R2, R3, R4, R5, 0x0"] * 8)
    res = {"stack": 0, "spill_st": 0, "spill_ld": 0}
    rl = t.roofline(good, 4608, "sm_80")
    assert t.gate(cfg, "sm_80", res, good, rl, 18.4) == []
    assert t.gate(cfg, "sm_80", dict(res, spill_st=8), good, rl, 18.4)
    assert t.gate(cfg, "sm_80", res, good, rl, 1e6)
    narrow = t.loop_stats(["LDG.E [R1], [R2.64]"] + ["HMMA.SP.16832.F32.BF16 R1"] * 8)
    assert t.gate(cfg, "sm_80", res, narrow, rl, 18.4)
    dense = t.loop_stats(["LDGSTS.E.BYPASS.128 [R1], [R2.64]"] + ["HMMA.16816.F32.BF16 R1"] * 8)
    assert t.gate(cfg, "sm_80", res, dense, rl, 18.4)
    # the loop finder takes the backward branch whose body holds the HMMAs
    code = [(0, "MOV R1, R2"), (16, "HMMA.SP.16832.F32.BF16 R1"), (32, "BRA 0x10"), (48, "@P0 BRA 0x0"), (64, "EXIT")]
    assert t.main_loop(code) == ["HMMA.SP.16832.F32.BF16 R1", "BRA 0x10"]


def test_shipped_prefill_kernel_passes_the_gates():
    # the sm_90 prefill tile: no spills, 16-byte loads, 4 x 8 x 4 HMMA.SP per stage on both archs; the
    # tensor pipe >= 60% of the busiest pipe gated on sm_90a (sm_80 gets config 101)
    p = _run(ROOT, "sm_80", "sm_90a", config="100")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(" ok") == 2 and "of the sparse" not in p.stdout and "tensor pipe" in p.stdout


def test_prefill_gates_can_fail():
    t = _tool()
    from sparselora import mma_sp_configs as C
    cfg = C.config_by_id(100)
    res = {"stack": 0, "spill_st": 0, "spill_ld": 0}
    n = t.expected_hmma_sp(cfg)
    assert n == cfg.wmt * cfg.wnt * 4 == 128
    hmma = ["HMMA.SP.16832.F32.BF16 R1, R2, R3, R4, R5, 0x0"] * n
    good = t.loop_stats(["LDGSTS.E.BYPASS.128 [R1], [R2.64]"] * 20 + ["LDSM.16.M88.4 R1, [R2]"] * 32 + hmma)
    rl = t.roofline(good, 1, "sm_90a")
    assert t.gate(cfg, "sm_90a", res, good, rl, 18.4) == [] and t.tensor_fraction(rl) == 1.0
    # a loop drowned in shared-memory traffic (fragments re-read per mma) is under 60% of the tensor peak
    slow = t.loop_stats(["LDGSTS.E.BYPASS.128 [R1], [R2.64]"] * 20 + ["LDSM.16.M88.4 R1, [R2]"] * 128 + hmma)
    fails = t.gate(cfg, "sm_90a", res, slow, t.roofline(slow, 1, "sm_90a"), 18.4)
    assert any("of the sparse tensor peak" in f for f in fails), fails
    # one k-tile's HMMAs missing (e.g. a stage of 3 k-tiles)
    short = t.loop_stats(["LDGSTS.E.BYPASS.128 [R1], [R2.64]"] + hmma[: n - 32])
    assert any("expected 128" in f for f in t.gate(cfg, "sm_90a", res, short, t.roofline(short, 1, "sm_90a"), 18.4))
    # never-executed filler loads cost an issue slot, not shared-memory bandwidth
    assert t.loop_stats(["@!PT LDS RZ, [RZ]"] * 10).mem_clocks == 0
    # the roofline gate applies where the table picks the config
    assert t.prefill_picked(C, cfg, "sm_90a") and not t.prefill_picked(C, cfg, "sm_80")

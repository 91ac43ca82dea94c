"""The mma.sp kernel's own source, run on the CPU: tests/data/sparse_mma_host_sim.cpp compiles
csrc/sparse_mma/linear_kernel.cuh, the launcher (launch.cu), the generated dispatch and every
generated instantiation with the host compiler, one thread per CUDA thread, cp.async/ldmatrix/
mma.sp/__syncwarp implemented from the PTX ISA (see that file). Outputs are compared with the
float64 oracle: a bug in the kernel's index math, pipeline waits, split-K reduction, guards or
epilogue fails here without a GPU. Split-K across CTAs runs its CTAs in grid order and in shuffled
orders on one workspace: every order must give the same bits and leave the arrival counters at 0.
Deliberately broken kernels (a wrong wait depth, a swapped selector, a dropped split-K partial,
an arrival-order sum, a counter left set) are shown to fail."""
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_linear, random_24
from sparselora.format import nm_mask, pack_24
from sparselora.gpu_layout import to_gpu_layout
from sparselora.mma_sp_configs import (CONFIGS, PREFILL_CONFIGS, PREFILL_MIN_M, SMEM_PER_SM, arch_class, choose_config,
                                       choose_splits)

ROOT = Path(__file__).resolve().parent.parent
CXX = os.environ.get("CXX") or shutil.which("g++")


def _cuda_home():
    for c in (os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", "/usr/local/cuda"):
        if c and (Path(c) / "include" / "cuda_bf16.h").is_file() and list((Path(c)).glob("lib*/libcudart.so*")):
            return Path(c)
    return None


pytestmark = pytest.mark.skipif(CXX is None or _cuda_home() is None, reason="needs g++ and the CUDA headers/cudart")


def build(tmp: Path, csrc: Path = ROOT / "csrc", opt: str = "-O1") -> Path:
    inst = sorted((csrc / "sparse_mma" / "instantiations").glob("*.cu"))
    (tmp / "sim_instances.inc").write_text("".join(f'#include "sparse_mma/instantiations/{p.name}"\n' for p in inst))
    cuda = _cuda_home()
    libdir = next(p for p in (cuda / "lib64", cuda / "lib") if p.is_dir())
    exe = tmp / "sim"
    cmd = [CXX, "-std=c++20", opt, "-pthread", "-w", "-DSPARSELORA_SPARSE_MMA_HOST_SIM", f"-I{csrc}", f"-I{tmp}",
           f"-I{cuda / 'include'}", str(ROOT / "tests" / "data" / "sparse_mma_host_sim.cpp"), "-o", str(exe),
           f"-L{libdir}", "-lcudart", f"-Wl,-rpath,{libdir}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return exe


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return build(tmp_path_factory.mktemp("sim"))


def run_sim(exe: Path, tmp: Path, x, g, bias, config: int, sm=(9, 0), splits=-1, sm_count=132, runs=1):
    """Run the simulated launch: `splits` -1 lets the launcher choose for a device of `sm_count` SMs
    of arch `sm`; `runs` > 1 repeats it on the same workspace in shuffled CTA orders (the sim fails
    unless every run gives the first run's bits and leaves every split-K counter at 0)."""
    m, k = x.shape
    n = g.shape[0]
    mt, kt, kq = g.values.shape[0], g.values.shape[1], g.meta.shape[1]
    smem_per_sm = SMEM_PER_SM[arch_class(*sm)]
    hdr = struct.pack("<16q", m, n, k, mt, kt, kq, bias is not None, x.dtype == torch.bfloat16, config, k, *sm,
                      splits, sm_count, smem_per_sm, runs)
    blobs = [hdr, x.contiguous().view(torch.int16).numpy().tobytes(), g.values.view(torch.int16).numpy().tobytes(),
             g.meta.numpy().tobytes()]
    if bias is not None:
        blobs.append(bias.view(torch.int16).numpy().tobytes())
    (tmp / "in.bin").write_bytes(b"".join(blobs))
    p = subprocess.run([str(exe), str(tmp / "in.bin"), str(tmp / "out.bin")], capture_output=True, text=True, timeout=300)
    if p.returncode:
        return None, p.stdout + p.stderr
    y = torch.from_numpy(np.fromfile(tmp / "out.bin", dtype=np.int16).copy()).view(x.dtype).reshape(m, n)
    return y, p.stdout


# (N, K, M): odd N (row-tile guards), K with a partial last stage and K % 64 != 0 (padded k-tiles),
# M across token tiles (grid.y > 1) and below one tile
CASES = [(40, 136, 1), (33, 520, 13), (72, 264, 17), (48, 768, 8), (24, 264, 37)]


@pytest.mark.parametrize("config", [c.id for c in CONFIGS])
def test_kernel_source_matches_float64(sim, tmp_path, seed, config):
    for i, (n, k, m) in enumerate(CASES):
        dtype = (torch.float16, torch.bfloat16)[(i + config) % 2]
        w, _, b = random_24(n, k, dtype, bias=i % 2 == 0)
        x = torch.randn(m, k, dtype=torch.float64).to(dtype)
        y, log = run_sim(sim, tmp_path, x, to_gpu_layout(pack_24(w)), b, config)
        assert y is not None, log
        assert f"OK config {config}" in log
        assert_linear(y, x, w, b, what=f"config {config}, {n}x{k}, M={m}, {dtype}")


# prefill (N, K, M): N % 8 != 0 (the epilogue's element-wise tail) and == 0 (16-byte stores), a
# second row CTA holding a single row tile, K with a 2-k-tile last stage and padded columns, more
# stages than the ring (wrap-around), M below one token tile, exactly one, and over two CTAs
PREFILL_CASES = [(136, 520, 70), (64, 776, 64), (24, 200, 130)]


@pytest.mark.parametrize("config", [c.id for c in PREFILL_CONFIGS])
def test_prefill_kernel_source_matches_float64(sim, tmp_path, seed, config):
    for i, (n, k, m) in enumerate(PREFILL_CASES):
        dtype = (torch.float16, torch.bfloat16)[(i + config) % 2]
        w, _, b = random_24(n, k, dtype, bias=i != 1)
        x = torch.randn(m, k, dtype=torch.float64).to(dtype)
        y, log = run_sim(sim, tmp_path, x, to_gpu_layout(pack_24(w)), b, config)
        assert y is not None, log
        assert f"OK config {config}" in log
        assert_linear(y, x, w, b, what=f"prefill config {config}, {n}x{k}, M={m}, {dtype}")


# Masked-dense non-finite semantics (ops.py, docs/EXTENDING.md): mma.sp never multiplies x at a
# pruned column (nor does the host sim), so a NaN/Inf there reaches the outputs only through the
# kernels' fold (mma_sp.h nonfinite_halves / nan_flagged_tokens).
def _nonfinite_case(n, k, m, dtype):
    w, mask, b = random_24(n, k, dtype)
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    pruned0 = (mask[0] == 0).nonzero().flatten()
    pruned1 = (mask[n - 1] == 0).nonzero().flatten()
    flagged = {m // 2: (int(pruned0[-1]), float("nan")), m - 1: (int(pruned1[0]), float("-inf"))}
    for tok, (col, v) in flagged.items():  # a pruned column: the last one of row 0, the first of row n-1
        x[tok, col] = v
    return w, b, x, sorted(flagged)


def check_nonfinite(y, x, w, b, flagged, what):
    assert y is not None
    for tok in flagged:
        assert not torch.isfinite(y[tok]).any(), f"{what}: token {tok} has a non-finite input but finite outputs"
    keep = [t for t in range(x.shape[0]) if t not in flagged]
    assert_linear(y[keep], x[keep], w, b, what=what)


NONFINITE_CASES = [(33, 520, 13, torch.bfloat16, [c.id for c in CONFIGS]),
                   (136, 520, 70, torch.float16, [c.id for c in PREFILL_CONFIGS])]


@pytest.mark.parametrize("case", range(len(NONFINITE_CASES)))
def test_nonfinite_input_at_pruned_column(sim, tmp_path, seed, case):
    n, k, m, dtype, configs = NONFINITE_CASES[case]
    for config in configs:
        for dt in (dtype, torch.float16 if dtype == torch.bfloat16 else torch.bfloat16):
            w, b, x, flagged = _nonfinite_case(n, k, m, dt)
            y, log = run_sim(sim, tmp_path, x, to_gpu_layout(pack_24(w)), b, config)
            assert y is not None and f"OK config {config}" in log, log
            check_nonfinite(y, x, w, b, flagged, f"config {config}, {n}x{k}, M={m}, {dt}")


def test_without_the_fold_pruned_nonfinite_is_lost(tmp_path):
    exe = _broken_build(tmp_path, "if ((i & 1 ? f1 : f0) & (0x80008000u >> nt)) acc[mt][nt][i] = nan_f32();", "(void)f0, (void)f1;",
                        where="mma_sp.h")
    for n, k, m, dtype, configs in NONFINITE_CASES:
        w, b, x, flagged = _nonfinite_case(n, k, m, dtype)
        y, log = run_sim(exe, tmp_path, x, to_gpu_layout(pack_24(w)), b, configs[0])
        assert y is not None, log
        with pytest.raises(AssertionError, match="non-finite input but finite outputs"):
            check_nonfinite(y, x, w, b, flagged, "fold removed")


# split-K across CTAs (split_k.h), forced: (N, K, M, splits) with uneven contiguous ranges (5 and 9
# k-blocks in 3 and 4 splits, one split of a single k-block: a warp of WK = 2 idle), every k-block
# its own split, several token blocks (grid.y > 1 for the 8- and 16-token configs)
SPLIT_CASES = [(72, 1032, 9, 3), (40, 2056, 17, 4), (24, 1032, 5, 5)]


def _cancelling_case(dtype=torch.float16):
    """5 k-blocks (5 splits of one each) where k-blocks 0 and 1 hold the same large products with
    opposite signs: their partials cancel exactly when summed in split order, while any other
    order loses the small ones to rounding (plain fp32 sum-order effects hide under the cast)."""
    n, k, m = 72, 1280, 9
    w, _, b = random_24(n, k, dtype)
    w[:, 256:512] = w[:, :256] = w[:, :256] * 4096
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    x[:, :256] *= 4096
    x[:, 256:512] = -x[:, :256]
    return w, b, x


@pytest.mark.parametrize("config", [c.id for c in CONFIGS])
def test_split_k_matches_float64_in_any_cta_order(sim, tmp_path, seed, config):
    w, b, x = _cancelling_case()
    y, log = run_sim(sim, tmp_path, x, to_gpu_layout(pack_24(w)), b, config, splits=5, runs=3)
    assert y is not None and f"OK config {config} splits 5" in log, log
    assert_linear(y, x, w, b, what=f"config {config}, 5 splits, cancelling partials")
    for i, (n, k, m, splits) in enumerate(SPLIT_CASES):
        dtype = (torch.float16, torch.bfloat16)[(i + config) % 2]
        w, _, b = random_24(n, k, dtype, bias=i != 1)
        x = torch.randn(m, k, dtype=torch.float64).to(dtype)
        # 3 runs on one workspace: grid order, then two shuffles (any split may arrive last); the sim
        # fails on other bits than the first run's or a counter left nonzero
        y, log = run_sim(sim, tmp_path, x, to_gpu_layout(pack_24(w)), b, config, splits=splits, runs=3)
        assert y is not None, log
        assert f"OK config {config} splits {splits}" in log, log
        assert_linear(y, x, w, b, what=f"config {config}, {splits} splits, {n}x{k}, M={m}, {dtype}")


def test_split_k_keeps_the_nonfinite_fold(sim, tmp_path, seed):
    # the flagged pruned columns are the last (last split) and the first (first split) of K
    n, k, m = 33, 1032, 13
    for config, dtype in ((2, torch.bfloat16), (4, torch.float16)):
        w, b, x, flagged = _nonfinite_case(n, k, m, dtype)
        y, log = run_sim(sim, tmp_path, x, to_gpu_layout(pack_24(w)), b, config, splits=3, runs=2)
        assert y is not None and f"OK config {config} splits 3" in log, log
        check_nonfinite(y, x, w, b, flagged, f"config {config}, 3 splits, {dtype}")


def test_auto_splits_follow_the_python_mirror(sim, tmp_path):
    # the launcher's choice (split_k.h, occupancy from shared memory in the sim) equals
    # sparselora.mma_sp_configs.choose_splits; small simulated devices make these shapes split
    chosen = set()
    for sm, arch in (((9, 0), "sm90"), ((8, 0), "sm80"), ((8, 6), "sm86")):
        for n, k, m, sms in ((64, 2056, 1, 4), (256, 1032, 12, 2), (48, 4104, 20, 1), (40, 520, 3, 132)):
            cfg = choose_config(m, n, arch)
            want = choose_splits(cfg, m, n, k, sms, arch)
            chosen.add(want)
            w, _, b = random_24(n, k, torch.float16)
            x = torch.randn(m, k, dtype=torch.float64).half()
            y, log = run_sim(sim, tmp_path, x, to_gpu_layout(pack_24(w)), b, -1, sm, sm_count=sms)
            assert y is not None and f"OK config {cfg.id} splits {want}" in log, (sm, n, k, m, sms, log)
            assert_linear(y, x, w, b, what=f"auto splits on sm_{sm[0]}{sm[1]} x {sms} SMs, {n}x{k}, M={m}")
    assert 1 in chosen and max(chosen) > 2, chosen  # both paths were taken


def test_auto_config_and_launcher_checks(sim, tmp_path):
    w, _, b = random_24(64, 256, torch.bfloat16)
    g = to_gpu_layout(pack_24(w))
    x = torch.randn(3, 256).bfloat16()
    for m, n_wide in ((3, False), (12, False)):
        x = torch.randn(m, 256).bfloat16()
        y, log = run_sim(sim, tmp_path, x, g, b, -1)
        want = choose_config(m, 64, "sm90").id  # the simulated device is sm_90
        assert y is not None and f"OK config {want}" in log, log
        assert_linear(y, x, w, b)
    # the generated C++ table (dispatch.inc) picks what sparselora.mma_sp_configs picks, per arch class
    for sm, arch in (((8, 0), "sm80"), ((8, 6), "sm86"), ((8, 9), "sm86"), ((9, 0), "sm90")):
        for n in (64, 2048):
            wn, _, _ = random_24(n, 64, torch.float16, bias=False)
            gn = to_gpu_layout(pack_24(wn))
            for m in ((1, 17) if sm != (9, 0) else (1, 9, 17)):
                xn = torch.randn(m, 64).half()
                y, log = run_sim(sim, tmp_path, xn, gn, None, -1, sm)
                want = choose_config(m, n, arch).id
                assert y is not None and f"OK config {want}" in log, (sm, n, m, log)
                assert_linear(y, xn, wn, None, what=f"auto config on sm_{sm[0]}{sm[1]}, {n}x64, M={m}")
    # prefill from the generated C++ table: M >= 64 and a grid of >= 100 CTAs (16 x 7 here; the
    # thresholds of the C++ and the Python table are compared in test_sparse_mma_layout)
    wp, _, bp = random_24(2048, 64, torch.bfloat16)
    x = torch.randn(800, 64).bfloat16()
    y, log = run_sim(sim, tmp_path, x, to_gpu_layout(pack_24(wp)), bp, -1)
    assert choose_config(800, 2048, "sm90").id == 100 and choose_config(PREFILL_MIN_M, 2048, "sm90").id < 100
    assert y is not None and "OK config 100" in log, log
    assert_linear(y, x, wp, bp)
    # the launcher's checks name M, N, K, dtype and config
    w2, _, _ = random_24(32, 60, torch.float16, bias=False)
    y, log = run_sim(sim, tmp_path, torch.randn(5, 60).half(), to_gpu_layout(pack_24(w2)), None, 1)
    assert y is None and "M=5, N=32, K=60, f16, config 1" in log and "multiple of 8" in log, log
    # forced splits the launcher refuses, naming them: more than the k-blocks (1032 columns: 5), a
    # prefill config, zero
    w3, _, _ = random_24(32, 1032, torch.float16, bias=False)
    g3, x3 = to_gpu_layout(pack_24(w3)), torch.randn(4, 1032).half()
    for config, splits, why in ((2, 6, "more splits than 256-column k-blocks"), (100, 2, "prefill configs do not split K"),
                                (2, 0, "splits must be -1 (choose) or >= 1")):
        y, log = run_sim(sim, tmp_path, x3, g3, None, config, splits=splits)
        assert y is None and f"config {config}, splits {splits}): {why}" in log, log


def _broken_build(tmp_path, old, new, where="linear_kernel.cuh"):
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    f = tmp_path / "csrc" / "sparse_mma" / where
    text = f.read_text()
    assert old in text, old
    f.write_text(text.replace(old, new))
    return build(tmp_path, tmp_path / "csrc", opt="-O0")  # -O0: ~4 s less to build, a few small runs


@pytest.mark.parametrize("old,new,why", [
    ("cp_async_wait<S - 2>();", "cp_async_wait<S - 1>();", "reads a stage before its copies landed"),
    ("if (s == 0) mma_sp_m16n8k32<T, 0>", "if (s == 1) mma_sp_m16n8k32<T, 0>", "selector swapped"),
    ("for (int w = 0; w < WK; ++w) {  // fixed order", "for (int w = 0; w < 1; ++w) {  // fixed order", "split-K partial dropped"),
])
def test_broken_kernel_fails(tmp_path, old, new, why):
    exe = _broken_build(tmp_path, old, new)
    n, k, m = 40, 1032, 9  # 5 stages over 2 warps: the pipeline and the reduction both matter
    w = (torch.randint(-8, 9, (n, k)) * nm_mask(torch.rand(n, k))).half()
    b = torch.randint(1, 9, (n,)).half()
    x = torch.randint(-8, 9, (m, k)).half()
    y, log = run_sim(exe, tmp_path, x, to_gpu_layout(pack_24(w)), b, 1)
    if y is None:
        assert "host sim:" in log, log  # e.g. a selector swap reads metadata the ISA calls undefined
        return
    with pytest.raises(AssertionError):
        assert_linear(y, x, w, b, what=why)


# one broken build (a host-sim build is ~20 s): the metadata half of a stage is this kernel's own
# bookkeeping (its wait depth is the decode kernel's, whose broken build is tested above)
@pytest.mark.parametrize("old,new,why", [
    ("lane)[half];", "lane)[half ^ 1];", "metadata of the wrong half k-block"),
])
def test_broken_prefill_kernel_fails(tmp_path, old, new, why):
    exe = _broken_build(tmp_path, old, new, where="prefill_kernel.cuh")
    n, k, m = 40, 1032, 70  # 9 stages: more than the ring holds, both halves of every k-block
    w = (torch.randint(-8, 9, (n, k)) * nm_mask(torch.rand(n, k))).half()
    b = torch.randint(1, 9, (n,)).half()
    x = torch.randint(-8, 9, (m, k)).half()
    y, log = run_sim(exe, tmp_path, x, to_gpu_layout(pack_24(w)), b, 100)
    if y is None:
        assert "host sim:" in log, log
        return
    with pytest.raises(AssertionError):
        assert_linear(y, x, w, b, what=why)


# split-K across CTAs (one build each, ~15 s): the sum must not depend on which split arrives last,
# and the last CTA must leave its counter at 0 for the next launch (the sim checks both)
@pytest.mark.parametrize("old,new,why", [
    ("for (int s = 0; s < p.splits; ++s) {  // split order", "for (int r = 0, s = split; r < p.splits; ++r, s = (s + 1) % p.splits) {  // split order",
     "CTA order 1 gives other bits"),
    ("  if (threadIdx.x == 0) p.counters[tile] = 0;", "", "after the launch (run 0), not 0"),
])
def test_broken_split_k_fails(tmp_path, old, new, why):
    exe = _broken_build(tmp_path, old, new)
    w, b, x = _cancelling_case()
    g = to_gpu_layout(pack_24(w))
    y, log = run_sim(exe, tmp_path, x, g, b, 2, splits=5, runs=3)
    assert y is None and why in log, log
    y, log = run_sim(exe, tmp_path, x, g, b, 2, splits=5)  # one run, no order check: y itself is wrong
    if y is not None:
        with pytest.raises(AssertionError):
            assert_linear(y, x, w, b, what="broken split-K")

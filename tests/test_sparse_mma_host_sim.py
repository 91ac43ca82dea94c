"""The mma.sp kernel's own source, run on the CPU: tests/data/sparse_mma_host_sim.cpp compiles
csrc/sparse_mma/linear_kernel.cuh, the launcher (launch.cu), the generated dispatch and every
generated instantiation with the host compiler, one thread per CUDA thread, cp.async/ldmatrix/
mma.sp/__syncwarp implemented from the PTX ISA (see that file). Outputs are compared with the
float64 oracle: a bug in the kernel's index math, pipeline waits, split-K reduction, guards or
epilogue fails here without a GPU. Deliberately broken kernels (a wrong wait depth, a swapped
selector, a dropped split-K partial) are shown to fail."""
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
from sparselora.mma_sp_configs import CONFIGS, PREFILL_CONFIGS, PREFILL_MIN_M, choose_config

ROOT = Path(__file__).resolve().parent.parent
CXX = os.environ.get("CXX") or shutil.which("g++")


def _cuda_home():
    for c in (os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", "/usr/local/cuda"):
        if c and (Path(c) / "include" / "cuda_bf16.h").is_file() and list((Path(c)).glob("lib*/libcudart.so*")):
            return Path(c)
    return None


pytestmark = pytest.mark.skipif(CXX is None or _cuda_home() is None, reason="needs g++ and the CUDA headers/cudart")


def build(tmp: Path, csrc: Path = ROOT / "csrc") -> Path:
    inst = sorted((csrc / "sparse_mma" / "instantiations").glob("*.cu"))
    (tmp / "sim_instances.inc").write_text("".join(f'#include "sparse_mma/instantiations/{p.name}"\n' for p in inst))
    cuda = _cuda_home()
    libdir = next(p for p in (cuda / "lib64", cuda / "lib") if p.is_dir())
    exe = tmp / "sim"
    cmd = [CXX, "-std=c++20", "-O1", "-pthread", "-w", "-DSPARSELORA_SPARSE_MMA_HOST_SIM", f"-I{csrc}", f"-I{tmp}",
           f"-I{cuda / 'include'}", str(ROOT / "tests" / "data" / "sparse_mma_host_sim.cpp"), "-o", str(exe),
           f"-L{libdir}", "-lcudart", f"-Wl,-rpath,{libdir}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return exe


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return build(tmp_path_factory.mktemp("sim"))


def run_sim(exe: Path, tmp: Path, x, g, bias, config: int, sm=(9, 0)):
    m, k = x.shape
    n = g.shape[0]
    mt, kt, kq = g.values.shape[0], g.values.shape[1], g.meta.shape[1]
    hdr = struct.pack("<12q", m, n, k, mt, kt, kq, bias is not None, x.dtype == torch.bfloat16, config, k, *sm)
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


def _broken_build(tmp_path, old, new, where="linear_kernel.cuh"):
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    f = tmp_path / "csrc" / "sparse_mma" / where
    text = f.read_text()
    assert old in text, old
    f.write_text(text.replace(old, new))
    return build(tmp_path, tmp_path / "csrc")


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

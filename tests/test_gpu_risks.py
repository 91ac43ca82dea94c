"""GPU-only correctness risks, each pinned by a test that runs (and can fail) without a GPU, plus
the GPU checks themselves (skipped only where no CUDA device is present):

* every Triton launcher runs with its tensors' device current (Triton launches on the current
  device and its current stream, not the tensors' device);
* ``_dab_kernel`` computes row offsets in int64 (M*N >= 2**31 wrapped in int32);
* an autotune key first seen inside a CUDA-graph capture is not autotuned there, and the
  capture-time config is not remembered as the tuned one;
* the cuSPARSELt backend warns about a first-seen M inside a capture (its plan search cannot run
  there), and plan keys stay one per (shape, M) for a bias that has to be copied every call.
"""
import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import assert_close, assert_linear
from sparselora.format import nm_mask, pack_24

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none present)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _packed(n, k, dtype=torch.float16, device=DEV):
    w = torch.randn(n, k, device=device)
    return pack_24((w * nm_mask(w.abs())).to(dtype))


# -- device guard ---------------------------------------------------------------------------------
def _launch_recorder(monkeypatch):
    """Spy on launch_guard.on_device and on every Triton kernel launch: returns the event list."""
    import triton
    from sparselora.triton_kernels import launch_guard

    events, depth = [], [0]
    real_on_device = launch_guard.on_device

    @contextlib.contextmanager
    def spy(t):
        events.append(("enter", t.device))
        depth[0] += 1
        with real_on_device(t):
            yield
        depth[0] -= 1
        events.append(("exit", t.device))

    monkeypatch.setattr(launch_guard, "on_device", spy)
    kernel_cls = triton.runtime.interpreter.InterpretedFunction if os.environ.get("TRITON_INTERPRET") == "1" \
        else triton.runtime.jit.JITFunction
    real_run = kernel_cls.run

    def run(self, *args, **kwargs):
        events.append(("launch", depth[0] > 0))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_cls, "run", run)
    return events


def test_every_triton_launcher_enters_the_tensors_device(monkeypatch, seed):
    from sparselora.triton_kernels import pack24, sparse24_gemm, sparse24_gemv, sparse_lora

    events = _launch_recorder(monkeypatch)
    dt = torch.float16
    p = _packed(32, 64, dt)
    x = torch.randn(3, 64, device=DEV, dtype=dt)
    a, b = torch.randn(4, 64, device=DEV, dtype=dt), torch.randn(32, 4, device=DEV, dtype=dt)
    dy = torch.randn(3, 32, device=DEV, dtype=dt)
    calls = {
        "linear direct": lambda: sparse24_gemm.sparse24_linear_triton(x, p.values, p.meta, split_k=1),
        "linear split": lambda: sparse24_gemm.sparse24_linear_triton(x, p.values, p.meta, split_k=2),
        "matmul_t": lambda: sparse24_gemm.sparse24_matmul_t_triton(dy, p.values, p.meta),
        "gemv": lambda: sparse24_gemv.sparse24_gemv_triton(x, p.values, p.meta),
        "pack": lambda: pack24.pack_24_triton(p.to_dense()),
        "unpack": lambda: pack24.unpack_24_triton(p),
        "lora fwd": lambda: sparse_lora.sparse_lora_fwd(x, None, p.values, p.meta, a, b, 2.0),
        "lora dx": lambda: sparse_lora.sparse_lora_dx(dy, p.values, p.meta, a, b, 2.0),
        "lora dab": lambda: sparse_lora.sparse_lora_dab(dy, x, p.meta, a, b, 2.0),
    }
    for name, call in calls.items():
        events.clear()
        call()
        launches = [e for e in events if e[0] == "launch"]
        assert launches, f"{name}: no kernel launched"
        assert all(inside for _, inside in launches), f"{name}: a kernel launched outside the device guard: {events}"
        assert events[0] == ("enter", x.device), f"{name}: guard entered for {events[0]}"


def test_on_device_makes_the_tensor_device_current(monkeypatch):
    from sparselora.triton_kernels import launch_guard

    entered = []

    class FakeDevice:
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            entered.append(self.d)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)

    class OnCuda1:  # a tensor as seen by the guard: only its device matters
        device = torch.device("cuda", 1)

    with launch_guard.on_device(OnCuda1()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with launch_guard.on_device(torch.zeros(1)):  # CPU (the interpreter): no CUDA device touched
        pass
    assert entered == [torch.device("cuda", 1)]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_launch_on_second_device_while_first_is_current(seed):
    from sparselora.triton_kernels.sparse24_gemm import sparse24_linear_triton

    p = _packed(256, 512, torch.bfloat16, "cuda:1")
    x = torch.randn(8, 512, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0):
        y = sparse24_linear_triton(x, p.values, p.meta)
    assert y.device == x.device
    assert_linear(y, x, p.to_dense())


# -- int64 offsets in the adapter-gradient kernel ---------------------------------------------------
def test_dab_kernel_row_offsets_do_not_wrap_at_2_to_31(seed):
    # dy's rows are 2**31 - 8 elements apart, so row 2 starts at 2**32 - 16: in int32 that wraps
    # to -16, i.e. the 16 elements before dy (set to 7.0 here). The buffer is ~8.6 GB of address
    # space, but only the touched pages get memory (a few; RSS stays small).
    import triton

    from sparselora.triton_kernels import sparse_lora as k

    stride, m, n, kk, r, pre = 2**31 - 8, 3, 16, 64, 4, 64
    buf = torch.empty(pre + 2 * stride + n, dtype=torch.float16, device=DEV)
    buf[:pre] = 7.0
    dy = buf.as_strided((m, n), (stride, 1), pre)
    rows = torch.randn(m, n, device=DEV).half()
    dy.copy_(rows)
    xa = torch.randn(m, kk, device=DEV).half()
    p = _packed(n, kk)
    a, b = torch.randn(r, kk, device=DEV).half(), torch.randn(n, r, device=DEV).half()
    da, db = torch.zeros(r, kk, device=DEV), torch.zeros(n, r, device=DEV)
    bm, bn, bk, warps, stages = k._BWD_CONFIGS["small"]
    k._dab_kernel[(triton.cdiv(kk, bk), triton.cdiv(n, bn))](
        dy, xa, p.meta, a, b, da, db, m, n, kk, r, 1.0,
        dy.stride(0), xa.stride(0), p.meta.stride(0), a.stride(0), b.stride(0),
        BM=bm, BN=bn, BK=bk, BR=16, num_warps=warps, num_stages=stages, **k._flags(torch.float16))
    g = (rows.double().T @ xa.double()) * p.mask().double()
    # fp16 operands, G rounded to fp16 on a GPU (fp32 under the interpreter): the fp16 bound
    assert_close(db, g @ a.double().T, "dB", dtype=torch.float16)
    assert_close(da, b.double().T @ g, "dA", dtype=torch.float16)
    del buf


# -- autotuning and CUDA-graph capture --------------------------------------------------------------
def test_first_seen_m_inside_a_capture_is_not_autotuned_nor_remembered(monkeypatch, seed):
    from triton.runtime.autotuner import Autotuner

    from sparselora.triton_kernels import launch_guard, sparse24_gemm as g

    tuner_calls = []
    real = Autotuner.run

    def run(self, *args, **kwargs):
        tuner_calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", run)
    capturing = [True]
    monkeypatch.setattr(launch_guard, "capturing", lambda: capturing[0])
    p = _packed(48, 96)  # a shape no other test uses: its key is new
    x = torch.randn(5, 96, device=DEV, dtype=torch.float16)

    y = g.sparse24_linear_triton(x, p.values, p.meta, split_k=1)  # "inside a capture"
    assert tuner_calls == [] and not any(key[4:6] == (48, 96) for key in g._TUNED)
    assert_linear(y, x, p.to_dense())  # an untuned config, still right

    capturing[0] = False
    g.sparse24_linear_triton(x, p.values, p.meta, split_k=1)  # warm-up outside: the autotuner runs
    assert len(tuner_calls) == 1 and any(key[4:6] == (48, 96) for key in g._TUNED)

    capturing[0] = True  # now tuned: a capture replays the autotuner's cached choice
    y = g.sparse24_linear_triton(x, p.values, p.meta, split_k=1)
    assert len(tuner_calls) == 2
    assert_linear(y, x, p.to_dense())


@needs_cuda
@pytest.mark.gpu
def test_gpu_capture_of_a_first_seen_m_works_and_tunes_afterwards(monkeypatch, seed):
    from sparselora.triton_kernels import launch_guard, sparse24_gemm as g

    p = _packed(1536, 1024, torch.bfloat16)
    x = torch.randn(37, 1024, device="cuda", dtype=torch.bfloat16)
    key = (g._m_key(37), 1536, 1024)
    # Compile (and load) the untuned config first, as a "capture" that is not a real one: loading
    # a new module is itself not allowed inside a global-mode capture, only the autotuning is ours.
    monkeypatch.setattr(launch_guard, "capturing", lambda: True)
    g.sparse24_linear_triton(x, p.values, p.meta)
    monkeypatch.undo()
    assert not any(k[3:6] == key for k in g._TUNED)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph):  # a real capture: no autotuning in it
        y = g.sparse24_linear_triton(x, p.values, p.meta)
    graph.replay()
    torch.cuda.synchronize()
    assert_linear(y, x, p.to_dense())
    assert not any(k[3:6] == key for k in g._TUNED)
    y2 = g.sparse24_linear_triton(x, p.values, p.meta)  # outside: tunes now
    assert any(k[3:6] == key for k in g._TUNED)
    assert_linear(y2, x, p.to_dense())


# -- cuSPARSELt: capture and plan keys --------------------------------------------------------------
def test_cusparselt_warns_for_a_first_seen_m_inside_a_capture(monkeypatch, caplog):
    from sparselora.backends import cusparselt_backend as cb

    calls = []
    monkeypatch.setattr(cb, "cslt_linear", lambda x, c, n, k, bias=None: calls.append((x.shape, n, k)) or x.new_zeros(*x.shape[:-1], n))
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    backend = cb.CusparseLtBackend()
    p = _packed(64, 128, torch.bfloat16, "cpu")
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    with torch.no_grad(), caplog.at_level("WARNING", logger="sparselora.cusparselt"):
        backend.linear(x, p, {"cslt_compressed": torch.zeros(1, dtype=torch.uint8)}, None)
        assert "first seen inside a CUDA-graph capture" in caplog.text and "M=5" in caplog.text
        caplog.clear()
        capturing[0] = False
        backend.linear(x, p, {"cslt_compressed": torch.zeros(1, dtype=torch.uint8)}, None)  # the warm-up
        capturing[0] = True
        backend.linear(x[:3], p, {"cslt_compressed": torch.zeros(1, dtype=torch.uint8)}, None)  # same M bucket (8)
        assert caplog.text == ""
    assert len(calls) == 3
    assert [cb._m_bucket(m) for m in (1, 8, 9, 16, 17, 4096, 4097)] == [8, 8, 16, 16, 32, 4096, 8192]


PLAN_KEY_CHECK = r"""
#include <cstdio>
#include <cstdlib>
#include <unordered_set>
#include <vector>
#include "cusparselt/plan_key.h"
using namespace sparselora::cslt;
int main() {
  std::unordered_set<PlanKey, PlanKeyHash> plans;
  std::vector<char*> biases;
  // 100 calls of one layer whose misaligned bias the op copies every call (a new pointer each time)
  for (int i = 0; i < 100; ++i) {
    char* tmp = static_cast<char*>(std::malloc(4096 + 64 * i));  // all alive: distinct addresses
    biases.push_back(tmp);
    plans.insert(make_plan_key(0, 15, 4096, 4096, 16, tmp + 2, /*temporary=*/true, /*in_key=*/true, 0));
  }
  if (plans.size() != 1) { std::printf("temporary biases built %zu plans\n", plans.size()); return 1; }
  // two layers with their own (stable) biases: one plan each, however many calls
  for (int i = 0; i < 50; ++i)
    for (int l = 0; l < 2; ++l)
      plans.insert(make_plan_key(0, 15, 4096, 4096, 16, biases[l], false, true, 0));
  if (plans.size() != 3) { std::printf("stable biases: %zu plans, expected 3\n", plans.size()); return 1; }
  if (bias_key(false, biases[0], false) != 0 || bias_key(true, nullptr, false) != 0) return 1;
  // provisional (capture-time default) plans serve captures only
  if (!reuse_cached_plan(false, false) || !reuse_cached_plan(false, true) || !reuse_cached_plan(true, true) ||
      reuse_cached_plan(true, false)) { std::printf("reuse rule wrong\n"); return 1; }
  for (char* b : biases) std::free(b);
  std::printf("PLAN-KEY-OK\n");
  return 0;
}
"""


def test_cusparselt_plan_keys_one_plan_per_layer_not_per_call(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (CI has one: nvcc needs it)")
    src = tmp_path / "plan_key_check.cpp"
    src.write_text(PLAN_KEY_CHECK)
    exe = tmp_path / "plan_key_check"
    p = subprocess.run([cxx, "-std=c++17", "-O0", "-I", str(ROOT / "csrc"), str(src), "-o", str(exe)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "PLAN-KEY-OK" in r.stdout, r.stdout + r.stderr

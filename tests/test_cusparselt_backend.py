"""CPU tests of the cusparselt / hybrid backends: availability and support reasons, and the
hybrid policy's table lookup. The GPU numerics are in tests/test_cusparselt.py."""
import json

import pytest
import torch

import sparselora
from sparselora.backends import choose_backend, get_backend
from sparselora.backends import cusparselt_backend as cb
from sparselora.backends import hybrid_backend as hb
from sparselora.format import pack_24
from helpers import random_24


def test_backends_are_registered_with_honest_weight_copies():
    for name in ("cusparselt", "hybrid"):
        b = get_backend(name)
        assert b.weight_copies.startswith("2 "), f"{name}: {b.weight_copies}"
    assert get_backend("hybrid").priority > get_backend("cusparselt").priority


@pytest.mark.skipif(cb.extension_error() is None, reason="sparselora._C is built here")
def test_unavailable_without_extension_names_the_build_command():
    why = get_backend("cusparselt").unavailable_reason()
    assert why and "sparselora._C" in why and "SPARSELORA_BUILD_CUDA=1" in why
    assert "cusparselt" in get_backend("hybrid").unavailable_reason()
    with pytest.raises(RuntimeError, match="sparselora._C"):
        cb.cslt_compress(torch.zeros(16, 16, dtype=torch.float16))


@pytest.mark.parametrize(
    "device, dtype, n, k, needle",
    [
        ("cpu", torch.bfloat16, 64, 64, "CUDA devices only"),
        ("cuda", torch.float32, 64, 64, "dtype torch.float32"),
        ("cuda", torch.float16, 100, 64, "out_features=100"),
        ("cuda", torch.bfloat16, 64, 40, "in_features=40"),
        ("cuda", torch.bfloat16, 24, 72, "out_features=24, in_features=72"),
    ],
)
def test_unsupported_reasons(device, dtype, n, k, needle):
    why = get_backend("cusparselt").unsupported_reason(torch.device(device), dtype, n, k)
    assert why is not None and needle in why, why
    hy = get_backend("hybrid").unsupported_reason(torch.device(device), dtype, n, k)
    assert hy is not None and needle in hy


def test_supported_shapes_have_no_reason():
    assert cb.shape_reason(torch.bfloat16, 4096, 11008) is None
    assert cb.shape_reason(torch.float16, 16, 16) is None


def test_auto_on_cpu_skips_cuda_backends_with_reasons():
    choice = choose_backend("cpu", torch.float32, 64, 64)
    assert choice.backend.name == "reference"
    assert "cusparselt" in choice.reason


def test_auto_takes_the_highest_priority_backend_that_runs():
    from sparselora.backends import Backend, register_backend
    from sparselora.backends import base

    class _Cpu(Backend):
        def unsupported_reason(self, device, dtype, out_features, in_features):
            return None

    low, high = _Cpu(), _Cpu()
    low.name, low.priority, high.name, high.priority = "test-cpu-low", 1000, "test-cpu-high", 1001
    for b in (low, high):
        register_backend(b)
    try:
        choice = choose_backend("cpu", torch.float32, 64, 64)
        assert choice.backend is high, choice.reason
        assert [b.name for b in sparselora.list_backends()][:2] == ["test-cpu-high", "test-cpu-low"]
    finally:
        for b in (low, high):
            base._REGISTRY.pop(b.name, None)


def test_cusparselt_routes_autograd_to_the_op(monkeypatch):
    # cuSPARSELt is forward-only: whenever x, the values or the bias need a gradient (and grad mode
    # is on), linear() must take the op, which has a backward. Checked on CPU with a stand-in op.
    w, mask, b = random_24(32, 64, torch.bfloat16)
    p = pack_24(w, mask)
    calls = []
    monkeypatch.setattr(cb, "sparse24_linear", lambda *a: calls.append("op") or a[0])
    backend = cb.CusparseLtBackend()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for which in ("x", "values", "bias"):
        xx = x.clone().requires_grad_(which == "x")
        vals = p.values.clone().requires_grad_(which == "values")
        bias = b.clone().requires_grad_(which == "bias")
        calls.clear()
        backend.linear(xx, type(p)(vals, p.meta, p.shape), {}, bias)
        assert calls == ["op"], which
        assert cb._needs_grad(xx, type(p)(vals, p.meta, p.shape), bias)
        with torch.no_grad():
            assert not cb._needs_grad(xx, type(p)(vals, p.meta, p.shape), bias)
    assert not cb._needs_grad(x, p, b)


def test_explicit_cusparselt_on_cpu_raises_with_reason():
    w, mask, b = random_24(32, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="cusparselt"):
        sparselora.SparseLinear(pack_24(w, mask), b, backend="cusparselt")


# -- hybrid policy -------------------------------------------------------------------------
DEV = "NVIDIA Test GPU 80GB"


def _write_table(tmp_path, shapes):
    path = hb.table_path(DEV, tmp_path)
    path.write_text(json.dumps({"device": DEV, "dtype": "bfloat16", "shapes": shapes}))
    hb._load_table_cached.cache_clear()
    return path


def test_table_path_is_a_safe_file_name(tmp_path):
    assert hb.table_path("NVIDIA H100 80GB HBM3", tmp_path).name == "hybrid_nvidia_h100_80gb_hbm3.json"


def test_policy_without_table_uses_the_heuristic(tmp_path):
    hb._load_table_cached.cache_clear()
    m, src = hb.cusparselt_min_m(DEV, 4096, 4096, tmp_path)
    assert m == hb.HEURISTIC_MIN_M and "heuristic" in src
    assert hb.choose(DEV, 4096, 4096, hb.HEURISTIC_MIN_M - 1, tmp_path) == "triton"
    assert hb.choose(DEV, 4096, 4096, hb.HEURISTIC_MIN_M, tmp_path) == "cusparselt"


def test_policy_uses_measured_thresholds(tmp_path):
    _write_table(tmp_path, {
        "4096x4096": {"cusparselt_min_m": 64, "slower_than_dense_m": [16], "measured_m": [16, 64]},
        "1024x1024": {"cusparselt_min_m": 1024},
        "4096x1024": {"cusparselt_min_m": None},  # cuSPARSELt never won
    })
    assert hb.cusparselt_min_m(DEV, 4096, 4096, tmp_path)[0] == 64
    assert hb.choose(DEV, 4096, 4096, 63, tmp_path) == "triton"
    assert hb.choose(DEV, 4096, 4096, 64, tmp_path) == "cusparselt"
    assert hb.choose(DEV, 1024, 1024, 512, tmp_path) == "triton"
    assert hb.choose(DEV, 1024, 1024, 4096, tmp_path) == "cusparselt"
    assert hb.choose(DEV, 4096, 1024, 1 << 20, tmp_path) == "triton"
    # an unmeasured shape takes the device's median threshold, not the heuristic
    m, src = hb.cusparselt_min_m(DEV, 2048, 2048, tmp_path)
    assert m == 1024 and "median" in src
    # another device has no table: heuristic
    assert hb.cusparselt_min_m("Other GPU", 4096, 4096, tmp_path)[0] == hb.HEURISTIC_MIN_M
    assert hb.dense_faster_at(DEV, 4096, 4096, [16], tmp_path)
    assert hb.dense_faster_at(DEV, 4096, 4096, [64], tmp_path) is None


def test_malformed_table_is_a_clear_error(tmp_path):
    hb.table_path(DEV, tmp_path).write_text(json.dumps({"device": DEV}))
    hb._load_table_cached.cache_clear()
    with pytest.raises(ValueError, match="shapes"):
        hb.cusparselt_min_m(DEV, 64, 64, tmp_path)
    hb._load_table_cached.cache_clear()


def test_shipped_tables_are_well_formed():
    for path in hb.TABLE_DIR.glob("hybrid_*.json"):
        table = json.loads(path.read_text())
        assert path == hb.table_path(table["device"])
        for shape, entry in table["shapes"].items():
            n, k = map(int, shape.split("x"))
            m = entry["cusparselt_min_m"]
            assert m is None or m >= 1, (path, shape)


def _rows(times):
    return [{"M": m, "dense_us": d, "triton_us": t, "cusparselt_us": c} for m, (d, t, c) in times.items()]


def test_derive_thresholds_from_measurements():
    # Triton wins up to M=16, cuSPARSELt from 64 on; at M=1 both lose to dense.
    rows = _rows({1: (5.0, 6.0, 9.0), 16: (6.0, 4.0, 8.0), 64: (10.0, 9.0, 7.0), 1024: (50.0, 60.0, 30.0)})
    min_m, slower = hb.derive_thresholds(rows)
    assert min_m == 64 and slower == [1]
    paths = {r["M"]: r["hybrid_path"] for r in rows}
    assert paths == {1: "triton", 16: "triton", 64: "cusparselt", 1024: "cusparselt"}
    assert {r["M"]: r["hybrid_speedup"] for r in rows}[1024] == pytest.approx(50 / 30)


def test_derive_thresholds_needs_every_larger_m_to_win():
    # cuSPARSELt wins at 16 but loses again at 64: the threshold is the last switch, 1024.
    rows = _rows({1: (5, 4, 9), 16: (6, 5, 4), 64: (10, 8, 9), 1024: (50, 60, 30)})
    assert hb.derive_thresholds(rows)[0] == 1024
    rows = _rows({1: (5, 4, 9), 1024: (50, 40, 45)})
    assert hb.derive_thresholds(rows) == (None, [])


def test_derive_thresholds_without_triton_compares_with_dense():
    rows = _rows({1: (5, None, 9), 4096: (50, None, 30)})
    min_m, slower = hb.derive_thresholds(rows)
    assert min_m == 4096 and slower == [1]
    assert all(r["hybrid_path"] == "cusparselt" for r in rows)


def test_nearest_breaks_a_log_scale_tie_toward_the_larger_m():
    # 16 is exactly one octave from 8 and from 32: the larger measured M is taken, whatever the
    # order of the list (the GEMM at 16 tokens already fills 16-row tiles, like at 32)
    assert hb._nearest([8, 32], 16) == 32
    assert hb._nearest([32, 8], 16) == 32
    assert hb._nearest([1, 4], 2) == 4
    # no tie: the nearer one, on either side
    assert hb._nearest([8, 32], 15) == 8 and hb._nearest([8, 32], 17) == 32


def test_dense_faster_at_follows_the_tie_rule(tmp_path):
    _write_table(tmp_path, {"4096x4096": {"cusparselt_min_m": None, "slower_than_dense_m": [8], "measured_m": [8, 32]},
                            "1024x1024": {"cusparselt_min_m": None, "slower_than_dense_m": [32], "measured_m": [8, 32]}})
    assert hb.dense_faster_at(DEV, 4096, 4096, [16], tmp_path) is None  # nearest: 32, which won
    assert "M=[16]" in hb.dense_faster_at(DEV, 1024, 1024, [16], tmp_path)  # nearest: 32, which lost
    hb._load_table_cached.cache_clear()


def test_derive_thresholds_counts_a_tie_as_a_cusparselt_win():
    # "at least as fast": equal times at M = 64 make 64 the threshold, not 1024
    rows = _rows({1: (5.0, 4.0, 9.0), 64: (10.0, 8.0, 8.0), 1024: (50.0, 40.0, 30.0)})
    min_m, slower = hb.derive_thresholds(rows)
    assert min_m == 64 and slower == []
    assert [r["hybrid_path"] for r in rows] == ["triton", "cusparselt", "cusparselt"]
    # a tie everywhere but one smaller M: still a win from there on
    assert hb.derive_thresholds(_rows({16: (9.0, 3.0, 3.0), 64: (10.0, 8.0, 7.0)}))[0] == 16


def test_derive_thresholds_does_not_count_a_tie_with_dense_as_slower():
    # the hybrid is "slower than dense" only when strictly slower: equal time is not a loss
    rows = _rows({1: (4.0, 4.0, 9.0), 64: (10.0, 8.0, 7.0), 256: (20.0, 30.0, 20.0)})
    assert hb.derive_thresholds(rows) == (64, [])
    rows = _rows({1: (4.0, None, 4.0), 64: (10.0, None, 7.0)})  # without Triton: cuSPARSELt vs dense
    assert hb.derive_thresholds(rows) == (1, [])
    rows = _rows({1: (4.0, 4.5, 9.0), 64: (10.0, 8.0, 7.0)})  # strictly slower at M = 1: a loss
    assert hb.derive_thresholds(rows) == (64, [1])


def test_dense_faster_at_reads_measured_points(tmp_path):
    _write_table(tmp_path, {
        # lost to dense at small M only
        "4096x4096": {"cusparselt_min_m": 256, "slower_than_dense_m": [1, 16], "measured_m": [1, 16, 256, 4096]},
        # lost everywhere: never worth it
        "64x64": {"cusparselt_min_m": None, "slower_than_dense_m": [1, 4096], "measured_m": [1, 4096]},
        # older table without measured_m: no decision
        "1024x1024": {"cusparselt_min_m": 64, "slower_than_dense_m": [1]},
    })
    f = hb.dense_faster_at
    assert f(DEV, 4096, 4096, None, tmp_path) is None
    assert "M=[1, 2]" in f(DEV, 4096, 4096, [1, 2, 4096], tmp_path)  # 2 is nearest to measured 1
    assert f(DEV, 4096, 4096, [200, 8192], tmp_path) is None  # nearest measured: 256 and 4096
    assert "M=[8]" in f(DEV, 4096, 4096, [8], tmp_path)  # nearest measured: 16 (log scale)
    assert "every measured M" in f(DEV, 64, 64, None, tmp_path)
    assert f(DEV, 1024, 1024, [1], tmp_path) is None
    assert f(DEV, 2048, 2048, [1], tmp_path) is None  # shape not measured
    assert f("Other GPU", 4096, 4096, [1], tmp_path) is None
    hb._load_table_cached.cache_clear()

"""GPU tests of the cuSPARSELt ops and backends (skipped only when there is no CUDA device).

Numerics are compared with a float64 reference on fresh random inputs; outputs land in memory
poisoned with NaN first (the op allocates its own output, so we poison the caching allocator's
free blocks), so rows or columns the kernel does not write show up as NaN.
"""
import threading

import pytest
import torch

from helpers import assert_linear, assert_matmul, random_24

import sparselora
from sparselora.backends import cusparselt_backend as cb
from sparselora.backends import get_backend, hybrid_backend as hb
from sparselora.format import SparsityError, pack_24

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _extension_built():
    # On a GPU machine a missing extension is a failure, not a skip: the GPU run builds it.
    assert cb.extension_error() is None, cb.extension_error()


def poison_allocator(out_bytes):
    """Leave NaN-filled free blocks in the caching allocator, so the op's output (``out_bytes``,
    small or large pool alike) is allocated from poisoned memory."""
    n = max(out_bytes // 2, 1)
    blocks = [torch.full((n,), float("nan"), dtype=torch.float16, device="cuda") for _ in range(8)]
    blocks.append(torch.full((32 << 20,), float("nan"), dtype=torch.float16, device="cuda"))
    torch.cuda.synchronize()
    del blocks


def weight(n, k, dtype, bias=True):
    w, mask, b = random_24(n, k, torch.float64, device="cuda", bias=bias)
    return w.to(dtype), (b.to(dtype) if b is not None else None)


# K = 80 and 48 are multiples of 16 but not of 32: they check the documented 16-alignment rule.
SHAPES = [(64, 64), (128, 256), (48, 80), (256, 48), (1024, 4096), (4096, 1024)]
MS = [1, 3, 8, 17, 64, 130, 1000]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_float64_reference(seed, dtype, n, k, bias):
    w, b = weight(n, k, dtype, bias)
    comp = cb.cslt_compress(w)
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.float64).to(dtype)
        m_pad = -(-m // 8) * 8
        poison_allocator(m_pad * n * x.element_size())
        y = cb.cslt_linear(x, comp, n, k, b)
        assert y.dtype == dtype and y.shape == (m, n) and y.is_contiguous()
        assert_linear(y, x, w, b, f"cslt_linear {n}x{k} M={m} bias={bias}", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_and_empty_input(dtype):
    n, k = 128, 256
    w, b = weight(n, k, dtype)
    comp = cb.cslt_compress(w)
    x = torch.randn(2, 5, k, device="cuda", dtype=dtype)
    y = cb.cslt_linear(x, comp, n, k, b)
    assert y.shape == (2, 5, n)
    assert_linear(y, x, w, b, dtype=dtype)
    assert cb.cslt_linear(x[:, :0], comp, n, k, b).shape == (2, 0, n)


def test_non_contiguous_and_offset_input():
    n, k, dtype = 64, 128, torch.bfloat16
    w, b = weight(n, k, dtype)
    comp = cb.cslt_compress(w)
    big = torch.randn(40, 2 * k + 1, device="cuda", dtype=dtype)
    x = big[3:, 1:k + 1]  # offset by one element: misaligned and non-contiguous
    assert_linear(cb.cslt_linear(x, comp, n, k, b), x, w, b, dtype=dtype)


def test_same_shape_layers_with_different_biases_interleaved():
    # Plans are shared per shape; each call must still use its own bias (rebinding the pointer).
    n, k, dtype = 256, 512, torch.float16
    layers = [weight(n, k, dtype) for _ in range(3)]
    # biases apart by 4 between layers: another layer's bias moves every output by ~4, against
    # outputs of rms ~20 (the oracle's fp16 bound is 2e-3 of that)
    layers = [(w, b + 4 * i) for i, (w, b) in enumerate(layers)]
    comps = [cb.cslt_compress(w) for w, _ in layers]
    x = torch.randn(96, k, device="cuda", dtype=dtype)
    # Both bias modes: in-key plans (the default), and one shared plan whose bias pointer is
    # rebound before each launch (SPARSELORA_CSLT_BIAS_IN_KEY=0). If this fails only for the
    # rebind mode, cuSPARSELt copies the descriptor at plan time and the mode must stay off.
    for mode in (True, False):
        torch.ops.sparselora.cslt_set_bias_in_key(mode)
        try:
            rebinds = cb.cache_stats()["bias_rebinds"]
            for _ in range(3):
                for (w, b), c in zip(layers, comps):
                    assert_linear(cb.cslt_linear(x, c, n, k, b), x, w, b, f"bias_in_key={mode}", dtype=dtype)
            assert (cb.cache_stats()["bias_rebinds"] > rebinds) == (not mode)
        finally:
            torch.ops.sparselora.cslt_set_bias_in_key(True)


def test_bad_inputs_raise_clear_errors():
    n, k, dtype = 64, 64, torch.float16
    w, b = weight(n, k, dtype)
    comp = cb.cslt_compress(w)
    dense = torch.randn(n, k, device="cuda", dtype=dtype)
    with pytest.raises(RuntimeError, match="not 2:4"):
        cb.cslt_compress(dense, check=True)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        cb.cslt_compress(torch.zeros(64, 40, device="cuda", dtype=dtype))
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        cb.cslt_compress(w.float())
    x = torch.randn(4, k, device="cuda", dtype=dtype)
    with pytest.raises(RuntimeError, match="compresses to"):
        cb.cslt_linear(x, comp[:-16], n, k, b)
    with pytest.raises(RuntimeError, match="expected"):
        cb.cslt_linear(torch.randn(4, k + 16, device="cuda", dtype=dtype), comp, n, k, b)
    with pytest.raises(RuntimeError, match="bias"):
        cb.cslt_linear(x, comp, n, k, b[:-1])
    with pytest.raises(RuntimeError, match="bias"):
        cb.cslt_linear(x, comp, n, k, b.to(torch.bfloat16))


def test_plan_cache_hit_and_one_search_per_bucket():
    cb.clear_cache(plans=True, tuning=True)
    n, k, dtype = 512, 1024, torch.bfloat16
    w, b = weight(n, k, dtype)
    comp = cb.cslt_compress(w)
    x = torch.randn(100, k, device="cuda", dtype=dtype)
    s0 = cb.cache_stats()
    cb.cslt_linear(x, comp, n, k, b)
    s1 = cb.cache_stats()
    assert s1["plan_misses"] == s0["plan_misses"] + 1 and s1["searches"] == s0["searches"] + 1
    y = cb.cslt_linear(x, comp, n, k, b)
    s2 = cb.cache_stats()
    assert s2["plan_hits"] == s1["plan_hits"] + 1 and s2["plan_misses"] == s1["plan_misses"]
    assert s2["searches"] == s1["searches"] and s2["tuned"] >= 1
    # another M in the same bucket (100 -> 104 padded; 120 -> 120; bucket 128): new plan, no new search
    assert torch.ops.sparselora.cslt_m_bucket(104) == torch.ops.sparselora.cslt_m_bucket(120)
    x2 = torch.randn(120, k, device="cuda", dtype=dtype)
    y2 = cb.cslt_linear(x2, comp, n, k, b)
    s3 = cb.cache_stats()
    assert s3["plan_misses"] == s2["plan_misses"] + 1 and s3["searches"] == s2["searches"]
    assert_linear(y, x, w, b, dtype=dtype)
    assert_linear(y2, x2, w, b, dtype=dtype)


def test_search_off_uses_default_algorithm():
    cb.clear_cache(plans=True, tuning=True)
    cb.set_search(False)
    try:
        n, k, dtype = 256, 256, torch.float16
        w, b = weight(n, k, dtype)
        x = torch.randn(64, k, device="cuda", dtype=dtype)
        s0 = cb.cache_stats()
        y = cb.cslt_linear(x, cb.cslt_compress(w), n, k, b)
        assert cb.cache_stats()["searches"] == s0["searches"]
        assert_linear(y, x, w, b, dtype=dtype)
    finally:
        cb.set_search(True)


def test_tuning_save_load_round_trip(tmp_path):
    cb.clear_cache(plans=True, tuning=True)
    dtype = torch.bfloat16
    cases = []
    for (n, k), m in [((256, 512), 64), ((512, 256), 1000)]:
        w, b = weight(n, k, dtype)
        comp = cb.cslt_compress(w)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        cb.cslt_linear(x, comp, n, k, b)
        cases.append((w, b, comp, x, n, k))
    path = tmp_path / "tuning.json"
    assert cb.save_tuning(path) == 2
    saved = torch.ops.sparselora.cslt_tuning_export()
    cb.clear_cache(plans=True, tuning=True)
    assert cb.cache_stats()["tuned"] == 0
    assert cb.load_tuning(path) == 2
    assert cb.cache_stats()["tuned"] == 2
    again = torch.ops.sparselora.cslt_tuning_export()
    key = lambda ex: sorted(zip(zip(ex[0][0::2], ex[0][1::2]), [tuple(ex[1][i:i + 9]) for i in range(0, len(ex[1]), 9)]))
    assert key(saved) == key(again)
    searches = cb.cache_stats()["searches"]
    for w, b, comp, x, n, k in cases:  # loaded choices are used: no new search, right numbers
        assert_linear(cb.cslt_linear(x, comp, n, k, b), x, w, b, dtype=dtype)
    assert cb.cache_stats()["searches"] == searches


def test_load_tuning_rejects_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a sparselora"):
        cb.load_tuning(p)


def test_concurrent_threads_are_correct():
    dtype = torch.float16
    shapes = [(256, 512), (256, 512), (512, 256), (128, 1024)]  # two layers share a shape
    layers = []
    for n, k in shapes:
        w, b = weight(n, k, dtype)
        layers.append((w, b, cb.cslt_compress(w), n, k))
    cb.clear_cache(plans=True, tuning=False)
    errors = []

    def work(tid):
        try:
            stream = torch.cuda.Stream()
            g = torch.Generator(device="cuda").manual_seed(tid)
            with torch.cuda.stream(stream):
                for it in range(15):
                    w, b, comp, n, k = layers[(tid + it) % len(layers)]
                    m = [1, 7, 64, 300][(tid * 3 + it) % 4]
                    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
                    y = cb.cslt_linear(x, comp, n, k, b)
                    stream.synchronize()
                    assert_linear(y, x, w, b, f"thread {tid} iter {it}", dtype=dtype)
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_repeated_calls_do_not_grow_memory():
    n, k, dtype = 1024, 1024, torch.bfloat16
    w, b = weight(n, k, dtype)
    comp = cb.cslt_compress(w)
    xs = [torch.randn(m, k, device="cuda", dtype=dtype) for m in (1, 33, 256)]
    for x in xs:  # warm up: plans, searches, allocator blocks
        cb.cslt_linear(x, comp, n, k, b)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(300):
        for x in xs:
            cb.cslt_linear(x, comp, n, k, b)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_torch_compile_traces_the_op():
    n, k, dtype = 256, 512, torch.bfloat16
    w, b = weight(n, k, dtype)
    comp = cb.cslt_compress(w)

    def f(x):
        return torch.relu(torch.ops.sparselora.cslt_linear(x, comp, n, k, b))

    x = torch.randn(48, k, device="cuda", dtype=dtype)
    y = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(y, f(x))


@pytest.mark.parametrize("backend", ["cusparselt", "hybrid"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_linear_module(backend, dtype):
    if backend == "hybrid" and get_backend("hybrid").unavailable_reason():
        pytest.skip(get_backend("hybrid").unavailable_reason())  # needs the Triton backend merged
    n, k = 512, 1024
    lin = torch.nn.Linear(k, n, device="cuda", dtype=dtype)
    w, mask, _ = random_24(n, k, dtype, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = sparselora.SparseLinear.from_linear(lin, mask, backend=backend, name="test.layer")
    assert mod.backend.name == backend
    for m in (1, 16, 1024, 4097):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        with torch.inference_mode():
            y = mod(x)
        assert_linear(y, x, w, lin.bias.detach(), f"{backend} M={m}", dtype=dtype)
    # with gradients needed, the module falls back to the canonical op, which has a backward
    x = torch.randn(8, k, device="cuda", dtype=dtype, requires_grad=True)
    mod(x).float().sum().backward()
    assert_matmul(x.grad, torch.ones(8, n, device="cuda", dtype=dtype), w, "dx", dtype=dtype)


def test_hybrid_policy_routes_by_m(monkeypatch):
    if get_backend("hybrid").unavailable_reason():
        pytest.skip(get_backend("hybrid").unavailable_reason())
    calls = []
    monkeypatch.setattr(hb, "cusparselt_min_m", lambda dev, n, k, table_dir=hb.TABLE_DIR: (64, "test"))
    real = hb.CUSPARSELT.linear
    monkeypatch.setattr(hb.CUSPARSELT, "linear", lambda *a: calls.append("cslt") or real(*a))
    n, k, dtype = 256, 256, torch.bfloat16
    lin = torch.nn.Linear(k, n, device="cuda", dtype=dtype)
    w, mask, _ = random_24(n, k, dtype, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = sparselora.SparseLinear.from_linear(lin, mask, backend="hybrid")
    with torch.inference_mode():
        mod(torch.randn(63, k, device="cuda", dtype=dtype))
        assert calls == []
        mod(torch.randn(64, k, device="cuda", dtype=dtype))
        assert calls == ["cslt"]


def test_compress_from_canonical_layout():
    n, k, dtype = 128, 256, torch.float16
    w, mask, b = random_24(n, k, dtype, device="cuda")
    comp = cb.compress_packed(pack_24(w, mask))
    x = torch.randn(32, k, device="cuda", dtype=dtype)
    assert_linear(cb.cslt_linear(x, comp, n, k, b), x, w, b, dtype=dtype)


def test_module_on_wrong_dtype_input_raises():
    n, k = 64, 64
    lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.float16)
    w, mask, _ = random_24(n, k, torch.float16, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = sparselora.SparseLinear.from_linear(lin, mask, backend="cusparselt")
    with torch.inference_mode(), pytest.raises(SparsityError, match="dtype"):
        mod(torch.randn(4, k, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    # schema, fake kernel vs real kernel (shapes, strides, dtype), dynamic-shape tracing
    n, k = 128, 256
    w, b = weight(n, k, dtype)
    comp = cb.cslt_compress(w)
    x = torch.randn(17, k, device="cuda", dtype=dtype)
    torch.library.opcheck(torch.ops.sparselora.cslt_linear.default, (x, comp, n, k, b))
    torch.library.opcheck(torch.ops.sparselora.cslt_linear.default, (x, comp, n, k, None))
    torch.library.opcheck(torch.ops.sparselora.cslt_compress.default, (w, True))


def test_backward_through_the_raw_op_fails_clearly():
    n, k, dtype = 64, 64, torch.float16
    w, b = weight(n, k, dtype)
    comp = cb.cslt_compress(w)
    x = torch.randn(8, k, device="cuda", dtype=dtype, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only"):
        cb.cslt_linear(x, comp, n, k, b).float().sum().backward()


def test_capture_time_default_plan_is_replaced_by_a_searched_one():
    # A first-seen M inside a CUDA-graph capture: no search there (default algorithm, plan marked
    # provisional); the first call outside a capture searches and builds the real plan.
    cb.clear_cache(plans=True, tuning=True)
    n, k, dtype = 512, 1024, torch.bfloat16
    w, b = weight(n, k, dtype)
    comp = cb.cslt_compress(w)
    x = torch.randn(40, k, device="cuda", dtype=dtype)
    s0 = cb.cache_stats()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(g):
        y = cb.cslt_linear(x, comp, n, k, b)
    g.replay()
    torch.cuda.synchronize()
    assert_linear(y, x, w, b, dtype=dtype)
    s1 = cb.cache_stats()
    assert s1["searches"] == s0["searches"] and s1["plan_misses"] == s0["plan_misses"] + 1
    y2 = cb.cslt_linear(x, comp, n, k, b)  # outside: searches, replaces the provisional plan
    s2 = cb.cache_stats()
    assert s2["searches"] == s1["searches"] + 1 and s2["plan_misses"] == s1["plan_misses"] + 1
    cb.cslt_linear(x, comp, n, k, b)
    assert cb.cache_stats()["plan_hits"] == s2["plan_hits"] + 1
    assert_linear(y2, x, w, b, dtype=dtype)
    g.replay()  # the graph still runs after its plan was retired
    torch.cuda.synchronize()
    assert_linear(y, x, w, b, dtype=dtype)


def test_misaligned_bias_builds_one_plan_not_one_per_call():
    cb.clear_cache(plans=True, tuning=False)
    n, k, dtype = 256, 512, torch.bfloat16
    w, b = weight(n, k, dtype)
    comp = cb.cslt_compress(w)
    store = torch.empty(n + 1, device="cuda", dtype=dtype)
    store[1:] = b
    b_mis = store[1:]  # 2 bytes past an aligned address: the op copies it every call
    x = torch.randn(16, k, device="cuda", dtype=dtype)
    cb.cslt_linear(x, comp, n, k, b_mis)
    s0 = cb.cache_stats()
    for _ in range(20):
        y = cb.cslt_linear(x, comp, n, k, b_mis)
    s1 = cb.cache_stats()
    assert s1["plan_misses"] == s0["plan_misses"] and s1["plans"] == s0["plans"]
    assert_linear(y, x, w, b, dtype=dtype)

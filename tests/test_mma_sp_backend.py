"""sparselora::mma_sp_linear and the ``mma-sp`` backend.

CPU: the op's reference kernel against float64, its checks, fake kernel and opcheck, the backend's
reasons and exact prepare/to_canonical. GPU (skipped only without a CUDA device): the CUDA kernel
against float64 on odd shapes and M with every tile config forced, an exact small-integer mode,
determinism, graph capture, opcheck, misaligned inputs; ``test_smoke_every_config`` is the small
case tools/sanitize_sparse_mma.sh runs under compute-sanitizer.
"""
import pytest
import torch

from helpers import assert_linear, random_24
from sparselora.backends import get_backend
from sparselora.backends import mma_sp_backend as mb
from sparselora.format import SparsityError, nm_mask, pack_24
from sparselora.gpu_layout import to_gpu_layout
from sparselora import mma_sp_configs as C
from sparselora.mma_sp_configs import CONFIGS, PREFILL_CONFIGS, config_by_id, config_smem_bytes

ALL_CONFIGS = [c.id for c in CONFIGS + PREFILL_CONFIGS]

DTYPES = (torch.float16, torch.bfloat16)


def _layer(n, k, dtype, device="cpu", bias=True):
    w, _, b = random_24(n, k, dtype, device, bias)
    g = to_gpu_layout(pack_24(w))
    return w, b, g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,lead", [(40, 136, (3,)), (17, 72, (2, 5)), (64, 256, (1,))])
def test_cpu_reference_matches_float64(seed, dtype, n, k, lead):
    w, b, g = _layer(n, k, dtype)
    x = torch.randn(*lead, k, dtype=torch.float64).to(dtype)
    y = mb.mma_sp_linear(x, g.values, g.meta, b, n)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert_linear(y, x, w, b)


def test_cpu_op_checks_name_the_problem():
    w, b, g = _layer(32, 64, torch.bfloat16)
    x = torch.randn(4, 64).bfloat16()
    with pytest.raises(SparsityError, match=r"values must be the GPU layout \[2, 2, 32, 8\] of a \[32, 64\]"):
        mb.mma_sp_linear(x, g.values[:1], g.meta, b, 32)
    with pytest.raises(SparsityError, match="multiple of 8"):
        mb.mma_sp_linear(torch.randn(4, 60).bfloat16(), g.values, g.meta, b, 32)
    with pytest.raises(SparsityError, match="config=9"):
        mb.mma_sp_linear(x, g.values, g.meta, b, 32, 9)
    with pytest.raises(SparsityError, match=r"config=99; .*100, 101, 102 \(prefill\)"):
        mb.mma_sp_linear(x, g.values, g.meta, b, 32, 99)
    assert_linear(mb.mma_sp_linear(x, g.values, g.meta, b, 32, 100), x, w, b)  # a forced prefill config is accepted
    # split-K across CTAs: -1 or 1..KQ (k-blocks of 256 columns; K = 64: one), none for prefill configs
    assert_linear(mb.mma_sp_linear(x, g.values, g.meta, b, 32, 2, 1), x, w, b)
    with pytest.raises(SparsityError, match=r"splits=2; valid: -1 \(auto\) or 1..1"):
        mb.mma_sp_linear(x, g.values, g.meta, b, 32, 2, 2)
    with pytest.raises(SparsityError, match="splits=0"):
        mb.mma_sp_linear(x, g.values, g.meta, b, 32, -1, 0)
    w5, b5, g5 = _layer(32, 1032, torch.bfloat16)
    x5 = torch.randn(3, 1032).bfloat16()
    assert_linear(mb.mma_sp_linear(x5, g5.values, g5.meta, b5, 32, 2, 5), x5, w5, b5)
    with pytest.raises(SparsityError, match="prefill configs do not split K"):
        mb.mma_sp_linear(x5, g5.values, g5.meta, b5, 32, 100, 2)
    with pytest.raises(SparsityError, match="values dtype"):
        mb.mma_sp_linear(x.half(), g.values, g.meta, None, 32)
    with pytest.raises(SparsityError, match="bias must be"):
        mb.mma_sp_linear(x, g.values, g.meta, b[:3], 32)


def test_opcheck_and_compile_cpu():
    w, b, g = _layer(48, 128, torch.float16)
    x = torch.randn(5, 128).half()
    torch.library.opcheck(torch.ops.sparselora.mma_sp_linear, (x, g.values, g.meta, b, 48))
    f = torch.compile(lambda x: torch.relu(mb.mma_sp_linear(x, g.values, g.meta, b, 48)), backend="eager",
                      fullgraph=True, dynamic=True)
    for m in (3, 9):
        xm = torch.randn(m, 128).half()
        assert torch.equal(f(xm), torch.relu(mb.mma_sp_linear(xm, g.values, g.meta, b, 48)))


def test_backend_reasons_and_exact_prepare():
    be = get_backend("mma-sp")
    assert be.priority > get_backend("triton").priority
    assert "CUDA" in be.unsupported_reason(torch.device("cpu"), torch.float16, 64, 64)
    if torch.cuda.is_available():
        assert "multiple of 8" in be.unsupported_reason(torch.device("cuda"), torch.float16, 64, 68)
        assert "dtype" in be.unsupported_reason(torch.device("cuda"), torch.float32, 64, 64)
    else:
        assert be.unavailable_reason() is not None
    w, _, _ = random_24(40, 136, torch.bfloat16)
    p = pack_24(w)
    extra = be.prepare(p)
    back = be.to_canonical(extra, p.shape)
    assert torch.equal(back.values.view(torch.int16), p.values.view(torch.int16)) and torch.equal(back.meta, p.meta)


# ---------------------------------------------------------------- GPU ----------------------------

def _require_ext():
    if mb.extension_error():
        pytest.fail(f"CUDA present but the extension is not usable: {mb.extension_error()}")


def _poison_allocator(nbytes=64 << 20):
    # the caching allocator hands the next outputs blocks that held NaN: unwritten elements show
    torch.full((nbytes // 2,), float("nan"), dtype=torch.float16, device="cuda")


SHAPES = [(40, 136), (17, 72), (33, 520), (256, 1024), (4096, 4096)]
MS = [1, 7, 8, 9, 15, 16, 17, 33, 64, 130]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("config", [-1] + ALL_CONFIGS)
@pytest.mark.usefixtures("seed")
def test_cuda_matches_float64_every_config(dtype, n, k, config):
    _require_ext()
    smem_ok = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    w, b, g = _layer(n, k, dtype, "cuda")
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.float64).to(dtype)
        for bias in (b, None):
            if config >= 0 and config_smem_bytes(config_by_id(config)) > smem_ok:
                with pytest.raises(RuntimeError, match="more shared memory"):
                    mb.mma_sp_linear(x, g.values, g.meta, bias, n, config)
                continue
            _poison_allocator()
            y = mb.mma_sp_linear(x, g.values, g.meta, bias, n, config)
            assert_linear(y, x, w, bias, what=f"config {config}, M={m}, {n}x{k}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_exact_small_integers_and_deterministic(dtype):
    # |v| <= 8, K < 2^19: every partial sum is exact in fp32, so any split-K order gives the float64 result
    _require_ext()
    n, k = 300, 2056
    w = (torch.randint(-8, 9, (n, k)) * nm_mask(torch.rand(n, k))).to(dtype)
    g = to_gpu_layout(pack_24(w.cuda()))
    for m in (1, 5, 16, 23, 64, 200):
        x = torch.randint(-8, 9, (m, k)).to(dtype).cuda()
        ref = (x.double() @ w.double().cuda().T).to(dtype)
        for config in [-1] + ALL_CONFIGS:
            try:
                y = mb.mma_sp_linear(x, g.values, g.meta, None, n, config)
            except RuntimeError as e:
                assert "more shared memory" in str(e)
                continue
            assert torch.equal(y, ref), f"config {config} M={m}: first diff at {(y != ref).nonzero()[0].tolist()}"
            assert torch.equal(y, mb.mma_sp_linear(x, g.values, g.meta, None, n, config)), "not deterministic"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_split_k_exact_deterministic_and_graph_replayed(dtype):
    # split-K across CTAs, forced for every decode config (1, 2, 3 and one split per k-block) and
    # chosen (-1): exact small integers give the float64 result in any order; random inputs give
    # the same bits on every call (the last CTA sums in split order) and after graph replays
    # (the counters come back to 0: no memset between launches)
    _require_ext()
    n, k = 300, 2056  # 9 k-blocks of 256 columns
    w = (torch.randint(-8, 9, (n, k)) * nm_mask(torch.rand(n, k))).to(dtype)
    g = to_gpu_layout(pack_24(w.cuda()))
    wr, br, gr = _layer(n, k, dtype, "cuda")
    smem_ok = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    for config in [c.id for c in CONFIGS]:
        if config_smem_bytes(config_by_id(config)) > smem_ok:
            continue
        for m in (1, 9, 23):
            x = torch.randint(-8, 9, (m, k)).to(dtype).cuda()
            ref = (x.double() @ w.double().cuda().T).to(dtype)
            xr = torch.randn(m, k, device="cuda", dtype=torch.float64).to(dtype)
            for splits in (1, 2, 3, 9, -1):
                _poison_allocator()
                y = mb.mma_sp_linear(x, g.values, g.meta, None, n, config, splits)
                assert torch.equal(y, ref), f"config {config} M={m} splits {splits}: first diff at {(y != ref).nonzero()[0].tolist()}"
                yr = mb.mma_sp_linear(xr, gr.values, gr.meta, br, n, config, splits)
                assert_linear(yr, xr, wr, br, what=f"config {config}, M={m}, splits {splits}")
                for _ in range(3):
                    assert torch.equal(yr, mb.mma_sp_linear(xr, gr.values, gr.meta, br, n, config, splits)), "not deterministic"
    assert mb.workspace_bytes("cuda") == C.WORKSPACE_BYTES
    x = torch.randn(4, k, device="cuda").to(dtype)
    y0 = mb.mma_sp_linear(x, gr.values, gr.meta, br, n, 2, 9)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mb.mma_sp_linear(x, gr.values, gr.meta, br, n, 2, 9)
    for _ in range(3):
        graph.replay()
        assert torch.equal(y, y0), "graph replay of split-K differs from the eager call"
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert_linear(y, x, wr, br, what="split-K graph replay")
    with pytest.raises(RuntimeError, match="more splits than 256-column k-blocks"):
        mb.mma_sp_linear(x, gr.values, gr.meta, br, n, 2, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_opcheck_and_misaligned_input():
    _require_ext()
    n, k = 512, 1024
    w, b, g = _layer(n, k, torch.bfloat16, "cuda")
    x = torch.randn(4, k, device="cuda").bfloat16()
    torch.library.opcheck(torch.ops.sparselora.mma_sp_linear, (x, g.values, g.meta, b, n))
    y0 = mb.mma_sp_linear(x, g.values, g.meta, b, n)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mb.mma_sp_linear(x, g.values, g.meta, b, n)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert_linear(y, x, w, b, what="graph replay")
    assert not torch.equal(y, y0)
    flat = torch.randn(4 * k + 4, device="cuda").bfloat16()
    xm = flat[4:].view(4, k)  # 8-byte aligned start: the op copies it to an aligned buffer
    assert_linear(mb.mma_sp_linear(xm, g.values, g.meta, b, n), xm, w, b, what="misaligned x")
    wide = torch.randn(4, k + 8, device="cuda").bfloat16()[:, :k]  # row stride k + 8, used in place
    assert_linear(mb.mma_sp_linear(wide, g.values, g.meta, b, n), wide, w, b, what="strided x")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_every_config():
    # small, one call per config: what tools/sanitize_sparse_mma.sh runs under memcheck/racecheck
    _require_ext()
    w, b, g = _layer(40, 264, torch.float16, "cuda")
    x = torch.randn(11, 264, device="cuda").half()
    for config in ALL_CONFIGS:
        try:
            y = mb.mma_sp_linear(x, g.values, g.meta, b, 40, config)
        except RuntimeError as e:
            assert "more shared memory" in str(e)
            continue
        assert_linear(y, x, w, b, what=f"config {config}")
        if config < 100:  # split-K across CTAs too (K = 264: 2 k-blocks), so the sanitizer sees the workspace
            assert_linear(mb.mma_sp_linear(x, g.values, g.meta, b, 40, config, 2), x, w, b, what=f"config {config}, 2 splits")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_warp_probe_names_lane_and_register(dtype):
    # One row tile, two k-tiles: W holds distinct small integers at its kept positions and x's row t
    # is one-hot at column t, so y = W^T exactly. A mismatch names the lane and register that
    # should have carried the value (layout.h's A fragment) and the metadata lane/selector.
    _require_ext()
    from sparselora import gpu_layout as L
    n, k = 16, 64
    mask = nm_mask(torch.rand(n, k))
    w = torch.zeros(n, k)
    w[mask] = torch.arange(1, int(mask.sum()) + 1, dtype=torch.float32)
    w = w.to(dtype).cuda()
    g = to_gpu_layout(pack_24(w))
    x = torch.eye(k, dtype=dtype, device="cuda")
    for config in [c.id for c in CONFIGS]:
        try:
            y = mb.mma_sp_linear(x, g.values, g.meta, None, n, config)
        except RuntimeError as e:
            assert "more shared memory" in str(e)
            continue
        bad = (y.T != w).nonzero().tolist()
        if bad:
            r, c = bad[0]
            kept = int(mask[r, :c].sum())  # index of W[r, c] among the row's kept values
            cc = kept % 16  # kept column within its k-tile
            where = [(lane, i) for lane in range(32) for i in range(8) if (L.a_row(lane, i), L.a_col(lane, i)) == (r, cc)]
            sel = (c // 32) % 2
            meta_lane = 4 * (r % 8) + 2 * sel + (c % 32) // 16
            pytest.fail(f"config {config}: {len(bad)} wrong outputs; first W[{r}, {c}] = {w[r, c].item()} came out "
                        f"{y[c, r].item()} (A lane/register {where}, metadata lane {meta_lane} under selector {sel})")

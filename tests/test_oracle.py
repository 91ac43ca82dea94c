"""The numerics oracle (``helpers.assert_close``) tells a right kernel from a wrong one.

At every (dtype, shape) the suite checks, CPU and GPU tests alike (the shapes are imported from
the test modules, so a new shape there is covered here), this builds from the float64 reference
the outputs of plausible kernel bugs, rounded to the dtype as a kernel would write them, and
requires the oracle to reject each:

* zeros; one unwritten (NaN-poisoned) element;
* a dropped bias; another row's bias;
* the last group of 4 K-columns dropped (an off-by-one K mask);
* the two kept indices of every group swapped (i0/i1 of the meta);
* the output shifted by one column;
* zero gradients; for SparseLoRA also an unmasked LoRA update / gradient.

It also requires the oracle to accept what a correct GPU kernel writes: fp32 accumulation then
one rounding to the dtype, with the K reduction split into partial sums, the bias added after
that rounding (as a library epilogue may), and for SparseLoRA the
intermediate roundings its kernels do (the ``W + s·B·A`` tile and the ``G`` tile in the dtype).

Pure PyTorch on CPU (no Triton). Rows are independent, so M is capped at ``ROW_CAP`` (more
rows only concentrate the norm-wise error at the same value and add elements to the
element-wise check); N and K are the suite's own.
"""
import pytest
import torch

from helpers import REL_TOL, assert_close, mag_linear, ref_linear
import test_backend_conformance as conf
import test_cusparselt as cslt
import test_mma_sp_backend as mma
import test_sparse_lora as lora
import test_sparse_mma_host_sim as host_sim
import test_triton_gemm as gemm
import test_triton_gemv as gemv

ROW_CAP = 64
F16 = [torch.float16, torch.bfloat16]
ALL = [torch.float32, torch.float16, torch.bfloat16]


def _linear_cases():
    """{(n, k): {dtype: set of M}} of every x @ W.T + b check in the suite."""
    cases = {}

    def add(dtypes, n, k, ms):
        for dt in dtypes:
            cases.setdefault((n, k), {}).setdefault(dt, set()).update(min(m, ROW_CAP) for m in ms)

    for m, n, k in gemm.SHAPES:
        add(gemm.DTYPES, n, k, [m])
    add(gemm.DTYPES, 40, 72, [7, 9, 6])  # bias/no-bias, non-contiguous and batched inputs
    add([torch.float32], 32, 256, [3])  # the split-path test
    add(gemm.DTYPES, 70, 160, [1, 40])  # the property test's largest draw
    for m, n, k in gemm.GPU_SHAPES:
        add(F16, n, k, [m])
    for n, k in gemv.SHAPES:
        add(gemv.DTYPES, n, k, [1, 3, 16])
    add(gemv.DTYPES, 20, 72, [4, 5, 6])
    add([torch.float32], 16, 256, [3])
    add([torch.bfloat16], 21, 100, [3])
    for n, k in gemv.GPU_SHAPES:
        add(F16, n, k, [1, 4, 7, 16, 40])
    add(F16, 1000, 1004, range(1, gemv.GEMV_MAX_M + 1))
    rows = [torch.Size(t).numel() for t in conf.TOKENS]
    for n, k in conf.SHAPES:
        add(ALL, n, k, rows)
    for n, k in cslt.SHAPES:
        add(cslt.DTYPES, n, k, cslt.MS)
    add(cslt.DTYPES, 512, 1024, [1, 16, 1024, 4097])  # the module test (cusparselt, hybrid)
    add([torch.float16], 256, 512, [96])  # layers with different biases, interleaved
    for n, k in mma.SHAPES:  # the mma.sp kernel, every config
        add(mma.DTYPES, n, k, mma.MS)
    add(mma.DTYPES, 40, 136, [3])  # its CPU reference
    add(mma.DTYPES, 17, 72, [10])
    add(mma.DTYPES, 64, 256, [1, 3, 12])  # (+ the host simulation's launcher checks)
    add([torch.bfloat16], 512, 1024, [4])  # graph replay, misaligned and strided x
    add([torch.float16], 40, 264, [11])  # the sanitizer's smoke case
    for n, k, m in host_sim.CASES:  # the mma.sp kernel source simulated on the host
        add(F16, n, k, [m])
    for n, k, m in host_sim.PREFILL_CASES:  # its prefill kernel
        add(F16, n, k, [m])
    add([torch.bfloat16], 2048, 64, [800])  # the host simulation's auto prefill case
    add([torch.bfloat16], 256, 512, [8])  # test_gpu_risks: a launch on a second device
    add([torch.float32, torch.bfloat16], 48, 128, [5])  # test_memory: one-copy layers
    add([torch.bfloat16], 64, 256, [7])
    add([torch.bfloat16], 40, 136, [7])
    return cases


def _transposed_cases():
    """{(n, k): {dtype: set of M}} of every dx = dy @ W check (the reduction runs over N)."""
    cases = {}

    def add(dtypes, n, k, ms):
        for dt in dtypes:
            cases.setdefault((n, k), {}).setdefault(dt, set()).update(min(m, ROW_CAP) for m in ms)

    for m, n, k in [(1, 64, 96), (5, 40, 72), (33, 72, 64)]:  # test_matmul_t_matches_float64
        add(gemm.DTYPES, n, k, [m])
    add([torch.float16], 40, 72, [6])
    for m, n, k in gemm.GPU_SHAPES:
        add(F16, n, k, [m])
    add(F16, 1024, 2048, [3, 200])  # test_gpu_autograd_input_gradient
    add(F16, 512, 1024, [8])  # the cuSPARSELt module's fallback backward
    for m, n, k, _ in lora.SHAPES[:3]:
        add(lora.DTYPES, n, k, [m])
    return cases


def _lora_cases():
    """(dtype, m, n, k, r) of every SparseLoRA forward / adapter-gradient check."""
    cases = [(dt, m, n, k, r) for dt in lora.DTYPES for m, n, k, r in lora.SHAPES]
    cases += [(dt, 6, 40, 72, 5) for dt in (torch.float32, torch.bfloat16)]  # op gradients
    cases += [(dt, m, 768, 1024, 16) for dt in F16 for m in (1, 16, min(300, ROW_CAP))]  # GPU
    cases += [(torch.bfloat16, m, 512, 768, 24) for m in (1, min(200, ROW_CAP))]  # GPU dropout input
    return cases


def _id(case):
    return f"{case[0]}x{case[1]}"


# ---------------------------------------------------------------------------------------------
# operands: 2:4 weights drawn like helpers.random_24, fast at LLaVA sizes
# ---------------------------------------------------------------------------------------------
def _weight(n, k):
    """fp32 (w, w with the two kept values of every group swapped): the 2 largest |N(0,1)|
    of each group of 4 kept, as helpers.random_24 draws (elementwise, fast at 4096 x 11008)."""
    g = torch.randn(4, n, k // 4)  # g[i]: position i of every group
    # distinct keys ordered like |g| (the bits of a float >= 0 are monotonic), ties broken by position
    key = g.view(torch.int32) & 0x7FFFFFFC
    for i in range(1, 4):
        key[i] |= i
    hi01, lo01 = torch.maximum(key[0], key[1]), torch.minimum(key[0], key[1])
    hi23, lo23 = torch.maximum(key[2], key[3]), torch.minimum(key[2], key[3])
    second = torch.maximum(torch.minimum(hi01, hi23), torch.maximum(lo01, lo23))  # 2nd largest key
    drop = key < second
    w4 = g.masked_fill(drop, 0)
    sw4 = (w4.sum(0) - w4).masked_fill_(drop, 0)  # each kept position gets the other kept value
    dense = lambda t: t.permute(1, 2, 0).reshape(n, k)
    return dense(w4), dense(sw4)


def _randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _gpu_way(a, b, dtype, splits=1, bias=None):
    """a @ b as a GPU kernel computes it: fp32 products and sums (K split into partial sums),
    bias added in fp32, one rounding to dtype."""
    acc = sum(ac.float() @ bc.float() for ac, bc in zip(a.tensor_split(splits, -1), b.tensor_split(splits, 0)))
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(dtype)


def _judge(accepted, wrong, ref, where, **kw):
    for name, out in accepted.items():
        try:
            assert_close(out, ref, name, **kw)
        except AssertionError as e:
            raise AssertionError(f"{where}: the oracle rejects a correctly rounded result ({name}): {e}") from None
    passed = []
    for name, out in wrong.items():
        try:
            assert_close(out, ref, name, **kw)
        except AssertionError:
            continue
        err = (out.double() - ref).norm() / ref.norm()
        passed.append(f"{name} (‖err‖/‖ref‖ = {err:.2e})")
    assert not passed, f"{where}: the oracle accepts wrong outputs: {passed} (norm-wise bound {REL_TOL[kw['dtype']]:.0e})"


def _poison_one(t):
    t = t.clone()
    t.view(-1)[-1] = float("nan")
    return t


def _shift(t):
    return torch.roll(t, 1, dims=-1)


# ---------------------------------------------------------------------------------------------
# y = x @ W.T + b (every forward kernel and backend)
# ---------------------------------------------------------------------------------------------
LINEAR = _linear_cases()


@pytest.mark.parametrize("case", sorted(LINEAR), ids=_id)
def test_oracle_judges_linear_outputs(seed, one_torch_thread, case):
    n, k = case
    w32, sw32 = _weight(n, k)
    swap32 = (sw32 - w32).T  # what swapping i0/i1 adds to W (fp32 is plenty for a wrong output)
    for dtype, ms in LINEAR[case].items():
        w, b = w32.to(dtype), _randn(n, dtype=dtype)
        # rows are independent: every product is computed once for the most rows, sliced per M
        x = _randn(max(ms), k, dtype=dtype)
        x64, w64, b64 = x.double(), w.double(), b.double()
        ref_all = x64 @ w64.T + b64  # = helpers.ref_linear(x, w, b) (one float64 copy of W, not two)
        mag_all = x64.abs() @ w64.abs_().T + b64.abs()  # = helpers.mag_linear(x, w, b)
        del w64
        wf = w.float()
        good_all = _gpu_way(x, wf.T, dtype, bias=b)
        split_all = _gpu_way(x, wf.T, dtype, splits=3, bias=b)
        epilogue_all = (_gpu_way(x, wf.T, dtype).float() + b.float()).to(dtype)  # bias after rounding
        del wf
        swap_all = x.float() @ swap32
        last_all = x64[:, -4:] @ w[:, -4:].double().T
        for m in sorted(ms):
            ref, good = ref_all[:m], good_all[:m]
            accepted = {"fp32 accumulate, one rounding": good, "fp32 partial sums over 3 K-splits": split_all[:m],
                    "bias added after rounding (an epilogue)": epilogue_all[:m]}
            wrong = {"zeros": torch.zeros_like(good),
                     "one unwritten element": _poison_one(good),
                     "dropped bias": (ref - b64).to(dtype),
                     "last group of 4 K-columns dropped": (ref - last_all[:m]).to(dtype),
                     "swapped i0/i1": (ref + swap_all[:m].double()).to(dtype)}
            if n > 1:
                wrong["one-column shift"] = _shift(good)
                wrong["another row's bias"] = (ref - b64 + _shift(b64)).to(dtype)
            _judge(accepted, wrong, ref, f"{dtype} M={m}", dtype=dtype, mag=mag_all[:m], addend=b)


# ---------------------------------------------------------------------------------------------
# dx = dy @ W (the transposed product: backward of every forward)
# ---------------------------------------------------------------------------------------------
TRANSPOSED = _transposed_cases()


@pytest.mark.parametrize("case", sorted(TRANSPOSED), ids=_id)
def test_oracle_judges_input_gradients(seed, one_torch_thread, case):
    n, k = case
    w32, sw32 = _weight(n, k)
    for dtype, ms in TRANSPOSED[case].items():
        w = w32.to(dtype)
        dy = _randn(max(ms), n, dtype=dtype)
        dy64, w64 = dy.double(), w.double()
        ref_all = dy64 @ w64  # = helpers.ref_linear(dy, w.T), what helpers.assert_matmul compares
        mag_all = dy64.abs() @ w64.abs_()  # = helpers.mag_linear(dy, w.T)
        del w64
        wf = w.float()
        good_all, split_all = _gpu_way(dy, wf, dtype), _gpu_way(dy, wf, dtype, splits=3)
        del wf
        swap_all = (dy.float() @ sw32).to(dtype)
        for m in sorted(ms):
            good = good_all[:m]
            dropped = good.clone()
            dropped[:, -4:] = 0
            wrong = {"zero gradient": torch.zeros_like(good), "one unwritten element": _poison_one(good),
                     "last group of 4 K-columns dropped": dropped, "swapped i0/i1": swap_all[:m],
                     "one-column shift": _shift(good)}
            _judge({"fp32 accumulate": good, "fp32 partial sums over 3 N-splits": split_all[:m]},
                   wrong, ref_all[:m], f"{dtype} M={m}", dtype=dtype, mag=mag_all[:m])


@pytest.mark.parametrize("dtype", F16, ids=str)
@pytest.mark.parametrize("m,n", [(3, 1024), (200, 1024), (6, 40)])
def test_oracle_judges_bias_gradients(seed, dtype, m, n):
    dy = _randn(m, n, dtype=dtype)
    ref, mag = dy.double().sum(0), dy.double().abs().sum(0)
    good = dy.float().sum(0).to(dtype)
    wrong = {"zero gradient": torch.zeros_like(good), "one-column shift": _shift(good),
             "one row dropped": dy[1:].float().sum(0).to(dtype)}
    _judge({"fp32 sum": good}, wrong, ref, "dbias", dtype=dtype, mag=mag)


# ---------------------------------------------------------------------------------------------
# SparseLoRA: fused forward and adapter gradients dA = Bᵀ·G, dB = G·Aᵀ
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _lora_cases(), ids=lambda c: f"{str(c[0])[6:]}-m{c[1]}-{c[2]}x{c[3]}-r{c[4]}")
def test_oracle_judges_sparse_lora(seed, one_torch_thread, case):
    dtype, m, n, k, r = case
    s = 0.75
    w32, sw32 = _weight(n, k)
    mask = w32 != 0  # a kept N(0,1) draw is never exactly 0
    w = w32.to(dtype)
    a = (torch.randn(r, k, dtype=torch.float64) / k**0.5).to(dtype)
    bb = _randn(n, r, dtype=dtype)
    bias = _randn(n, dtype=dtype)
    x, dy = _randn(m, k, dtype=dtype), _randn(m, n, dtype=dtype)
    upd = (bb.double() @ a.double()) * s
    weff = (w.double() + upd) * mask
    ref, mag = lora._ref64(x, None, w, mask, a, bb, s, bias)  # what the SparseLoRA tests compare
    # the GPU kernel rounds the [BN, BK] tile of W + s·B·A to the dtype before its tensor-core dot
    weff_tile = ((w.float() + (bb.float() @ a.float()) * s) * mask).to(dtype)
    good = _gpu_way(x, weff_tile.float().T, dtype, bias=bias)
    wrong = {"zeros": torch.zeros_like(good), "one unwritten element": _poison_one(good),
             "dropped bias": (ref - bias.double()).to(dtype),
             "LoRA update not masked": (ref + x.double() @ (upd * ~mask).T).to(dtype),
             "last group of 4 K-columns dropped": (ref - x[:, -4:].double() @ weff[:, -4:].T).to(dtype),
             "swapped i0/i1 (base weight)": (ref + x.double() @ (sw32.to(dtype).double() - w.double()).T).to(dtype),
             "one-column shift": _shift(good),
             "another row's bias": (ref - bias.double() + _shift(bias).double()).to(dtype)}
    _judge({"fp32 accumulate of the rounded tile": good}, wrong, ref, "forward", dtype=dtype, mag=mag, inner=dtype)

    g_all = (dy.double().T @ x.double()) * s
    g = g_all * mask
    g_tile = g.to(dtype).float()  # the dab kernel's G tile, rounded to the dtype for the tensor cores
    grads = {"dA": (bb.double().T, g, bb.double().T @ g_all, (bb.float().T @ g_tile).to(dtype)),
             "dB": (g, a.double().T, g_all @ a.double().T, (g_tile @ a.float().T).to(dtype))}
    for name, (left, right, unmasked, good) in grads.items():
        ref, mag = ref_linear(left, right.T), mag_linear(left, right.T)  # as helpers.assert_matmul
        wrong = {"zero gradient": torch.zeros_like(good), "one unwritten element": _poison_one(good),
                 "gradient of the unmasked update": unmasked.to(dtype)}
        if good.shape[-1] > 1:
            wrong["one-column shift"] = _shift(good)
        _judge({"fp32 accumulate of the rounded G tile": good}, wrong, ref, name, dtype=dtype, mag=mag, inner=dtype)

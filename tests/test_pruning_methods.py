"""Per-layer pruning criteria against independent references (float64)."""
import pytest
import torch
import torch.nn as nn

from sparselora.families import custom_family
from sparselora.format import SparsityError, check_nm
from sparselora.pruning import magnitude_mask, parse_pattern, prune, sparsegpt_prune

from helpers import OneLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ----------------------------------------------------------------------------- references

def ref_sparsegpt(W, H, pattern, percdamp, blocksize, given=None):
    """Slow, plain OBS, column by column, float64, with explicit inverses of the Hessian of
    the not-yet-processed columns (no Cholesky, no lazy updates). Mask selection as in the
    SparseGPT paper: saliency w^2 / [H_F^-1]_00, chosen per column block (unstructured, the
    block's quota spreading the layer-wide rounding) or per N:M group when reaching it; or the
    ``given`` mask throughout."""
    p = parse_pattern(pattern)
    W = W.clone().double()
    H = H.clone().double()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    inv_rows = [torch.linalg.inv(H[j:, j:])[0] for j in range(cols)]  # row 0 of (H_F)^-1, F = {j..}
    d = torch.tensor([r[0].item() for r in inv_rows], dtype=torch.float64)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    done = 0
    for j in range(cols):
        if given is not None:
            keep[:, j] = given[:, j]
        elif not p.is_nm and j % blocksize == 0:
            end = min(j + blocksize, cols)
            quota = round(p.ratio * rows * end) - done
            sal = (W[:, j:end] ** 2 / d[j:end]).flatten()
            idx = torch.argsort(sal)[:quota]  # continuous random data: no ties
            blk = torch.ones(rows * (end - j), dtype=torch.bool)
            blk[idx] = False
            keep[:, j:end] = blk.reshape(rows, end - j)
            done += quota
        if given is None and p.is_nm and j % p.m == 0:
            sal = W[:, j:j + p.m] ** 2 / d[j:j + p.m]
            low = torch.argsort(sal, dim=1)[:, : p.m - p.n]
            grp = torch.ones(rows, p.m, dtype=torch.bool)
            grp.scatter_(1, low, False)
            keep[:, j:j + p.m] = grp
        for r in range(rows):
            if not keep[r, j]:
                W[r, j:] -= W[r, j] / inv_rows[j][0] * inv_rows[j]
        W[:, j] = torch.where(keep[:, j], W[:, j], torch.zeros(()))
    return W, keep

def _layer(rows, cols, tokens=96, seed=0, dead_col=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    # correlated inputs with uneven channel scales, as real activations have
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(cols, cols, generator=g, dtype=torch.float64))
    X = X * torch.rand(cols, generator=g, dtype=torch.float64).mul(3).add(0.1)
    if dead_col is not None:
        X[:, dead_col] = 0
    return W, X.t() @ X

# ----------------------------------------------------------------------------- SparseGPT

@pytest.mark.parametrize("pattern,blocksize", [("2:4", 16), ("4:8", 8), (0.5, 16), (0.3, 128), ("2:4", 128)])
def test_sparsegpt_matches_plain_obs_reference(pattern, blocksize, seed):
    W, H = _layer(12, 48, seed=seed, dead_col=5)
    new, keep = sparsegpt_prune(W, H, pattern, percdamp=0.01, blocksize=blocksize)
    ref_w, ref_keep = ref_sparsegpt(W, H, pattern, 0.01, blocksize if not parse_pattern(pattern).is_nm else 10**9)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new, ref_w, rtol=1e-9, atol=1e-9)
    assert (new[~keep] == 0).all()
    p = parse_pattern(pattern)
    if p.is_nm:
        check_nm(new, p.n, p.m)
        assert (keep.reshape(12, -1, p.m).sum(-1) == p.n).all()  # exactly N kept per group
    else:
        assert (~keep).sum().item() == round(p.ratio * keep.numel())
    # the OBS update must actually reduce the output error versus zeroing the same weights
    err_obs = torch.trace((new - W) @ H @ (new - W).t())
    err_zero = torch.trace((W * keep - W) @ H @ (W * keep - W).t())
    assert err_obs < err_zero

def test_sparsegpt_float32_close_to_float64_reference(seed):
    W, H = _layer(16, 64, seed=seed)
    new, keep = sparsegpt_prune(W.float(), H.float(), "2:4", blocksize=32)
    ref_w, ref_keep = ref_sparsegpt(W, H, "2:4", 0.01, 32)
    assert new.dtype == torch.float32
    agree = (keep == ref_keep).float().mean().item()
    assert agree > 0.99, agree
    if agree == 1.0:
        torch.testing.assert_close(new.double(), ref_w, rtol=1e-3, atol=1e-4)

# ----------------------------------------------------------------------------- Wanda / magnitude


def test_wanda_hand_checked():
    # |W| * ||x_j||: x has column norms [0.1, 10, 1, 2] (one token), so
    # row 0 |W|=[4,1,2,3] -> scores [0.4, 10, 2, 6]  -> 2:4 keeps columns 1, 3
    # row 1 |W|=[50,0.05,1,1] -> scores [5, 0.5, 1, 2] -> keeps 0, 3 (magnitude would keep 0, 2 / 0, 3 tie)
    W = torch.tensor([[4.0, -1.0, 2.0, -3.0], [50.0, 0.05, -1.0, 1.0]])
    x = torch.tensor([[0.1, -10.0, 1.0, 2.0]])
    m = OneLinear(W)
    prune(m, "wanda", "2:4", calib=[{"x": x}], family=custom_family(language=["lin"]), progress=False)
    expected = torch.tensor([[False, True, False, True], [True, False, False, True]])
    assert torch.equal(m.lin.sparse_mask, expected)
    assert torch.equal(m.lin.weight, W * expected)

@pytest.mark.parametrize("pattern", ["2:4", "4:8", 0.5, 0.37])
def test_wanda_matches_formula_random(pattern, seed):
    W = torch.randn(8, 64)
    xs = [torch.randn(3, 5, 64) * torch.rand(64) * 4 for _ in range(2)]  # two batches, 3x5 tokens each
    m = OneLinear(W)
    rep = prune(m, "wanda", pattern, calib=[{"x": x} for x in xs], family=custom_family(language=["lin"]), progress=False)
    X = torch.cat([x.reshape(-1, 64) for x in xs]).double()
    score = W.double().abs() * X.pow(2).sum(0).sqrt()
    p = parse_pattern(pattern)
    if p.is_nm:
        g = score.reshape(8, -1, p.m)
        thr = g.sort(-1, descending=True).values[..., p.n - 1: p.n]
        expected = (g >= thr).reshape(8, 64)
    else:
        k = round(p.ratio * 64)
        thr = score.sort(1).values[:, k - 1: k]
        expected = score > thr
        assert ((~m.lin.sparse_mask).sum(1) == k).all()  # exactly per row
    assert torch.equal(m.lin.sparse_mask, expected)
    assert torch.equal(m.lin.weight, W * expected)
    assert abs(rep.rows[0].sparsity - (1 - expected.float().mean().item())) < 1e-9

@pytest.mark.parametrize("pattern", ["2:4", "4:8", 0.5, 0.25])
def test_magnitude_exact_counts(pattern, seed):
    W = torch.randn(16, 64)
    keep = magnitude_mask(W, pattern)
    p = parse_pattern(pattern)
    if p.is_nm:
        assert (keep.reshape(16, -1, p.m).sum(-1) == p.n).all()
        check_nm(W * keep, p.n, p.m)
    else:
        assert (~keep).sum().item() == round(p.ratio * W.numel())
        assert W.abs()[keep].min() >= W.abs()[~keep].max()  # layer-wide threshold

# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "1:1", "4:2", "0:4", "abc", float("nan")])
def test_bad_patterns(bad):
    with pytest.raises(SparsityError):
        parse_pattern(bad)

def test_pattern_must_divide_layer_named():
    m = OneLinear(torch.randn(8, 12))
    with pytest.raises(SparsityError, match=r"lin.*in_features=12.*M=8"):
        prune(m, "magnitude", "4:8", family=custom_family(language=["lin"]), progress=False)
    assert m.lin.weight.abs().min() > 0 and not hasattr(m.lin, "sparse_mask")  # nothing touched

def test_nan_weight_named_and_nothing_modified():
    W = torch.randn(8, 16)
    W[3, 5] = float("nan")
    m = OneLinear(W)
    with pytest.raises(SparsityError, match=r"'lin'.*NaN"):
        prune(m, "wanda", "2:4", calib=[{"x": torch.randn(4, 16)}], family=custom_family(language=["lin"]), progress=False)
    assert not hasattr(m.lin, "sparse_mask")

def test_nan_calibration_named():
    m = OneLinear(torch.randn(8, 16))
    x = torch.randn(4, 16)
    x[1, 2] = float("nan")
    with pytest.raises(SparsityError, match=r"calibration input of layer lin contains NaN"):
        prune(m, "sparsegpt", "2:4", calib=[{"x": x}], family=custom_family(language=["lin"]), progress=False)

def test_unknown_model_needs_prefixes():
    with pytest.raises(ValueError, match="unknown model family"):
        prune(OneLinear(torch.randn(8, 16)), "magnitude", "2:4", progress=False)

def test_calibration_required():
    with pytest.raises(ValueError, match="calibration data"):
        prune(OneLinear(torch.randn(8, 16)), "wanda", "2:4", family=custom_family(language=["lin"]), progress=False)

def test_calibration_batches_through_a_processor():
    from sparselora.pruning import calibration_batches

    calls = []

    def processor(images=None, text=None, return_tensors=None):  # stands in for a transformers processor
        calls.append((len(images), len(text), return_tensors))
        return {"x": torch.randn(len(text), 16)}

    batches = list(calibration_batches(processor, images=[0, 1, 2], prompts=["a", "b", "c"], batch_size=2))
    assert calls == [(2, 2, "pt"), (1, 1, "pt")]
    m = OneLinear(torch.randn(8, 16))
    prune(m, "wanda", "2:4", calib=batches, family=custom_family(language=["lin"]), progress=False)
    check_nm(m.lin.weight, 2, 4)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        list(calibration_batches(processor, images=[0, 1, 2], prompts=["a", "b"]))


def _direct_refit(w0, h, keep):
    """float64 per-row solve of H_SS w_S = (H w0)_S (the reference the CG refit must reach)."""
    out = torch.zeros_like(w0)
    for i in range(w0.shape[0]):
        s = keep[i].nonzero().squeeze(1)
        out[i, s] = torch.linalg.solve(h[s][:, s], (h @ w0[i])[s])
    return out


@pytest.mark.parametrize("pattern", ["2:4", 0.5])
def test_sparsegpt_refit_reaches_the_per_row_optimum(pattern, seed):
    k, n = 32, 12
    x = torch.randn(200, k, dtype=torch.float64) @ torch.randn(k, k, dtype=torch.float64)  # correlated inputs
    w = torch.randn(n, k, dtype=torch.float64)
    h = x.T @ x
    base, keep = sparsegpt_prune(w, h, pattern)
    new, keep2 = sparsegpt_prune(w, h, pattern, refit_iters=k)  # CG: exact in <= |support| steps
    assert torch.equal(keep, keep2) and not new[~keep].any()
    hd = h + 0.01 * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)  # sparsegpt_prune's dampening
    ref = _direct_refit(w, hd, keep)
    assert (new - ref).norm() <= 1e-8 * ref.norm(), (new - ref).norm() / ref.norm()

    def err(v):  # the layer's output error on the calibration inputs
        return ((v - w) @ hd @ (v - w).T).diagonal().sum().item()

    assert err(new) < err(base)  # SparseGPT's own kept weights are not the optimum for its mask


def test_refit_iters_checked():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(SparsityError, match="refit_iters"):
        sparsegpt_prune(w, h, "2:4", refit_iters=-1, name="layer.q")


def test_prune_refit_only_for_sparsegpt():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="refit_iters is a SparseGPT option"):
        prune(model, "wanda", "2:4", calib=[torch.randn(2, 8)], family=custom_family(language=["0"]), refit_iters=3)


# ----------------------------------------------------------------------------- given masks

def _random_nm(rows, cols, n, m, g=None):
    scores = torch.rand(rows, cols // m, m, generator=g)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(2, scores.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", 0.5])
def test_sparsegpt_compensates_for_a_given_mask(pattern, seed):
    W, H = _layer(10, 48, seed=seed)
    p = parse_pattern(pattern)
    given = _random_nm(10, 48, p.n, p.m) if p.is_nm else torch.rand(10, 48).argsort(1) >= 24
    new, keep = sparsegpt_prune(W, H, pattern, blocksize=16, keep=given)
    ref_w, _ = ref_sparsegpt(W, H, pattern, 0.01, 10**9, given=given)
    assert torch.equal(keep, given)
    torch.testing.assert_close(new, ref_w, rtol=1e-9, atol=1e-9)
    assert (new[~given] == 0).all()

    def err(v):
        return ((v - W) @ H @ (v - W).T).diagonal().sum().item()

    assert err(new) < err(W * given)  # the compensation helps over just masking


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_prune_with_given_masks(seed):
    model = TwoLinears().double()
    calib = [{"x": torch.randn(4, 16, dtype=torch.float64)} for _ in range(3)]
    fam = custom_family(language=["a", "b"])
    given = {"a": _random_nm(16, 16, 2, 4), "b": _random_nm(8, 16, 2, 4)}
    for method in ("sparsegpt", "wanda", "magnitude"):
        m = TwoLinears().double()
        m.load_state_dict(model.state_dict())
        report = prune(m, method, "2:4", calib=calib, family=fam, progress=False, masks=given)
        for name in given:
            lin, dense = m.get_submodule(name), model.get_submodule(name).weight.detach()
            assert torch.equal(lin.sparse_mask, given[name]), (method, name)
            assert not lin.weight[~given[name]].any()
            if method != "sparsegpt":  # applied as is
                torch.testing.assert_close(lin.weight, dense * given[name])
            else:  # compensated: the kept weights moved
                assert not torch.equal(lin.weight, dense * given[name])
        assert all(r.method == f"{method}(given mask)" for r in report.rows), [r.method for r in report.rows]


@pytest.mark.parametrize("masks,match", [
    ({"c": torch.ones(16, 16, dtype=torch.bool)}, "does not prune"),
    ({"a": torch.ones(16, 16, dtype=torch.bool)}, "exactly 2 of every 4"),
    ({"a": torch.ones(8, 16, dtype=torch.bool)}, "shape"),
    ({"a": torch.ones(16, 16)}, "torch.bool"),
])
def test_prune_given_masks_checked(masks, match):
    model = TwoLinears()
    before = model.a.weight.detach().clone()
    with pytest.raises(SparsityError, match=match):
        prune(model, "sparsegpt", "2:4", calib=[{"x": torch.randn(2, 16)}], family=custom_family(language=["a", "b"]),
              masks=masks, progress=False)
    assert torch.equal(model.a.weight, before)  # nothing modified

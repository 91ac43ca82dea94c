"""ECoFLaP layer-wise ratios: allocation meets the target, respects bounds, follows importance."""
import pytest
import torch
import torch.nn as nn

from sparselora.families import custom_family
from sparselora.format import SparsityError
from sparselora.pruning import prune
from sparselora.pruning.ecoflap import allocate_ratios, zeroth_order_scores
from sparselora.tiny_models import build, example_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.mark.parametrize("target,hi,lo", [(0.5, 0.6, 0.0), (0.5, 0.9, 0.2), (0.3, 0.35, 0.1), (0.7, 0.8, 0.0)])
def test_allocation_meets_target_and_bounds(target, hi, lo, seed):
    names = [f"l{i}" for i in range(20)]
    imp = {n: float(v) for n, v in zip(names, torch.rand(20).pow(3) * 10)}
    sizes = {n: int(v) for n, v in zip(names, torch.randint(100, 5000, (20,)))}
    r = allocate_ratios(imp, sizes, target, max_ratio=hi, min_ratio=lo)
    n = sum(sizes.values())
    assert abs(sum(r[k] * sizes[k] for k in names) / n - target) < 1e-9
    assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in r.values())
    # more important never pruned more
    by_imp = sorted(names, key=lambda k: imp[k])
    assert all(r[a] >= r[b] - 1e-12 for a, b in zip(by_imp, by_imp[1:]))
    assert max(r.values()) - min(r.values()) > 0.01  # not just uniform

def test_allocation_bad_bounds():
    with pytest.raises(SparsityError):
        allocate_ratios({"a": 1.0}, {"a": 10}, 0.5, max_ratio=0.4)
    with pytest.raises(SparsityError):
        allocate_ratios({"a": 1.0}, {"a": 10}, 1.0)

class TwoPaths(nn.Module):
    """y = big(x) + 0.01 * small(x): ``big`` matters ~100x more."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(32, 32)
        self.small = nn.Linear(32, 32)

    def forward(self, x):
        return self.big(x) + 0.01 * self.small(x)

def test_zeroth_order_scores_rank_importance_and_restore_weights():
    torch.manual_seed(0)
    m = TwoPaths()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batches = [{"x": torch.randn(16, 32)} for _ in range(2)]
    s = zeroth_order_scores(m, {"big": [m.big], "small": [m.small]}, batches, samples=2, progress=False)
    assert s["big"] > 20 * s["small"] > 0
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    rep = prune(m, "wanda", 0.5, calib=batches, ratios="ecoflap", ecoflap_granularity="layer", ecoflap_max=0.8,
                family=custom_family(language=["big", "small"]), progress=False)
    assert rep["big"].sparsity < 0.5 < rep["small"].sparsity <= 0.8 + 0.5 / 32  # max, within per-row rounding
    assert abs(rep.total_sparsity - 0.5) <= 1 / 32

def test_user_loss_fn_is_used():
    torch.manual_seed(0)
    m = TwoPaths()
    batches = [{"x": torch.randn(16, 32)}]
    # a loss that only looks at a quantity `small` dominates -> small must become the important one
    s = zeroth_order_scores(m, {"big": [m.big], "small": [m.small]}, batches,
                            loss_fn=lambda out, b: m.small(b["x"]).pow(2).mean(), progress=False)
    assert s["small"] > 100 * s["big"]

@pytest.mark.parametrize("fam", ["llava", "siglip"])
def test_ecoflap_on_tiny_vlm(fam):
    m = build(fam)
    batches = [example_inputs(fam, m, seed=s) for s in range(2)]
    hi = 0.65
    rep = prune(m, "wanda", 0.5, calib=batches, strategy={"vision": 0.4, "language": 0.5}, ratios="ecoflap",
                ecoflap_max=hi, ecoflap_samples=1, progress=False)
    for part, target in (("vision", 0.4), ("language", 0.5)):
        rows = [r for r in rep.rows if r.part == part]
        n = sum(r.numel for r in rows)
        asked = sum(r.target * r.numel for r in rows) / n
        got = sum(r.sparsity * r.numel for r in rows) / n
        assert abs(asked - target) < 1e-9
        # per-row rounding of each layer's ratio: at most half a weight per row
        assert abs(got - target) <= max(0.5 / r.shape[1] for r in rows) + 1e-12
        assert all(r.sparsity <= hi + 0.5 / r.shape[1] for r in rows)
        assert len({r.pattern for r in rows}) > 1  # really layer-wise
    assert len(rep.meta["ecoflap_scores"]) >= 4
    for name, mod in m.named_modules():
        if name in rep.names():
            assert (mod.weight[~mod.sparse_mask] == 0).all()
    m(**batches[0])

def test_ecoflap_rejects_nm():
    m = build("clip")
    with pytest.raises(SparsityError, match="unstructured"):
        prune(m, "wanda", "2:4", calib=[example_inputs("clip", m)], ratios="ecoflap", progress=False)

"""Pruning tiny random VLMs of every family: strategies, patterns, sequential calibration, memory."""
import pytest
import torch
import torch.nn as nn

from sparselora.families import DEFAULT_SKIP_PARTS, get_family, linear_layers
from sparselora.format import SparsityError, check_nm
from sparselora.pruning import apply_mask, magnitude_mask, parse_pattern, prune, sparsegpt_prune, wanda_mask
from sparselora.pruning import calibrate
from sparselora.pruning.calibrate import find_block_lists, run_model
from sparselora.tiny_models import BUILDERS, build, example_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = sorted(BUILDERS)
GENERATIVE = {"llava", "blip-2", "qwen2-vl", "idefics3", "paligemma", "instructblip", "qwen2.5-vl", "smolvlm", "gemma3"}
ENCODERS = {"clip", "siglip"}  # contrastive dual encoders: no generate()

def test_every_family_is_generative_or_encoder():
    # a new builder must say which it is, so that _runs() cannot silently skip its generate()
    assert GENERATIVE | ENCODERS == set(FAMILIES) and not GENERATIVE & ENCODERS

def _batches(fam, m, n=2):
    return [example_inputs(fam, m, batch=2, seed=s) for s in range(n)]

def _mha_children(model):
    return {f"{n}.{c}" for n, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)
            for c, sub in mod.named_modules() if c and isinstance(sub, nn.Linear)}

def _expected(model, per_part):
    """Linear name -> pattern, from the family registry (parts) minus MHA children."""
    mha = _mha_children(model)
    out = {}
    for part, pat in per_part.items():
        for n in linear_layers(model, [part]):
            if n not in mha:
                out[n] = parse_pattern(pat)
    return out

def _check_pruned(model, before, expected):
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight.detach()
        if name in expected:
            p = expected[name]
            mask = mod.sparse_mask
            assert mask.dtype == torch.bool and mask.shape == w.shape
            assert (w[~mask] == 0).all(), name
            if p.is_nm:
                check_nm(mask, p.n, p.m, name)
                check_nm(w, p.n, p.m, name)
                assert (mask.reshape(w.shape[0], -1, p.m).sum(-1) == p.n).all(), name  # exactly N kept
            else:
                assert (~mask).sum().item() == round(p.ratio * w.numel()), name
        else:
            assert not hasattr(mod, "sparse_mask"), name
            assert torch.equal(w, before[name + ".weight"]), f"{name} was modified"
    for k, v in model.state_dict().items():  # non-Linear parameters and buffers untouched bit-exactly
        if not any(k == n + ".weight" for n in expected):
            assert torch.equal(v, before[k]), k

def _runs(fam, m, batches):
    out = run_model(m, batches[0])
    for t in out.values() if hasattr(out, "values") else [out]:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            assert torch.isfinite(t).all()
    if fam in GENERATIVE:
        kw = dict(batches[0])
        gen = m.generate(**kw, max_new_tokens=2, do_sample=False)
        assert gen.shape[0] == kw["input_ids"].shape[0]

STRATEGIES = [
    ("both", "2:4", {"vision": "2:4", "language": "2:4"}),
    ("language", "4:8", {"language": "4:8"}),
    ("vision", 0.5, {"vision": 0.5}),
]

@pytest.mark.parametrize("fam", FAMILIES)
def test_strategies_prune_exactly_intended_modules(fam):
    for strategy, pattern, per_part in STRATEGIES + [({"vision": "4:8", "language": 0.3, "projector": "2:4"}, None,
                                                     {"vision": "4:8", "language": 0.3, "projector": "2:4"})]:
        m = build(fam)
        if "projector" in per_part and not linear_layers(m, ["projector"]):
            per_part = {k: v for k, v in per_part.items() if k != "projector"}
            strategy = dict(per_part)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        rep = prune(m, "magnitude", pattern, strategy=strategy, progress=False)
        expected = _expected(m, per_part)
        assert set(rep.names()) == set(expected), (strategy, set(rep.names()) ^ set(expected))
        _check_pruned(m, before, expected)
    _runs(fam, m, _batches(fam, m))

@pytest.mark.parametrize("fam", FAMILIES)
def test_default_skips(fam):
    m = build(fam)
    rep = prune(m, "magnitude", "2:4", strategy="both", progress=False)
    fam_ = get_family(m)
    assert not {fam_.classify(n) for n in rep.names()} & set(DEFAULT_SKIP_PARTS)
    assert not set(rep.names()) & _mha_children(m)
    assert not any(n.endswith("lm_head") for n in rep.names())

def _naive_sequential(model, method, pattern, batches):
    """Independent reference for sequential calibration: for each block (in run order),
    run the WHOLE model with hooks on that block's targets, prune them, go on."""
    from sparselora.pruning.strategy import select_targets

    targets = select_targets(model, "both", pattern)
    lists, loose = find_block_lists(model, targets)
    order = []
    hs = [bl.module[0].register_forward_pre_hook(lambda *a, n=bl.name: order.append(n)) for bl in lists]
    run_model(model, batches[0])
    [h.remove() for h in hs]
    lists.sort(key=lambda bl: order.index(bl.name))
    groups = [names for bl in lists for names in bl.targets if names] + ([loose] if loose else [])
    for names in groups:
        xs = {n: [] for n in names}
        hs = [targets[n].module.register_forward_hook(lambda mod, i, o, n=n: xs[n].append(i[0].reshape(-1, i[0].shape[-1]).double()))
              for n in names]
        with torch.no_grad():
            for b in batches:
                run_model(model, b)
        [h.remove() for h in hs]
        for n in names:
            X = torch.cat(xs[n])
            w = targets[n].module.weight.detach()
            if method == "wanda":
                keep, new = wanda_mask(w, X.pow(2).sum(0), pattern), None
            else:
                new, keep = sparsegpt_prune(w, X.t() @ X, pattern)
            apply_mask(targets[n].module, keep, new)

@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_calibration_matches_naive_full_model_reference(fam, method):
    pattern = "2:4"
    m = build(fam)
    batches = _batches(fam, m)
    ref = build(fam)
    _naive_sequential(ref, method, pattern, batches)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rep = prune(m, method, pattern, calib=batches, strategy="both", progress=False)
    _check_pruned(m, before, _expected(m, {"vision": pattern, "language": pattern}))
    ref_mods = dict(ref.named_modules())
    agree = []
    for name in rep.names():
        a, b = dict(m.named_modules())[name], ref_mods[name]
        agree.append((a.sparse_mask == b.sparse_mask).float().mean().item())
        if method == "sparsegpt" and agree[-1] == 1.0:
            torch.testing.assert_close(a.weight, b.weight, rtol=2e-3, atol=2e-4)
    # float32 statistics summed in a different order can flip a near-tie; nothing more
    assert min(agree) > 0.97 and sum(agree) / len(agree) > 0.995, dict(zip(rep.names(), agree))
    _runs(fam, m, batches)

def test_calibration_is_block_bounded(monkeypatch):
    """At most one block's statistics objects are alive at any time (tracked by weak refs,
    so anything still referenced anywhere counts)."""
    import weakref

    fam = "llava"
    m = build(fam)
    alive = weakref.WeakValueDictionary()  # id -> object (dataclasses are unhashable)
    peak = {"n": 0}
    orig_init, orig_add = calibrate.LayerStats.__init__, calibrate.LayerStats.add

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        alive[id(self)] = self

    def add(self, x, *rest):
        peak["n"] = max(peak["n"], len(alive))
        return orig_add(self, x, *rest)

    monkeypatch.setattr(calibrate.LayerStats, "__init__", init)
    monkeypatch.setattr(calibrate.LayerStats, "add", add)
    rep = prune(m, "sparsegpt", "2:4", calib=_batches(fam, m), strategy="both", progress=False)
    lists, loose = find_block_lists(m, rep.names())
    per_block = max(len(t) for bl in lists for t in bl.targets)
    assert len(rep.rows) == 26 and per_block == 7
    assert peak["n"] == per_block, peak
    assert rep.meta["peak_live_layer_stats"] == per_block

def test_nan_in_calibration_names_layer():
    m = build("llava")
    b = _batches("llava", m, 1)
    b[0]["pixel_values"][0, 0, 3, 3] = float("nan")
    with pytest.raises(SparsityError, match=r"calibration input of layer model\.vision_tower\.encoder\.layers\.0\.\S+ contains NaN"):
        prune(m, "wanda", "2:4", calib=b, strategy="both", progress=False)

def test_nan_block_output_named():
    m = build("llava")
    with torch.no_grad():  # a non-Linear weight in block 0 of the language model turns its output NaN
        m.model.language_model.layers[0].post_attention_layernorm.weight[0] = float("nan")
    with pytest.raises(SparsityError, match=r"language_model\.layers\.0|language_model\.layers\.1"):
        prune(m, "wanda", "2:4", calib=_batches("llava", m), strategy="language", progress=False)

def test_calibration_must_reach_the_part():
    m = build("clip")
    b = [{"pixel_values": example_inputs("clip", m)["pixel_values"]}]  # no text: text tower never runs
    with pytest.raises((SparsityError, ValueError)):
        prune(m, "wanda", "2:4", calib=b, strategy="language", progress=False)

def test_report_markdown_and_json(tmp_path):
    import json

    m = build("qwen2-vl")
    rep = prune(m, "wanda", 0.5, calib=_batches("qwen2-vl", m), strategy="language", progress=False)
    md = rep.to_markdown()
    assert md.count("\n| model.language_model.layers.") == len(rep.rows) == 14
    d = json.loads(rep.to_json(tmp_path / "r.json").read_text())
    assert len(d["rows"]) == 14 and abs(d["total_sparsity"] - 0.5) < 1e-9
    assert {"name", "part", "method", "pattern", "sparsity", "shape", "seconds"} <= set(d["rows"][0])
    assert not list(tmp_path.glob("*.tmp"))

class ToyStack(nn.Module):
    """A custom (non-transformers) model: embedding, a ModuleList of MLP blocks, a head."""

    def __init__(self, scale_between=1.0):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(3))
        self.head = nn.Linear(32, 8)
        self.scale_between = scale_between

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h) * self.scale_between  # a non-sequential-stack quirk when scale != 1
        return self.head(h)

def test_custom_model_with_prefixes_sequential_and_warning():
    from sparselora.families import custom_family

    fam = custom_family(language=["blocks", "inp"], head=["head"])
    torch.manual_seed(0)
    m = ToyStack()
    calib = [{"x": torch.randn(4, 10, 16)} for _ in range(3)]
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")  # a plain stack: no warning
        rep = prune(m, "sparsegpt", "4:8", calib=calib, family=fam, progress=False)
    assert rep.names() == ["inp"] + [f"blocks.{i}.{j}" for i in range(3) for j in (0, 2)]  # head skipped by default
    assert not hasattr(m.head, "sparse_mask")
    for n in rep.names():
        check_nm(dict(m.named_modules())[n].weight, 4, 8, n)
    m2 = ToyStack(scale_between=3.0)
    with pytest.warns(UserWarning, match="not a plain sequential stack"):
        prune(m2, "wanda", "2:4", calib=calib, family=fam, progress=False)


def test_bf16_model_sparsegpt_and_no_autograd_graph():
    m = build("llava", dtype=torch.bfloat16)
    batches = _batches("llava", m)
    rep = prune(m, "sparsegpt", "2:4", calib=batches, strategy="language", progress=False)
    for n in rep.names():
        mod = dict(m.named_modules())[n]
        assert mod.weight.dtype == torch.bfloat16 and mod.weight.grad is None
        check_nm(mod.weight, 2, 4, n)
    assert torch.is_grad_enabled()  # restored
    _runs("llava", m, batches)

"""sparsify / unsparsify: every family, generate(), bad input, torch.compile."""
import copy

import pytest
import torch
import torch.nn as nn

from sparselora import SparseLinear
from sparselora.backends import Backend, choose_backend, register_backend
from sparselora.backends import base as backend_base
from sparselora.families import linear_layers
from sparselora.format import SparsityError, nm_mask
from sparselora.patch import SparsifyReport, sparse_layers, sparsify, unsparsify
from sparselora.tiny_models import BUILDERS, build, example_inputs

from helpers import REL_TOL, assert_close, assert_linear, pruned_mlp


def prune_24(model, parts=("vision", "language", "projector")):
    """Magnitude 2:4 with the agreed convention: weight zeroed outside the mask + `sparse_mask` buffer."""
    masks = {}
    for name, lin in linear_layers(model, parts).items():
        if lin.in_features % 4:
            continue
        mask = nm_mask(lin.weight.detach().abs(), name=name)
        with torch.no_grad():
            lin.weight.mul_(mask)
        lin.register_buffer("sparse_mask", mask, persistent=False)
        masks[name] = mask
    return masks


def _out(o):
    for k in ("logits", "logits_per_image", "last_hidden_state"):
        v = getattr(o, k, None)
        if v is not None:
            return v
    raise AssertionError(f"no output tensor in {type(o).__name__}")


def _to64(inputs):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_round_trip_every_family(family, seed):
    model = build(family, seed=seed % 10_000)
    masks = prune_24(model)
    assert masks
    inputs = example_inputs(family, model, seed=seed % 10_000)
    with torch.no_grad():
        ref32 = _out(model(**inputs)).clone()
        ref64 = _out(copy.deepcopy(model).double()(**_to64(inputs)))

    report = sparsify(model)
    assert isinstance(report, SparsifyReport)
    swapped = sparse_layers(model)
    # every masked layer that is not inside nn.MultiheadAttention was packed
    mha_out = {n for n in masks if n.endswith("out_proj") and isinstance(model.get_submodule(n.rpartition(".")[0]), nn.MultiheadAttention)}
    assert set(swapped) == set(masks) - mha_out
    for n in mha_out:
        assert type(model.get_submodule(n)) is not SparseLinear and report[n].action == "dense" and "MultiheadAttention" in report[n].reason
    for n, m in swapped.items():
        assert torch.equal(m.mask(), masks[n]), n
        assert report[n].action == "sparse" and report[n].backend and report[n].resident_bytes < report[n].dense_bytes

    with torch.no_grad():
        out = _out(model(**inputs))
    # the packed model is the masked dense model: compare with its float64 evaluation
    assert_close(out, ref64, f"{family}: packed model vs float64")
    torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5)

    if family not in ("clip", "siglip"):
        gen_kw = dict(max_new_tokens=3, do_sample=False)
        sparse_tokens = model.generate(**inputs, **gen_kw)
        unsparsify(model)
        dense_tokens = model.generate(**inputs, **gen_kw)
        assert torch.equal(sparse_tokens, dense_tokens)
    else:
        unsparsify(model)
    # back to dense: nn.Linear, same masked weights, sparse_mask kept, same outputs
    assert not sparse_layers(model)
    for n, mask in masks.items():
        lin = model.get_submodule(n)
        assert type(lin) in (nn.Linear,) or n in mha_out
        assert torch.equal(lin.sparse_mask, mask)
    with torch.no_grad():
        torch.testing.assert_close(_out(model(**inputs)), ref32, rtol=1e-5, atol=1e-5)
    # and again (sparsify is repeatable after unsparsify)
    assert len(sparsify(model).sparse) == len(swapped)


def test_report_contents():
    model = build("llava")
    prune_24(model, parts=("language",))
    report = sparsify(model)
    t = report.totals()
    assert t["sparse"] == len(report.sparse) == len(report.rows) > 0
    assert 0.5 < t["ratio"] < 0.6  # fp32: values are half, meta adds 1/32 of the dense bytes
    md = report.to_markdown()
    assert all(n in md for n in report.sparse)
    assert "sparsified" in report.summary() and report.to_dict()["totals"]["sparse"] == t["sparse"]
    assert all(r.part == "language" for r in report.rows)


def test_names_must_be_24_and_nothing_changes_on_error():
    model = build("llava")
    layers = linear_layers(model, ["language"])
    names = list(layers)
    good, bad = names[0], names[1]
    lin = layers[good]
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight.abs()))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(SparsityError, match=bad.replace(".", r"\.")):
        sparsify(model, names=[good, bad])
    # validation happens before the first swap: the good layer was not packed either
    assert not sparse_layers(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    report = sparsify(model, names=[good])
    assert report.sparse == [good] and isinstance(model.get_submodule(good), SparseLinear)


def test_weight_changed_outside_mask_is_an_error():
    model = build("llava")
    masks = prune_24(model, parts=("language",))
    name = next(iter(masks))
    lin = model.get_submodule(name)
    with torch.no_grad():
        lin.weight[0, (~masks[name][0]).nonzero()[0, 0]] = 0.5
    with pytest.raises(SparsityError, match=f"'{name}'.*outside its sparse_mask"):
        sparsify(model)
    assert not sparse_layers(model)


def test_unknown_model_parts_default_and_misaligned_layer():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 16)
            self.odd = nn.Linear(6, 16)  # in_features % 4 != 0: no 2:4 groups
            self.c = nn.Linear(16, 8)

        def forward(self, x):
            return self.c(self.a(x)[..., :16])

    toy = Toy()
    with torch.no_grad():
        toy.a.weight.mul_(nm_mask(toy.a.weight.abs()))
        toy.c.weight.mul_(nm_mask(toy.c.weight.abs()))
    report = sparsify(toy, names=["a", "odd", "c"])
    assert report.sparse == ["a", "c"]
    assert report["odd"].action == "dense" and "multiple of 4" in report["odd"].reason
    assert type(toy.odd) is nn.Linear and report["odd"].part == "other"
    with pytest.raises(SparsityError, match="'odd'.*multiple of 4"):
        sparsify(Toy(), names=["odd"], on_unsupported="raise")
    with pytest.raises(KeyError, match="no module named"):
        sparsify(toy, names=["nope"])
    with pytest.raises(KeyError, match="unknown backend"):
        sparsify(Toy(), backend="no-such-backend")


class _Only64(Backend):
    """Test backend: runs only layers with in_features % 64 == 0 (like an aligned GPU kernel)."""

    name = "test-only-64"
    priority = -100  # never preferred by auto

    def unsupported_reason(self, device, dtype, out_features, in_features):
        return None if in_features % 64 == 0 else f"in_features={in_features} not a multiple of 64"

    def linear(self, x, packed, extra, bias):
        from sparselora.ops import reference_sparse24_linear

        return reference_sparse24_linear(x, packed.values, packed.meta, bias)


def test_explicit_backend_that_cannot_take_a_layer_leaves_it_dense():
    register_backend(_Only64())
    try:
        model = _pruned_mlp(nn.Linear(64, 32), nn.Linear(32, 16))
        x = torch.randn(3, 64)
        ref = model(x)
        report = sparsify(model, backend="test-only-64")
        assert report.sparse == ["0"] and report["0"].backend == "test-only-64"
        assert report["2"].action == "dense" and "not a multiple of 64" in report["2"].reason
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)
        with pytest.raises(SparsityError, match="'2'"):
            sparsify(model, backend="test-only-64", on_unsupported="raise")
    finally:
        backend_base._REGISTRY.pop("test-only-64", None)


def test_tied_weight_left_dense():
    emb = nn.Embedding(16, 32)
    head = nn.Linear(32, 16, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    mask = nm_mask(head.weight.detach().abs())
    with torch.no_grad():
        head.weight.mul_(mask)
    head.register_buffer("sparse_mask", mask, persistent=False)
    report = sparsify(model)
    assert report["head"].action == "dense" and "tied" in report["head"].reason


def test_sparse_lora_layers_are_kept():
    from sparselora import lora
    model = build("llava")
    prune_24(model, parts=("language",))
    names = lora.add_sparse_lora(model, r=4, alpha=8)
    assert names
    report = sparsify(model)
    for n in names:
        assert report[n].action == "lora" and isinstance(model.get_submodule(n), lora.SparseLoRALinear)


def test_torch_compile_matches_eager():
    model = build("llava")
    prune_24(model, parts=("language",))
    mlp = model.model.language_model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = mlp(x).clone()
        assert len(sparsify(mlp).sparse) == 3
        compiled = torch.compile(mlp, fullgraph=True)
        out = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_llava_round_trip(dtype, seed):
    """On a GPU: packed layers (the kernel auto ranks first; sparsify's auto would leave these tiny
    layers dense by its speed policy) equal the masked dense model within the dtype's tolerance,
    and generate() runs."""
    model = build("llava", seed=seed % 10_000)
    prune_24(model)
    inputs = example_inputs("llava", model, seed=seed % 10_000)
    with torch.no_grad():
        ref64 = _out(copy.deepcopy(model).double()(**_to64(inputs)))
    model = model.to("cuda", dtype)
    cuda_inputs = {k: (v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")) for k, v in inputs.items()}
    report = sparsify(model, backend=choose_backend("cuda", dtype, 64, 64).backend.name)
    assert report.sparse
    for n, m in sparse_layers(model).items():  # each packed layer against float64 on its own input
        x = torch.randn(37, m.in_features, device="cuda", dtype=dtype)
        assert_linear(m(x), x, m.dense_weight(), m.bias, f"{n} ({m.backend.name})", dtype=dtype)
    with torch.no_grad():
        out = _out(model(**cuda_inputs)).double().cpu()
    assert torch.isfinite(out).all()
    # whole model in 16-bit (weights rounded too) vs float64: errors compound over layers, so 4x
    # the one-layer bound (measured on CPU: ‖err‖/‖ref‖ ~7e-3 in bf16, ~9e-4 in fp16)
    rel = ((out - ref64).norm() / ref64.norm()).item()
    assert rel <= 4 * REL_TOL[dtype], f"whole model ({dtype}) vs float64: ‖err‖/‖ref‖ = {rel:.2e}"
    assert model.generate(**cuda_inputs, max_new_tokens=3, do_sample=False).shape[1] == cuda_inputs["input_ids"].shape[1] + 3


class _SlowerThanDenseAt(_Only64):
    """Test backend with a 'measured' table: dense wins for 64x64 layers at M >= 100."""

    name = "test-slow-big-m"
    priority = 10_000  # auto takes it on CPU

    def dense_faster_reason(self, device, dtype, out_features, in_features, tokens=None):
        if (out_features, in_features) != (64, 64):
            return None
        if tokens is None:
            return None  # wins at some measured M
        lost = [t for t in tokens if t >= 100]
        return f"dense faster at M={lost}" if lost else None


def _pruned_mlp(first=None, second=None):
    """Linear-ReLU-Linear with both layers magnitude-pruned to 2:4 (``sparse_mask`` attached)."""
    return pruned_mlp(first or nn.Linear(64, 64), second or nn.Linear(64, 128))


def test_auto_leaves_dense_where_measurements_say_dense_is_faster(seed):
    register_backend(_SlowerThanDenseAt())
    try:
        model = _pruned_mlp()
        x = torch.randn(5, 64)
        ref = model(x)
        report = sparsify(model, tokens=[1, 8, 4096])
        assert report["0"].action == "dense" and "test-slow-big-m dense F.linear faster (measured: dense faster at M=[4096])" in report["0"].reason
        assert report["2"].action == "sparse" and report["2"].backend == "test-slow-big-m"
        assert isinstance(model[0], nn.Linear) and not isinstance(model[0], SparseLinear)
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)

        # decode only: the same layer now pays off and is swapped
        model = _pruned_mlp()
        assert sparsify(model, tokens=8).sparse == ["0", "2"]
        # no tokens: only layers that lose at every measured M stay dense (none here)
        assert sparsify(_pruned_mlp()).sparse == ["0", "2"]
        # an explicit backend is honoured even where dense is measured faster
        assert sparsify(_pruned_mlp(), backend="test-slow-big-m", tokens=4096).sparse == ["0", "2"]
        # a speed decision is not "unsupported": on_unsupported="raise" does not raise for it
        assert sparsify(_pruned_mlp(), tokens=4096, on_unsupported="raise").dense == ["0"]
        with pytest.raises(ValueError, match="tokens must be positive"):
            sparsify(_pruned_mlp(), tokens=[0])
    finally:
        backend_base._REGISTRY.pop("test-slow-big-m", None)


def test_layer_left_dense_drops_its_mask_buffer(seed):
    """A layer ``auto`` leaves dense holds no bool sparse_mask afterwards (1 byte per weight element),
    the report counts that, the mask is recoverable from the weight, and a later sparsify still
    finds the layer; keep_dense_masks=True keeps the buffer."""
    from sparselora.lora import layer_mask
    from sparselora.memory import resident_bytes

    register_backend(_SlowerThanDenseAt())
    try:
        model = _pruned_mlp()
        lin = model[0]
        mask = lin.sparse_mask.clone()
        before = resident_bytes(lin)
        assert before == (64 * 64 + 64) * 4 + 64 * 64  # fp32 weight + bias + bool mask
        x = torch.randn(5, 64)
        ref = model(x)
        report = sparsify(model, tokens=[4096])
        assert report.dense == ["0"] and model[0] is lin
        assert "sparse_mask" not in dict(lin.named_buffers()) and getattr(lin, "sparse_mask", None) is None
        assert resident_bytes(lin) == before - 64 * 64 == report["0"].dense_bytes
        assert report["0"].resident_bytes == resident_bytes(lin)
        assert report.totals()["resident_bytes"] == sum(resident_bytes(m) for m in (model[0], model[2]))
        assert "sparse_mask dropped" in report["0"].reason
        assert torch.equal(layer_mask(lin, "0"), mask)  # magnitude pruning keeps two nonzeros per group
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        # a later sparsify (decode sizes, where the backend wins) still takes the layer
        assert sparsify(model, tokens=8).sparse == ["0"]
        assert torch.equal(model[0].mask(), mask)

        kept = _pruned_mlp()
        report = sparsify(kept, tokens=[4096], keep_dense_masks=True)
        assert report.dense == ["0"] and torch.equal(kept[0].sparse_mask, nm_mask(kept[0].weight.detach().abs()))
        assert report["0"].resident_bytes == report["0"].dense_bytes + 64 * 64

        # a failing call changes nothing: the mask of a layer validated before the failure stays
        bad = _pruned_mlp()
        with torch.no_grad():
            bad[2].weight.add_(1.0)  # nonzeros outside its mask
        with pytest.raises(SparsityError, match="'2'"):
            sparsify(bad, tokens=[4096])
        assert isinstance(bad[0].sparse_mask, torch.Tensor)
    finally:
        backend_base._REGISTRY.pop("test-slow-big-m", None)

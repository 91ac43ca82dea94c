"""Layer-wise distillation (``distill(layers=...)``), the learning-rate schedule, and the default
restoration recipe on tiny VLMs: vision and language blocks are matched, merges stay exactly 2:4
with the starting mask."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from sparselora.distill import _relative_error, distill, find_blocks, lr_factor
from helpers import ResidualStack, magnitude_24_in_place
from sparselora.format import check_nm
from sparselora.lora import add_sparse_lora, merge_sparse_lora
from sparselora.tiny_models import build, example_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prune(model, parts=None):
    return magnitude_24_in_place(model, lambda name, lin: lin.in_features % 4 == 0 and (parts is None or any(p in name for p in parts)))



def test_find_blocks():
    assert find_blocks(ResidualStack(depth=3)) == ["blocks.0", "blocks.1", "blocks.2"]
    m = nn.Module()
    m.lins = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))  # bare Linears are not blocks
    m.one = nn.ModuleList([ResidualStack()])  # a single module is not a repeated block (its inner list is)
    assert find_blocks(m) == ["one.0.blocks.0", "one.0.blocks.1", "one.0.blocks.2"]


@pytest.mark.parametrize("fam", ["llava", "blip-2", "qwen2-vl"])
def test_blocks_cover_vision_and_language(fam):
    names = find_blocks(build(fam))
    assert any("vis" in n for n in names), names
    assert any("lang" in n or "text" in n for n in names), names


def test_lr_factor():
    assert [lr_factor(i, 10, "constant", 2) for i in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 12, "cosine", 2) == 1.0
    assert math.isclose(lr_factor(7, 12, "cosine", 2), 0.5)
    assert lr_factor(11, 12, "cosine", 2) < 0.03
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, "linear", 0)


def test_relative_error_skips_padding(seed):
    t = torch.randn(2, 5, 8)
    s = t + 0.1 * torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    s_bad = s.clone()
    s_bad[1, 3:] = 1e6  # padding positions: must not count
    keep = mask.bool()
    ref = ((s[keep] - t[keep]).double().pow(2).sum() / t[keep].double().pow(2).sum()).item()
    got = _relative_error(s_bad, t, {"attention_mask": mask}).item()
    assert math.isclose(got, ref, rel_tol=1e-5)
    assert _relative_error(s_bad, t, {}).item() > 1e6  # without a mask every position counts


def _padded_pair(fam, seed):
    """A tiny model of ``fam``, its SparseLoRA student, a batch whose first text ends in 2 padded
    positions, and the output compared (SigLIP's text states: it has no single default output)."""
    teacher = build(fam, seed=seed % 1000).eval()
    student = copy.deepcopy(teacher)
    _prune(student, ["layers"])
    add_sparse_lora(student, r=2)
    batch = example_inputs(fam, teacher, batch=2, seed=seed)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -2:] = 0
    out_fn = (lambda o: o.text_model_output.last_hidden_state) if fam == "siglip" else None
    return teacher, student, {**batch, "attention_mask": mask}, out_fn


@pytest.mark.parametrize("loss", ["kl", "mse", "cosine"])
def test_output_loss_skips_padding(loss, seed):
    """The final output's loss at the real tokens only: the same as on the unpadded rows (float64),
    whatever the padded positions hold; outputs the mask does not fit count every position."""
    from sparselora.distill import distill_loss

    t = torch.randn(2, 5, 8)
    s = t + 0.3 * torch.randn(2, 5, 8)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    s_bad = s.clone()
    s_bad[1, 3:] = 50.0
    ref = distill_loss(s[keep].double(), t[keep].double(), loss)
    assert distill_loss(s_bad, t, loss, keep=keep).item() == pytest.approx(ref.item(), rel=1e-5)
    assert distill_loss(s_bad, t, loss).item() != pytest.approx(ref.item(), rel=1e-2)
    flat = distill_loss(s_bad[:, :4], t[:, :4], loss, keep=keep)  # another length: every position
    assert flat.item() == pytest.approx(distill_loss(s_bad[:, :4], t[:, :4], loss).item(), rel=1e-6)


def test_distill_passes_the_real_tokens_to_the_output_loss(seed, monkeypatch):
    """distill() hands the batch's real tokens to the output loss, except for a model whose output
    reads padded positions (SigLIP)."""
    import sparselora.distill as D

    seen = []
    real = D.distill_loss
    monkeypatch.setattr(D, "distill_loss", lambda s, t, loss, temp, keep=None: (seen.append(keep), real(s, t, loss, temp, keep))[1])
    for fam, expect_mask in (("llava", True), ("siglip", False)):
        teacher, student, batch, out_fn = _padded_pair(fam, seed)
        seen.clear()
        distill(student, teacher, [batch], steps=2, progress=False, loss="mse", output_fn=out_fn)
        assert len(seen) == 2 and all((k is not None) == expect_mask for k in seen), fam
        if expect_mask:
            assert torch.equal(seen[0], batch["attention_mask"].bool())


def test_layerwise_padding_mask_reaches_text_blocks_only(seed, monkeypatch):
    """layers='blocks': each language block's error skips the text's padding; a vision block's never
    gets the text mask (its patch count could equal the text length), nor any block of SigLIP."""
    import sparselora.distill as D

    calls = []
    real = D._relative_error
    monkeypatch.setattr(D, "_relative_error", lambda s, t, b: (calls.append(b is not None), real(s, t, b))[1])
    for fam in ("llava", "siglip"):
        teacher, student, batch, out_fn = _padded_pair(fam, seed)
        calls.clear()
        distill(student, teacher, [batch], steps=1, progress=False, loss="mse", layers="blocks",
                output_fn=out_fn)
        names = find_blocks(student)
        assert len(calls) == len(names) and any("vision" in n for n in names) and any("vision" not in n for n in names)
        for n, masked in zip(names, calls):
            assert masked == (fam == "llava" and "vision" not in n), (fam, n)


def test_layerwise_distill_lowers_block_error_and_keeps_mask(seed):
    teacher = ResidualStack()
    student = copy.deepcopy(teacher)
    masks = _prune(student)
    add_sparse_lora(student, r=8, alpha=16)
    batches = [torch.randn(16, 32) for _ in range(4)]

    def block_err():  # what layers="blocks" matches: each block's own output
        with torch.no_grad():
            errs, xs, xt = [], batches[0], batches[0]
            for bs, bt in zip(student.blocks, teacher.blocks):
                ys, yt = bs(xs), bt(xt)
                errs.append(((ys - yt).pow(2).sum() / yt.pow(2).sum()).item())
                xs, xt = xs + ys, xt + yt
            return sum(errs) / len(errs)

    before = block_err()
    hist = distill(student, teacher, batches, steps=80, lr=2e-2, loss="mse", layers="blocks", schedule="cosine",
                   warmup=5, output_weight=0.0, progress=False)
    assert block_err() < 0.7 * before, (before, block_err())  # output_weight=0: only the block terms train
    assert hist["last"] < hist["first"]
    merge_sparse_lora(student)
    for name, mask in masks.items():
        lin = student.get_submodule(name)
        check_nm(lin.weight, name=name)
        assert torch.equal(lin.sparse_mask, mask) and not ((lin.weight != 0) & ~mask).any(), name
    assert not student.blocks[0][0]._forward_hooks and not teacher.blocks[0][0]._forward_hooks
    assert all(not m._forward_hooks for m in list(student.modules()) + list(teacher.modules())), "hooks left behind"


def test_bad_options_name_the_problem():
    teacher = ResidualStack()
    student = copy.deepcopy(teacher)
    _prune(student)
    add_sparse_lora(student, r=2)
    b = [torch.randn(4, 32)]
    before = {n: p.requires_grad for n, p in student.named_parameters()}
    with pytest.raises(ValueError, match="warmup"):
        distill(student, teacher, b, steps=5, warmup=5, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        distill(student, teacher, b, steps=5, schedule="linear", progress=False)
    with pytest.raises(ValueError, match="layers"):
        distill(student, teacher, b, steps=5, layers="everything", progress=False)
    with pytest.raises(ValueError, match="'nope'"):
        distill(student, teacher, b, steps=5, layers=["nope"], progress=False)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == before  # nothing left frozen/unfrozen
    assert all(not m._forward_hooks for m in student.modules())


def test_explicit_params_and_on_step(seed):
    """``params=`` trains exactly those (no adapters needed), ``on_step`` sees every step in order."""
    teacher = ResidualStack()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.blocks[0][0].weight.mul_(0.5)
    chosen = student.blocks[0][0].weight
    others = {n: p.detach().clone() for n, p in student.named_parameters() if p is not chosen}
    before = chosen.detach().clone()
    seen = []
    stats = distill(student, teacher, [torch.randn(8, 32)], steps=6, lr=1e-2, loss="mse", progress=False,
                    params=[chosen], on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(6)]
    assert not torch.equal(chosen, before) and stats["last"] < stats["first"]
    assert all(torch.equal(p, others[n]) for n, p in student.named_parameters() if p is not chosen)
    with pytest.raises(ValueError, match="params"):
        distill(student, teacher, [torch.randn(8, 32)], steps=2, params=[torch.zeros(3)], progress=False)


# llava: vision tower + language model, both pruned. (Not blip-2: its tiny vision Linears are
# initialised at ~1e-10, so pruning them changes nothing. Not qwen2-vl: pruning moves its tiny vision
# blocks' outputs by only 0.4 %. Not clip: the output compared, logits_per_image, couples the towers,
# and the image tower's blocks trade their own error for the text tower's.)
@pytest.mark.parametrize("method", ["sparselora", "masked"])
@pytest.mark.parametrize("fam", ["llava"])
def test_default_recipe_on_tiny_vlm(fam, method, monkeypatch):
    """The default restoration (blocks matched, cosine schedule) runs unchanged on a VLM: it matches
    the blocks of both the vision tower and the language model, both get nearer to the teacher,
    merges stay exactly 2:4 with the mask."""
    import sparselora.distill as D
    from sparselora.restore import RECIPE, restore

    hooked = []  # the modules each _Recorder hooks: student's, then teacher's
    init = D._Recorder.__init__
    monkeypatch.setattr(D._Recorder, "__init__", lambda self, mods: (hooked.append(mods), init(self, mods))[1])

    teacher = build(fam).eval()
    student = copy.deepcopy(teacher)
    masks = _prune(student)
    assert any("vis" in n for n in masks) and any("lang" in n or "text" in n for n in masks)
    batches = [example_inputs(fam, teacher, batch=2, seed=s) for s in range(2)]
    blocks = find_blocks(teacher)

    def errs():
        out = {}
        hooks, acts = [], {}
        for who, model in (("s", student), ("t", teacher)):
            for n in blocks:
                hooks.append(model.get_submodule(n).register_forward_hook(
                    lambda m, i, o, k=(who, n): acts.__setitem__(k, o[0] if isinstance(o, tuple) else o)))
        with torch.no_grad():
            for b in batches:
                student(**b)
                teacher(**b)
                for n in blocks:
                    s, t = acts[("s", n)], acts[("t", n)]
                    out[n] = out.get(n, 0.0) + ((s - t).pow(2).sum() / t.pow(2).sum()).item()
        for h in hooks:
            h.remove()
        return out

    before = errs()
    steps = RECIPE["steps"] // 2  # the default recipe, budget halved for speed
    stats = restore(student, teacher, batches, steps=steps, progress=False, method=method, **({"rank": 4} if method == "sparselora" else {}))
    assert stats["steps"] == steps and len(stats["loss"]) == steps
    assert stats["teacher_forwards"] == len(batches)  # teacher outputs cached per batch
    assert len(hooked) == 2
    for model, mods in zip((student, teacher), hooked):
        names = {id(m): n for n, m in model.named_modules()}
        matched = [names[id(m)] for m in mods]
        assert matched == blocks, matched  # every block, vision tower and language model alike
        assert any("vis" in n for n in matched) and any("lang" in n or "text" in n for n in matched), matched
    merge_sparse_lora(student)  # nothing to merge after method="masked"
    after = errs()
    vis = [n for n in blocks if "vis" in n]
    lang = [n for n in blocks if "lang" in n or "text" in n]
    assert sum(after[n] for n in vis) < sum(before[n] for n in vis), (before, after)
    assert sum(after[n] for n in lang) < sum(before[n] for n in lang), (before, after)
    for name, mask in masks.items():
        lin = student.get_submodule(name)
        assert type(lin) is nn.Linear, name
        check_nm(lin.weight, name=name)
        assert torch.equal(lin.sparse_mask, mask) and not ((lin.weight != 0) & ~mask).any(), name


def test_info_nce_against_float64_and_order(seed):
    from sparselora.distill import info_nce

    t = torch.randn(12, 16)
    s = t + 0.8 * torch.randn(12, 16)  # far enough apart that the two directions differ
    tau = 0.05
    sn, tn = torch.nn.functional.normalize(s.double(), dim=-1), torch.nn.functional.normalize(t.double(), dim=-1)
    sim = sn @ tn.T / tau
    ref = 0.5 * (-(sim.diag() - sim.logsumexp(1)).mean() - (sim.diag() - sim.logsumexp(0)).mean())
    got = info_nce(s, t, tau)
    assert abs(got.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())), (got.item(), ref.item())
    # the term is about order: the same embeddings matched to a shuffled teacher score far worse
    close = t + 0.05 * torch.randn(12, 16)
    assert info_nce(close, t[torch.roll(torch.arange(12), 1)], tau) > info_nce(close, t, tau) + 1.0
    with pytest.raises(ValueError, match="batch >= 2"):
        info_nce(s[:1], t[:1])
    with pytest.raises(ValueError, match="pools"):
        info_nce(s.reshape(3, 4, 16), t.reshape(3, 4, 16))


def test_restore_contrastive_option(seed, monkeypatch):
    import sparselora.restore as restore_mod
    from sparselora.distill import info_nce

    teacher = ResidualStack()
    student = copy.deepcopy(teacher)
    _prune(student)
    seen = {}
    real = restore_mod.distill

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(restore_mod, "distill", spy)
    b = [torch.randn(8, 32) for _ in range(2)]
    restore_mod.restore(student, teacher, b, steps=4, progress=False, method="sparselora", contrastive=0.5)
    s, t = torch.randn(8, 8), torch.randn(8, 8)
    assert torch.allclose(seen["aux_loss"](s, t), 0.5 * info_nce(s, t))
    seen.clear()
    restore_mod.restore(student, teacher, b, steps=4, progress=False, method="sparselora")
    assert seen.get("aux_loss") is None  # off unless asked: a VLM's logits are not sentence embeddings
    with pytest.raises(ValueError, match="contrastive must be >= 0"):
        restore_mod.restore(student, teacher, b, steps=4, progress=False, method="sparselora", contrastive=-1.0)
    with pytest.raises(ValueError, match="not both"):
        restore_mod.restore(student, teacher, b, steps=4, progress=False, method="sparselora", contrastive=0.5, aux_loss=lambda s, t: s.sum())


def test_pair_kl_against_float64_and_what_it_measures(seed):
    from sparselora.distill import pair_kl

    t = torch.randn(16, 24)  # 8 pairs: rows 0-7 queries, 8-15 answers
    s = t + 0.5 * torch.randn(16, 24)
    tau = 0.05

    def ref(s, t):
        s, t = torch.nn.functional.normalize(s.double(), dim=-1), torch.nn.functional.normalize(t.double(), dim=-1)
        out = 0.0
        for ls, lt in ((s[:8] @ s[8:].T / tau, t[:8] @ t[8:].T / tau), ((s[:8] @ s[8:].T).T / tau, (t[:8] @ t[8:].T).T / tau)):
            p, logp, logq = lt.softmax(-1), lt.log_softmax(-1), ls.log_softmax(-1)
            out += 0.5 * (p * (logp - logq)).sum(-1).mean()
        return out

    got = pair_kl(s, t, tau)
    assert abs(got.item() - ref(s, t).item()) <= 1e-5 * max(1.0, abs(ref(s, t).item())), (got.item(), ref(s, t).item())
    assert pair_kl(t, t, tau).abs().item() < 1e-6  # the teacher's own ranking: nothing to learn
    # a student that keeps each embedding's direction except for a scale has the same ranking
    assert pair_kl(3.0 * t, t, tau).abs().item() < 1e-6
    # pairing the queries with the wrong answers scores far worse than noisy but right pairs
    wrong = torch.cat([t[:8], t[8:][torch.roll(torch.arange(8), 1)]])
    assert pair_kl(wrong, t, tau) > pair_kl(s, t, tau) + 1.0
    for bad in (t[:3], t[:2], t.reshape(2, 8, 24)):
        with pytest.raises(ValueError, match="queries, answers"):
            pair_kl(bad, bad)

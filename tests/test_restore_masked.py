"""``restore(method="masked")``: the kept weights of the pruned layers train in place with their
gradient masked, so the mask is exactly the one they started with; nothing else moves; the
gradient hooks leave with the call; bad students get errors that name the layer."""
import copy

import pytest
import torch
import torch.nn as nn

from helpers import ResidualStack, magnitude_24_in_place
from sparselora.format import check_nm
from sparselora.restore import MASKED_LR, pruned_linears, restore

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _pruned_pair(seed):
    torch.manual_seed(seed)
    teacher = ResidualStack().eval()
    student = copy.deepcopy(teacher)
    masks = magnitude_24_in_place(student, lambda name, lin: name.startswith("blocks"))
    return teacher, student, masks


def _error(student, teacher, xs):
    with torch.no_grad():
        return sum(((student(x) - teacher(x)).pow(2).sum() / teacher(x).pow(2).sum()).item() for x in xs)


def test_masked_restore_trains_inside_the_mask_only(seed):
    teacher, student, masks = _pruned_pair(seed)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    train = [torch.randn(32, 32) for _ in range(16)]  # enough distinct inputs not to overfit the kept weights
    held_out = [torch.randn(16, 32) for _ in range(4)]
    err0 = _error(student, teacher, held_out)
    outside = []  # what the forward of each step sees outside the masks: must stay exactly zero

    def watch(step, steps):
        outside.append(max(float(student.get_submodule(n).weight.detach()[~m].abs().max()) for n, m in masks.items()))

    stats = restore(student, teacher, train, steps=60, lr=3e-3, loss="mse", progress=False, method="masked", on_step=watch)
    assert len(outside) == 60 and max(outside) == 0.0, max(outside)
    assert stats["method"] == "masked" and sorted(stats["names"]) == sorted(masks)
    assert _error(student, teacher, held_out) < 0.8 * err0  # it learned, and it generalises beyond the batches
    assert sorted(pruned_linears(student)) == sorted(masks)  # still plain Linears: nothing to merge
    for name, mask in masks.items():
        lin = student.get_submodule(name)
        check_nm(lin.weight, name=name)
        assert torch.equal(lin.sparse_mask, mask)
        assert not ((lin.weight != 0) & ~mask).any(), f"{name}: a pruned entry moved"
        assert not torch.equal(lin.weight, before[name + ".weight"]), f"{name}: kept weights did not train"
    for n, p in student.named_parameters():  # biases and the dense head are not trained
        if not (n.endswith(".weight") and n[: -len(".weight")] in masks):
            assert torch.equal(p, before[n]), n
        assert p.requires_grad  # requires_grad handed back


def test_masked_restore_leaves_no_gradient_hooks(seed):
    teacher, student, masks = _pruned_pair(seed)
    restore(student, teacher, [torch.randn(8, 32)], steps=2, progress=False, method="masked")
    student(torch.randn(4, 32)).pow(2).sum().backward()
    for name, mask in masks.items():
        g = student.get_submodule(name).weight.grad
        assert g is not None and bool((g[~mask] != 0).any()), f"{name}: the mask hook outlived restore()"


def test_masked_restore_masks_even_when_interrupted(seed, monkeypatch):
    import sparselora.restore as R

    teacher, student, masks = _pruned_pair(seed)

    def scribble(student, *a, **kw):  # an update that lands outside the mask, then a failure
        with torch.no_grad():
            for p in kw["params"]:
                p.add_(1.0)
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "distill", scribble)
    with pytest.raises(KeyboardInterrupt):
        restore(student, teacher, [torch.randn(8, 32)], steps=2, progress=False, method="masked")
    for name, mask in masks.items():
        assert not ((student.get_submodule(name).weight != 0) & ~mask).any(), name


def test_masked_restore_learning_rate_default(seed, monkeypatch):
    import sparselora.restore as R

    seen = []
    monkeypatch.setattr(R, "distill", lambda *a, **kw: seen.append(kw["lr"]) or {"loss": [0.0], "last": 0.0})
    teacher, student, _ = _pruned_pair(seed)
    restore(student, teacher, [torch.randn(8, 32)], steps=2, progress=False, method="masked")
    restore(student, teacher, [torch.randn(8, 32)], steps=2, progress=False, method="masked", lr=1e-5)
    assert seen == [MASKED_LR, 1e-5]


def test_masked_restore_bad_students_name_the_problem(seed):
    from sparselora.lora import add_sparse_lora

    teacher, student, _ = _pruned_pair(seed)
    x = [torch.randn(8, 32)]
    with pytest.raises(ValueError, match="method must be one of blocks, sparselora, masked, got 'full'"):
        restore(student, teacher, x, steps=2, progress=False, method="full")
    with pytest.raises(ValueError, match="no pruned Linear layers"):
        restore(copy.deepcopy(teacher), teacher, x, steps=2, progress=False, method="masked")
    half = copy.deepcopy(student).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"blocks\.0\.0\.weight is torch\.bfloat16.*float32"):
        restore(half, teacher, x, steps=2, progress=False, method="masked")
    off = copy.deepcopy(student)
    with torch.no_grad():
        lin = off.get_submodule("blocks.1.0")
        lin.weight[~lin.sparse_mask] = 1.0
    with pytest.raises(ValueError, match=r"blocks\.1\.0\.weight has nonzeros outside its sparse_mask"):
        restore(off, teacher, x, steps=2, progress=False, method="masked")
    adapted = copy.deepcopy(student)
    add_sparse_lora(adapted, r=2)
    with pytest.raises(ValueError, match="has SparseLoRA adapters; merge them first"):
        restore(adapted, teacher, x, steps=2, progress=False, method="masked")
    with pytest.raises(ValueError, match="do not pass params"):
        restore(student, teacher, x, steps=2, progress=False, method="masked", params=[nn.Parameter(torch.zeros(1))])

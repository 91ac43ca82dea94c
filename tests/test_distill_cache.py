"""Teacher-output caching in ``distill``: a finite list of batches runs the teacher once per distinct
batch and trains exactly as without the cache; iterators are not cached; the cap is honoured."""
import copy
import logging

import pytest
import torch
import torch.nn as nn

from helpers import ResidualStack
from sparselora.distill import distill
from sparselora.format import nm_mask
from sparselora.lora import add_sparse_lora, lora_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def Stack(width=32, depth=3):
    return ResidualStack(width, depth, dropout=0.1)  # dropout: the student trains, the cached teacher must not


def _pair():
    teacher = Stack()
    student = copy.deepcopy(teacher)
    for lin in student.modules():
        if type(lin) is nn.Linear:
            mask = nm_mask(lin.weight.detach().abs())
            with torch.no_grad():
                lin.weight.mul_(mask)
            lin.register_buffer("sparse_mask", mask, persistent=False)
    return teacher, student


def _run(teacher, student, batches, seed, **kw):
    student = copy.deepcopy(student)
    torch.manual_seed(seed)
    add_sparse_lora(student, r=4, alpha=8)
    calls = []
    h = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        stats = distill(student, teacher, batches, steps=11, lr=2e-2, loss="mse", layers="blocks", schedule="cosine",
                        warmup=2, progress=False, **kw)
    finally:
        h.remove()
    return stats, [p.detach().clone() for p in lora_parameters(student)], len(calls)


def test_cached_training_equals_uncached(seed):
    teacher, student = _pair()
    batches = [torch.randn(8, 32) for _ in range(3)]  # 11 steps: batch 0 and 1 seen 4x, batch 2 3x
    run_seed = int(torch.randint(0, 2**31, ()))  # the same adapter init and dropout draws both ways
    ref, ref_params, ref_calls = _run(teacher, student, batches, run_seed, teacher_cache_mb=0)
    got, got_params, got_calls = _run(teacher, student, batches, run_seed)
    assert ref_calls == 11 and ref["teacher_forwards"] == 11
    assert got_calls == 3 and got["teacher_forwards"] == 3  # once per distinct batch
    assert ref["loss"][-1] < ref["loss"][0]  # it trained
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]), rtol=1e-6, atol=0)
    assert len(ref_params) == 8  # lora_A, lora_B of 4 Linears
    for a, b in zip(got_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(not m._forward_hooks for m in list(student.modules()) + list(teacher.blocks.modules()))

    # an iterator is not cached (it may not repeat); it still trains the same
    it, it_params, it_calls = _run(teacher, student, iter(batches), run_seed)
    assert it_calls == 11 and it["teacher_forwards"] == 11
    torch.testing.assert_close(torch.tensor(it["loss"]), torch.tensor(ref["loss"]), rtol=1e-6, atol=0)
    for a, b in zip(it_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cache_cap_stops_caching_and_logs_once(seed, caplog):
    teacher, student = _pair()
    batches = [torch.randn(8, 32) for _ in range(3)]
    # one batch's entry: output 8x8 + 3 block outputs 8x32, fp32 = 3328 bytes; room for exactly two
    cap_mb = 2.5 * 3328 / 2**20
    run_seed = int(torch.randint(0, 2**31, ()))
    ref, ref_params, _ = _run(teacher, student, batches, run_seed, teacher_cache_mb=0)
    with caplog.at_level(logging.INFO, logger="sparselora.distill"):
        got, got_params, calls = _run(teacher, student, batches, run_seed, teacher_cache_mb=cap_mb)
    assert calls == 2 + 3  # batches 0 and 1 cached; batch 2 recomputed on each of its 3 visits
    assert [r.getMessage() for r in caplog.records].count(next(
        r.getMessage() for r in caplog.records if "teacher cache full" in r.getMessage())) == 1
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]), rtol=1e-6, atol=0)
    for a, b in zip(got_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cache_options_validated():
    teacher, student = _pair()
    add_sparse_lora(student, r=2)
    with pytest.raises(ValueError, match="teacher_cache_mb"):
        distill(student, teacher, [torch.randn(2, 32)], steps=2, teacher_cache_mb=-1, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        distill(student, teacher, [], steps=2, progress=False)

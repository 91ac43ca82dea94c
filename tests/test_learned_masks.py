"""Learned N:M masks (sparselora.pruning.learned_masks): the candidates, the prior, that training
finds a better mask than a wrong prior, and that the model comes back untouched."""
import pytest
import torch
import torch.nn as nn

from sparselora.format import SparsityError, check_nm
from sparselora.pruning import parse_pattern
from sparselora.pruning.learned_masks import candidate_patterns, learn_masks, prior_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


from helpers import OneLinear as Net


def _nm(rows, cols, n=2, m=4):
    keep = torch.zeros(rows, cols // m, m, dtype=torch.bool)
    keep.scatter_(2, torch.rand(rows, cols // m, m).topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


@pytest.mark.parametrize("gumbel", [False, True])
def test_learning_moves_a_wrong_prior_to_the_right_mask_both_relaxations(gumbel, seed):
    rows, cols = 8, 32
    w = torch.randn(rows, cols)
    truth = _nm(rows, cols)
    batches = [{"x": torch.randn(32, cols)} for _ in range(4)]
    res = learn_masks(Net(w), Net(w * truth), {"lin": ~truth}, batches, steps=150, lr=0.1, prior_strength=1.0, loss="mse",
                      gumbel=gumbel, progress=False)
    got = res["masks"]["lin"]
    assert ((w * got - w * truth) ** 2).sum() <= 0.02 * ((w * ~truth - w * truth) ** 2).sum()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_candidates_are_every_n_of_m(n, m):
    import math

    c = candidate_patterns(n, m)
    assert c.shape == (math.comb(n + (m - n), n), m)
    assert (c.sum(1) == n).all()
    assert len({tuple(r.tolist()) for r in c}) == c.shape[0]


def test_prior_logits_favour_the_prior(seed):
    keep = _nm(6, 32)
    p = parse_pattern("2:4")
    logits = prior_logits(keep, p, 3.0)
    cand = candidate_patterns(2, 4)
    assert torch.equal(cand[logits.argmax(-1)].reshape(6, 32), keep)
    assert logits.max() == 3.0 and logits.min() == 0.0


def test_learning_moves_a_wrong_prior_to_the_right_mask(seed):
    rows, cols = 8, 32
    w = torch.randn(rows, cols)
    truth = _nm(rows, cols)
    prior = ~truth  # at 2:4 the complement is a valid mask that shares nothing with the truth
    teacher, student = Net(w * truth), Net(w)
    batches = [{"x": torch.randn(32, cols)} for _ in range(4)]
    res = learn_masks(student, teacher, {"lin": prior}, batches, steps=150, lr=0.1, prior_strength=1.0, loss="mse",
                      progress=False)
    got = res["masks"]["lin"]
    check_nm(w * got, 2, 4)
    # groups of near-zero weights barely matter, so judge the weight error the mask leaves (the
    # prior's is all of it) and most groups being right
    groups_right = (got == truth).reshape(rows, -1, 4).all(-1).float().mean().item()
    err = ((w * got - w * truth) ** 2).sum() / ((w * prior - w * truth) ** 2).sum()
    assert err <= 0.02 and groups_right >= 0.8, (err, groups_right)
    assert res["changed"]["lin"] >= 0.8 and res["loss_last"] < res["loss_first"]
    # the model is handed back as it was
    assert type(student.lin) is nn.Linear and torch.equal(student.lin.weight, w) and student.lin.weight.requires_grad


def test_a_right_prior_stays(seed):
    rows, cols = 8, 32
    w = torch.randn(rows, cols)
    truth = _nm(rows, cols)
    res = learn_masks(Net(w), Net(w * truth), {"lin": truth}, [{"x": torch.randn(32, cols)}], steps=40, lr=0.1,
                      loss="mse", progress=False)
    got = res["masks"]["lin"]  # a group may only move where the weights it swaps are negligible
    assert ((w * got - w * truth) ** 2).sum() <= 0.03 * ((w * truth) ** 2).sum() and res["changed"]["lin"] <= 0.1


def test_sources_replace_the_weight(seed):
    rows, cols = 4, 16
    w, truth = torch.randn(rows, cols), _nm(4, 16)
    student = Net(torch.zeros(rows, cols))  # its own weight is useless; the source carries the values
    res = learn_masks(student, Net(w * truth), {"lin": ~truth}, [{"x": torch.randn(32, cols)} for _ in range(4)], steps=150, lr=0.1,
                      prior_strength=1.0, loss="mse", sources={"lin": w}, progress=False)
    got = res["masks"]["lin"]
    assert ((w * got - w * truth) ** 2).sum() <= 0.05 * ((w * ~truth - w * truth) ** 2).sum()
    assert not student.lin.weight.any()


@pytest.mark.parametrize("priors,kw,match", [
    ({"lin": torch.ones(4, 16, dtype=torch.bool)}, {}, "exactly 2 of every 4"),
    ({"lin": torch.ones(4, 8, dtype=torch.bool)}, {}, "expected torch.bool"),
    ({"lin": _nm(4, 16).float()}, {}, "expected torch.bool"),
    ({}, {}, "empty"),
    ({"lin": _nm(4, 16)}, {"pattern": 0.5}, "N:M"),
    ({"lin": _nm(4, 16)}, {"tau": (1.0, 0.0)}, "tau"),
    ({"lin": _nm(4, 16)}, {"sources": {"lin": torch.zeros(2, 2)}}, "source weight of lin"),
])
def test_bad_input_named(priors, kw, match):
    student = Net(torch.randn(4, 16))
    with pytest.raises((SparsityError, ValueError), match=match):
        learn_masks(student, Net(torch.randn(4, 16)), priors, [{"x": torch.randn(2, 16)}], steps=2, progress=False, **kw)
    assert type(student.lin) is nn.Linear  # swapped back even when a later layer fails

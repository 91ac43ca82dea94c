"""The arithmetic of benchmarks/acc_vs_fidelity.py: the walk along a model's own error, the
isotropic contrast at a given cosine, and where a curve crosses a level."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.acc_vs_fidelity import along, crossing, isotropic, retrieval


def test_along_runs_from_dense_to_the_model(seed):
    g = torch.Generator().manual_seed(seed)
    dense = {k: F.normalize(torch.randn(50, 16, generator=g), dim=-1) for k in ("sent", "q", "a")}
    model = {k: F.normalize(v + 0.5 * torch.randn(v.shape, generator=g), dim=-1) for k, v in dense.items()}
    for k in dense:
        assert torch.allclose(along(dense, model, 0.0)[k], dense[k], atol=1e-6)
        assert torch.allclose(along(dense, model, 1.0)[k], model[k], atol=1e-6)
    cos = [(along(dense, model, a)["sent"] * dense["sent"]).sum(-1).mean().item() for a in (0.0, 0.3, 0.6, 1.0)]
    assert cos == sorted(cos, reverse=True) and cos[0] == pytest.approx(1.0, abs=1e-6)


def test_isotropic_noise_reaches_the_asked_cosine(seed):
    g = torch.Generator().manual_seed(seed)
    dense = {k: F.normalize(torch.randn(400, 1024, generator=g), dim=-1) for k in ("sent", "q", "a")}
    for target in (0.99, 0.95, 0.9):
        sigma = (1.0 / target ** 2 - 1.0) ** 0.5
        got = (isotropic(dense, sigma, g)["sent"] * dense["sent"]).sum(-1).mean().item()
        assert got == pytest.approx(target, abs=0.01)


def test_crossing_interpolates_the_first_fall_below_the_level():
    curve = [(1.0, 0.0), (0.98, -0.004), (0.96, -0.016), (0.94, -0.008), (0.92, -0.03)]
    assert crossing(curve, -0.01) == pytest.approx(0.98 - 0.02 * 0.5)  # between 0.98 and 0.96, halfway
    assert crossing(curve, -0.05) is None


def test_retrieval_counts_only_strictly_better_answers():
    a = torch.eye(3)
    # query 0 finds its answer; query 1 prefers answer 0 (rank 1); query 2 ties answers 1 and 2 (a tie is not a loss)
    q = torch.tensor([[1.0, 0, 0], [0.8, 0.6, 0], [0, 0.5 ** 0.5, 0.5 ** 0.5]])
    acc, mrr = retrieval(q, a)
    assert acc == pytest.approx(2 / 3) and mrr == pytest.approx((1 + 0.5 + 1) / 3)

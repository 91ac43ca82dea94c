"""benchmarks/domain_gap.py: the sentence sets it scores (training, unseen calibration-domain,
held-out domains) are what they claim to be, and the table's gap is held-out minus evaluation."""
import pytest

from benchmarks.domain_gap import N_TRAIN, summarize, text_sets
from sparselora.text_sources import calibration_texts, domain_sentences

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_text_sets_train_on_one_part_and_score_unseen_ones():
    domains = ("stdlib", "pyref", "transformers")
    sets, eval_id = text_sets(1, domains, held=300)
    assert sets["train"] == calibration_texts(N_TRAIN, seed=1, domains=domains)  # what every variant trains on
    assert len(sets["calib_heldout"]) == 300 and set(sets["calib_heldout"]).isdisjoint(sets["train"])
    # the per-domain sets sort the unseen calibration sentences by the domain they came from (a
    # sentence two domains share is in both)
    per = [k for k in sets if k.startswith("calib_") and k != "calib_heldout"]
    assert len(per) >= 2 and set().union(*(sets[k] for k in per)) == set(sets["calib_heldout"])
    for k in per:
        assert set(sets[k]) <= set(domain_sentences(k[len("calib_"):]))
    # the evaluation sentences never met the calibration text, and the set is fingerprinted
    assert set(sets["eval"]).isdisjoint(sets["train"] + sets["calib_heldout"])
    assert len(eval_id) == 12 and sum(len(v) for k, v in sets.items() if k.startswith("eval_")) == len(sets["eval"])


def test_summary_gap_is_heldout_minus_eval():
    def row(seed, held, ev):
        m = {"train": 0.99, "calib_heldout": held, "eval": ev}
        return {"seed": seed, "base": "b", "variant": "v", "one_shot": dict(m), "restored": dict(m)}

    table = summarize([row(0, 0.97, 0.93), row(1, 0.96, 0.94)])
    assert [r["model"] for r in table] == ["one_shot", "restored"] and table[0]["seeds"] == 2
    assert table[0]["domain_gap"] == "0.0300 ± 0.0141" and table[0]["calib_heldout"] == "0.9650 ± 0.0071"

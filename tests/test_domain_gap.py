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


def test_leave_one_out_scores_the_same_unseen_sentences_in_every_run():
    from benchmarks.domain_gap import FULL, left_out, unseen_sets, without
    from benchmarks.eval_ood import BASES, DOMAINS5

    u = unseen_sets(2, held=1000)
    assert set(u) == {f"unseen_{d}" for d in DOMAINS5} and all(len(v) >= 50 for v in u.values())
    for d in DOMAINS5:
        assert set(u[f"unseen_{d}"]) <= set(domain_sentences(d))
        assert left_out(without(d)) == d and without(d) in BASES
        # the base leaving d out calibrates and trains on the other four only ...
        assert BASES[without(d)].domains == tuple(x for x in DOMAINS5 if x != d)
        # ... and no run, full or leave-one-out, ever trained on a scored sentence
        for run in (DOMAINS5, BASES[without(d)].domains):
            assert set(calibration_texts(N_TRAIN, seed=2, domains=run)).isdisjoint(set().union(*u.values()))
    assert left_out(FULL) is None and BASES[FULL].domains == DOMAINS5


def test_loo_table_pairs_each_left_out_domain_with_the_full_run_of_its_seed():
    from benchmarks.domain_gap import FULL, loo_table, without
    from benchmarks.eval_ood import DOMAINS5

    def row(seed, base, scores):
        m = {f"unseen_{d}": scores.get(d, 0.95) for d in DOMAINS5}
        return {"seed": seed, "base": base, "variant": "v", "n": {k: 100 for k in m}, "one_shot": dict(m), "restored": dict(m)}

    rows = [row(0, FULL, {"torch": 0.97}), row(1, FULL, {"torch": 0.96}),
            row(0, without("torch"), {"torch": 0.93, "stdlib": 0.97}), row(1, without("torch"), {"torch": 0.94}),
            row(2, without("torch"), {"torch": 0.5})]  # no full run of seed 2: not paired
    t = [r for r in loo_table(rows) if r["model"] == "restored"]
    assert [r["domain"] for r in t] == ["torch"] and t[0]["seeds"] == 2
    assert t[0]["per_seed_drop"] == "-0.0400 -0.0200" and t[0]["drop"] == "-0.0300 ± 0.0141"
    assert t[0]["calibrated_on"] == "0.9650 ± 0.0071" and t[0]["left_out"] == "0.9350 ± 0.0071"
    assert t[0]["other_domains_change"] == "0.0025 ± 0.0035"  # seed 0: stdlib +0.02 over four domains


def test_own_domain_text_never_shares_a_document_with_the_evaluation_set():
    from benchmarks.eval_ood import BASES, DOMAINS5, OWN_BASES, own_domain_texts
    from sparselora.eval_text import build_eval
    from sparselora.text_sources import EVAL_DOMAINS, eval_pool

    ev = build_eval(3)
    touched = {s for d in EVAL_DOMAINS for _, sents in eval_pool(d) if not ev.all_texts().isdisjoint(sents) for s in sents}
    own = own_domain_texts(3, 400)
    assert len(own) == 400 and touched.isdisjoint(own)
    evaluation = {s for d in EVAL_DOMAINS for _, sents in eval_pool(d) for s in sents}
    assert set(own) <= evaluation  # only evaluation-domain text ...
    mixed = own_domain_texts(3, 400, calibration=True)
    assert touched.isdisjoint(mixed) and 100 < len(set(mixed) - evaluation) < 300  # ... or half calibration text
    assert all(b in BASES and OWN_BASES[b].texts(3, 50) == own_domain_texts(3, 50, "mixed10" in b) for b in OWN_BASES)
    assert OWN_BASES["mixed10-2048-refit"].domains == DOMAINS5

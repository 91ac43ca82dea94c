"""Where does a restored 2:4 MiniLM lose fidelity: on its training sentences, on unseen sentences
of the domains it calibrated on, or on other domains?

For each seed this builds the 2:4 base of ``--base`` (``eval_ood.py``'s bases) and the restoration
``--variant`` (default: the library's default, block-wise reconstruction, trained on the base's
first 2048 calibration sentences) and reports the mean cosine of its sentence embeddings to the
dense model's on

* ``train`` — the 2048 sentences it calibrated and trained on;
* ``calib_heldout`` — the next ``--held`` sentences of the same calibration domains (never trained
  on, but from the same kinds of text, often the same documents), and per calibration domain;
* ``eval`` — the held-out domains of :mod:`sparselora.eval_text` (the evaluation set of
  ``eval_ood.py`` for that seed, fingerprint checked), and per evaluation domain;

for the one-shot base and the restored model. ``calib_heldout − eval`` is the domain gap: what
fitting the calibration domains does not carry to other text.

    python benchmarks/domain_gap.py --seeds 0 1 [--base mixed2048-refit] [--variant R7:blocks512-lr1e-3]

Rows go to ``benchmarks/results/domain_gap.jsonl`` (one per seed, base and variant; a rerun skips
what it has); the table of means to ``domain_gap.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, write_results  # noqa: E402
from benchmarks.eval_ood import BASES, VARIANTS, base_context, load  # noqa: E402
from sparselora.eval_text import build_eval, embed_texts  # noqa: E402
from sparselora.text_sources import calibration_texts, domain_sentences  # noqa: E402

N_TRAIN = 2048  # the training text of every eval_ood variant measured here (n_train=2048)


def text_sets(seed: int, domains: tuple[str, ...], held: int) -> tuple[dict[str, list[str]], str]:
    """The sentence sets scored, and the evaluation set's fingerprint."""
    texts = calibration_texts(N_TRAIN + held, seed=seed, domains=domains)
    if len(texts) < N_TRAIN + held:
        raise RuntimeError(f"only {len(texts)} calibration sentences in {domains}; need {N_TRAIN + held}")
    ev = build_eval(seed)
    sets = {"train": texts[:N_TRAIN], "calib_heldout": texts[N_TRAIN:]}
    for d in domains:
        pool = set(domain_sentences(d))
        sets[f"calib_{d}"] = [s for s in sets["calib_heldout"] if s in pool]
    sets["eval"] = [s for v in ev.sentences.values() for s in v]
    sets.update({f"eval_{d}": v for d, v in ev.sentences.items()})
    return {k: v for k, v in sets.items() if v}, ev.fingerprint()


def fidelity(model, ref: dict, sets: dict, tok) -> dict[str, float]:
    return {k: (embed_texts(model, tok, v) * ref[k]).sum(-1).mean().item() for k, v in sets.items()}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["base"], r["variant"]) for r in rows}):
        group = [r for r in rows if (r["base"], r["variant"]) == key]
        for model in ("one_shot", "restored"):
            sets = group[0][model]
            row = {"base": key[0], "variant": key[1], "model": model, "seeds": len(group)}
            for k in sets:
                vals = [g[model][k] for g in group if k in g[model]]
                row[k] = f"{statistics.mean(vals):.4f}" + (f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else "")
            gaps = [g[model]["calib_heldout"] - g[model]["eval"] for g in group]
            row["domain_gap"] = f"{statistics.mean(gaps):.4f}" + (f" ± {statistics.stdev(gaps):.4f}" if len(gaps) > 1 else "")
            out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--base", default="mixed2048-refit", choices=sorted(BASES))
    ap.add_argument("--variant", default="R7:blocks512-lr1e-3", choices=sorted(VARIANTS))
    ap.add_argument("--held", type=int, default=1400, help="unseen calibration-domain sentences scored")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log", default=str(RESULTS / "domain_gap.jsonl"))
    ap.add_argument("--report", action="store_true", help="only rewrite the table from the rows measured so far")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = Path(args.log)
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    if not args.report:
        dense, tok = load()
        for seed in args.seeds:
            if any((r["seed"], r["base"], r["variant"]) == (seed, args.base, args.variant) for r in rows):
                print(f"seed {seed}: measured already")
                continue
            t = time.time()
            ctx, _ = base_context(args.base, seed, dense, tok)
            sets, eval_id = text_sets(seed, ctx["domains"], args.held)
            ref = {k: embed_texts(dense, tok, v) for k, v in sets.items()}
            row = {"seed": seed, "base": args.base, "variant": args.variant, "eval_id": eval_id,
                   "n": {k: len(v) for k, v in sets.items()}, "one_shot": fidelity(ctx["pruned"], ref, sets, tok)}
            model, _ = VARIANTS[args.variant](ctx)
            row["restored"] = fidelity(model, ref, sets, tok)
            row["wall_s"] = time.time() - t
            rows.append(row)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"seed {seed}: calibration held-out {row['restored']['calib_heldout']:.4f}, "
                  f"held-out domains {row['restored']['eval']:.4f} ({row['wall_s']:.0f} s)")
    table = summarize(rows)
    cols = ["base", "variant", "model", "seeds", "train", "calib_heldout", "eval", "domain_gap"]
    cols += sorted({k for r in table for k in r if k.startswith(("calib_", "eval_")) and k != "calib_heldout"})
    write_results("domain_gap", table, cols)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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

**Leave one domain out** (``--leave-one-out``): is the domain gap the calibration text's doing
(text unlike what the model calibrated on) or are other domains simply harder for a 2:4 model?
It runs the five-domain base and the five bases that each leave one calibration domain out of the
pruning and the training text, and scores every run on the same unseen sentences of each of the
five domains (``unseen_<domain>``: never in any of the six runs' training text). The table
``domain_gap_loo.{md,json}`` pairs, per seed, a domain's cosine when it was left out with its
cosine when it was calibrated on: the drop is what calibrating on a domain's own text buys there.

    python benchmarks/domain_gap.py --seeds 0 1 --leave-one-out

**Own-domain text** (``--base own5-2048-refit mixed10-2048-refit``, a diagnostic, never a
default): how much of the gap closes when the model calibrates and trains on text of the domains
it is judged on, as a user's ``--calib`` text would be? ``own5`` draws its 2048 sentences from the
evaluation domains' documents that hold no sentence of the seed's evaluation set; ``mixed10``
draws them from those and the five calibration domains together. Only the evaluation sets are
scored (``train`` is the text it trained on).
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
from benchmarks.eval_ood import BASES, DOMAINS5, OWN_BASES, VARIANTS, base_context, load  # noqa: E402
from sparselora.eval_text import build_eval, embed_texts  # noqa: E402
from sparselora.text_sources import calibration_texts, domain_sentences  # noqa: E402

N_TRAIN = 2048  # the training text of every eval_ood variant measured here (n_train=2048)


#: the full base of the leave-one-out runs, and the base that leaves ``d`` out (``eval_ood.BASES``)
FULL = "mixed5-2048-refit"


def without(d: str) -> str:
    return f"mixed5-no-{d}-2048-refit"


def left_out(base: str) -> str | None:
    """The calibration domain a leave-one-out base leaves out; None for any other base."""
    return next((d for d in DOMAINS5 if base == without(d)), None)


def unseen_sets(seed: int, held: int, pool: tuple[str, ...] = DOMAINS5) -> dict[str, list[str]]:
    """``unseen_<d>``: the sentences of domain ``d`` among the ``held`` that follow the first
    :data:`N_TRAIN` of the ``pool`` stream, less any sentence in the training text of the full base
    or of any base leaving one domain out: the same sentences for all six runs, never trained on."""
    trained = set(calibration_texts(N_TRAIN, seed=seed, domains=pool))
    for d in pool:
        trained.update(calibration_texts(N_TRAIN, seed=seed, domains=tuple(x for x in pool if x != d)))
    after = [s for s in calibration_texts(N_TRAIN + held, seed=seed, domains=pool)[N_TRAIN:] if s not in trained]
    out = {}
    for d in pool:
        sents = set(domain_sentences(d))
        out[f"unseen_{d}"] = [s for s in after if s in sents]
    return out


def eval_sets(seed: int) -> tuple[dict[str, list[str]], str]:
    """``eval`` (every held-out-domain sentence of ``build_eval(seed)``) and ``eval_<domain>``, and
    the evaluation set's fingerprint."""
    ev = build_eval(seed)
    sets = {"eval": [s for v in ev.sentences.values() for s in v]}
    sets.update({f"eval_{d}": v for d, v in ev.sentences.items()})
    return sets, ev.fingerprint()


def text_sets(seed: int, domains: tuple[str, ...], held: int, loo: bool = False) -> tuple[dict[str, list[str]], str]:
    """The sentence sets scored, and the evaluation set's fingerprint; ``loo`` adds the
    leave-one-out sets of :func:`unseen_sets`."""
    texts = calibration_texts(N_TRAIN + held, seed=seed, domains=domains)
    if len(texts) < N_TRAIN + held:
        raise RuntimeError(f"only {len(texts)} calibration sentences in {domains}; need {N_TRAIN + held}")
    sets = {"train": texts[:N_TRAIN], "calib_heldout": texts[N_TRAIN:]}
    for d in domains:
        pool = set(domain_sentences(d))
        sets[f"calib_{d}"] = [s for s in sets["calib_heldout"] if s in pool]
    if loo:
        sets.update(unseen_sets(seed, held))
    evs, eval_id = eval_sets(seed)
    sets.update(evs)
    return {k: v for k, v in sets.items() if v}, eval_id


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
                row[k] = _ms([g[model][k] for g in group if k in g[model]])
            gaps = [g[model]["calib_heldout"] - g[model]["eval"] for g in group if "calib_heldout" in g[model]]
            if gaps:  # own-domain bases score no calibration-domain set
                row["domain_gap"] = _ms(gaps)
            out.append(row)
    return out


def loo_table(rows: list[dict]) -> list[dict]:
    """Per calibration domain ``d`` and model: the cosine on ``unseen_<d>`` when the base left ``d``
    out, when it calibrated on all five, and the paired drop (left out − calibrated on) per seed."""
    full = {r["seed"]: r for r in rows if r["base"] == FULL and "unseen_" + DOMAINS5[0] in r["restored"]}
    out = []
    for d in DOMAINS5:
        pairs = [(full[r["seed"]], r) for r in rows if left_out(r["base"]) == d and r["seed"] in full
                 and r["variant"] == full[r["seed"]]["variant"]]
        for model in ("one_shot", "restored"):
            if not pairs:
                continue
            k = f"unseen_{d}"
            cal = [f[model][k] for f, _ in pairs]
            out_ = [o[model][k] for _, o in pairs]
            drop = [o - c for c, o in zip(cal, out_)]
            others = [statistics.mean(o[model][f"unseen_{e}"] for e in DOMAINS5 if e != d)
                      - statistics.mean(f[model][f"unseen_{e}"] for e in DOMAINS5 if e != d) for f, o in pairs]
            out.append({"domain": d, "model": model, "seeds": len(pairs), "n": pairs[0][0]["n"][k],
                        "calibrated_on": _ms(cal), "left_out": _ms(out_), "drop": _ms(drop),
                        "per_seed_drop": " ".join(f"{x:+.4f}" for x in drop), "other_domains_change": _ms(others)})
    return out


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--base", nargs="+", choices=sorted(BASES),
                    help="default: mixed2048-refit; with --leave-one-out, its six bases (or these, to split the runs)")
    ap.add_argument("--leave-one-out", action="store_true",
                    help=f"the bases {FULL} and {without('<domain>')} for each of its five domains (module docstring)")
    ap.add_argument("--variant", default="R7:blocks512-lr1e-3", choices=sorted(VARIANTS))
    ap.add_argument("--held", type=int, default=1400, help="unseen calibration-domain sentences scored")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log", default=str(RESULTS / "domain_gap.jsonl"))
    ap.add_argument("--report", action="store_true", help="only rewrite the table from the rows measured so far")
    ap.add_argument("--name", default="domain_gap",
                    help="results file stem under benchmarks/results/ (a scratch --log wants its own, or it rewrites the main tables)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = Path(args.log)
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    if not args.report:
        dense, tok = load()
        bases = args.base or ([FULL] + [without(d) for d in DOMAINS5] if args.leave_one_out else ["mixed2048-refit"])
        for seed, base in [(s, b) for s in args.seeds for b in bases]:
            if any((r["seed"], r["base"], r["variant"]) == (seed, base, args.variant) for r in rows):
                print(f"seed {seed}, {base}: measured already")
                continue
            t = time.time()
            ctx, _ = base_context(base, seed, dense, tok)
            if base in OWN_BASES:  # only the evaluation sets: the calibration-domain sets are not what it trained on
                sets, eval_id = eval_sets(seed)
                sets = sets | {"train": ctx["texts"](N_TRAIN)}
            else:
                sets, eval_id = text_sets(seed, ctx["domains"], args.held, loo=args.leave_one_out)
            ref = {k: embed_texts(dense, tok, v) for k, v in sets.items()}
            row = {"seed": seed, "base": base, "variant": args.variant, "eval_id": eval_id,
                   "n": {k: len(v) for k, v in sets.items()}, "one_shot": fidelity(ctx["pruned"], ref, sets, tok)}
            model, _ = VARIANTS[args.variant](ctx)
            row["restored"] = fidelity(model, ref, sets, tok)
            row["wall_s"] = time.time() - t
            rows.append(row)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"seed {seed}, {base}: calibration held-out {row['restored'].get('calib_heldout', float('nan')):.4f}, "
                  f"held-out domains {row['restored']['eval']:.4f} ({row['wall_s']:.0f} s)")
    table = summarize(rows)
    cols = ["base", "variant", "model", "seeds", "train", "calib_heldout", "eval", "domain_gap"]
    cols += sorted({k for r in table for k in r if k.startswith(("calib_", "eval_")) and k != "calib_heldout"})
    write_results(args.name, table, cols)
    loo = loo_table(rows)
    if loo:
        write_results(f"{args.name}_loo", loo, ["domain", "model", "seeds", "n", "calibrated_on", "left_out", "drop",
                                              "per_seed_drop", "other_domains_change"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

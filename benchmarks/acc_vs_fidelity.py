"""How close to dense must a 2:4 MiniLM be for retrieval acc@1 within 0.01 of dense?

For each seed this builds the evaluation of ``eval_ood.py`` (:mod:`sparselora.eval_text`), the
2:4 base of ``--base`` and the restoration ``--variant`` (default: the library's default,
block-wise reconstruction), embeds every held-out sentence, query and answer with the dense
model and with each 2:4 model, and then walks along each model's **own error**: the embeddings

    e(α) = normalise(e_dense + α · (e_model − e_dense)),   α = 0 … 1

(α = 1 is the model itself; α = 0.5 a model whose every embedding error is half as large, in
the same direction). Each point gives the held-out cosine to dense and acc@1 / MRR minus dense,
so the curve says what held-out fidelity the acc@1 target needs, for errors shaped like the ones
restoration leaves. An isotropic-noise curve (random directions, same cosines) is the contrast:
it shows whether the measured errors hurt ranking more or less than random ones would.

    python benchmarks/acc_vs_fidelity.py --seeds 0 1 2 [--threads 1]

Rows go to ``benchmarks/results/acc_vs_fidelity.jsonl`` (one per seed, model and α; a rerun skips
the seeds it has); the table of means over seeds and the interpolated cosines at which acc@1 − dense
crosses −0.01 / −0.02 go to ``acc_vs_fidelity.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, write_results  # noqa: E402
from benchmarks.eval_ood import BASES, VARIANTS, base_context, load  # noqa: E402
from sparselora.eval_text import _retrieval  # noqa: E402

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: isotropic-noise curve: noise draws averaged per point (acc@1 of one draw is noisy)
NOISE_DRAWS = 8


def retrieval(q: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
    """(acc@1, MRR), as :mod:`sparselora.eval_text` scores them."""
    r = _retrieval(q, a)
    return r["acc1"], r["mrr"]


def along(dense: dict, model: dict, alpha: float) -> dict:
    """Every embedding set moved ``alpha`` of the way from dense to ``model``, re-normalised."""
    return {k: F.normalize(dense[k] + alpha * (model[k] - dense[k]), dim=-1) for k in dense}


def isotropic(dense: dict, sigma: float, gen: torch.Generator) -> dict:
    """Dense embeddings plus Gaussian noise of expected norm ``sigma`` in a random direction, re-normalised."""
    d = dense["sent"].shape[1]
    return {k: F.normalize(v + sigma * torch.randn(v.shape, generator=gen) / d ** 0.5, dim=-1) for k, v in dense.items()}


def point(dense: dict, emb: dict, acc_d: float, mrr_d: float) -> dict:
    acc, mrr = retrieval(emb["q"], emb["a"])
    return {"cos_mixed": (emb["sent"] * dense["sent"]).sum(-1).mean().item(), "acc1_vs_dense": acc - acc_d,
            "mrr_vs_dense": mrr - mrr_d}


def embeddings(model, tok, ev) -> dict:
    from sparselora.eval_text import embed_texts

    sents = [s for d in ev.sentences for s in ev.sentences[d]]
    return {"sent": embed_texts(model, tok, sents), "q": embed_texts(model, tok, ev.queries), "a": embed_texts(model, tok, ev.answers)}


def crossing(curve: list[tuple[float, float]], level: float):
    """The cosine at which the (cosine, acc drop) curve, ordered from dense outward, first falls below ``level``
    (linear interpolation between the points around it); None if it never does."""
    for (c0, a0), (c1, a1) in zip(curve, curve[1:]):
        if a0 >= level > a1:
            return c0 + (c1 - c0) * (a0 - level) / (a0 - a1)
    return None


def measure_seed(seed: int, base: str, variant: str, dense, tok, save=None) -> list[dict]:
    from sparselora.eval_text import build_eval, embed_texts
    from sparselora.text_sources import calibration_texts

    ev = build_eval(seed)
    ref = embeddings(dense, tok, ev)
    acc_d, mrr_d = retrieval(ref["q"], ref["a"])
    ctx, _ = base_context(base, seed, dense, tok)
    t = time.process_time()
    restored, _ = VARIANTS[variant](ctx)
    print(f"seed {seed}: {variant} in {time.process_time() - t:.0f} CPU-s", flush=True)
    rows, saved = [], {"dense": ref}
    calib = calibration_texts(2048, seed=seed, domains=ctx["domains"]) if save else None
    for name, model in (("sparsegpt", ctx["pruned"]), (variant, restored)):
        emb = saved[name] = embeddings(model, tok, ev)
        for alpha in ALPHAS:
            rows.append({"seed": seed, "base": base, "curve": name, "alpha": alpha, **point(ref, along(ref, emb, alpha), acc_d, mrr_d)})
    if save:  # for offline analysis: every embedding, and the calibration text's (the restoration's own data)
        for name, model in (("dense", dense), ("sparsegpt", ctx["pruned"]), (variant, restored)):
            saved[name]["calib"] = embed_texts(model, tok, calib)
        torch.save(saved, Path(save) / f"emb_seed{seed}.pt")
    # isotropic noise at the cosines the restored model's curve passes through
    gen = torch.Generator().manual_seed(seed)
    d = ref["sent"].shape[1]
    for r in [r for r in rows if r["curve"] == variant]:
        c = r["cos_mixed"]
        # E[cos(e, normalise(e + σ g/√d))] ≈ 1/√(1+σ²) for unit e and large d: σ from the target cosine
        sigma = (max(1.0 / c ** 2 - 1.0, 0.0)) ** 0.5
        pts = [point(ref, isotropic(ref, sigma, gen), acc_d, mrr_d) for _ in range(NOISE_DRAWS)]
        rows.append({"seed": seed, "base": base, "curve": "isotropic", "alpha": r["alpha"], "sigma": sigma, "hidden": d,
                     **{k: statistics.mean(p[k] for p in pts) for k in pts[0]}})
    return rows


def diagnose(path: Path) -> list[str]:
    """What the saved embeddings of one seed say about each model's error: acc@1 − dense as is and
    with the error's mean over the calibration text removed (a common offset, which an output bias
    could undo), and the share of the calibration error in its top principal directions."""
    emb = torch.load(path)
    ref = emb["dense"]
    acc_d, _ = retrieval(ref["q"], ref["a"])
    out = []
    for name in [k for k in emb if k != "dense"]:
        m = emb[name]
        err = m["calib"] - ref["calib"]
        mu = err.mean(0)
        shifted = {k: F.normalize(v - mu, dim=-1) for k, v in m.items()}
        s = torch.linalg.svdvals(err - mu) ** 2
        share = (s / s.sum()).cumsum(0)
        out.append(f"{path.name} {name}: acc@1 − dense {retrieval(m['q'], m['a'])[0] - acc_d:+.3f}, calibration mean error "
                   f"removed {retrieval(shifted['q'], shifted['a'])[0] - acc_d:+.3f}; |mean error| / rms error "
                   f"{mu.norm() / err.norm(dim=1).pow(2).mean().sqrt():.3f}; top 1/5/20 principal directions hold "
                   f"{share[0]:.2f}/{share[4]:.2f}/{share[19]:.2f} of the error")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="retrieval acc@1 against held-out fidelity along each 2:4 model's own error")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--base", default="mixed2048-refit", choices=sorted(BASES))
    ap.add_argument("--variant", default="R7:blocks512-lr1e-3", choices=sorted(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log", default=str(RESULTS / "acc_vs_fidelity.jsonl"))
    ap.add_argument("--name", default="acc_vs_fidelity")
    ap.add_argument("--save-emb", metavar="DIR", help="also save every embedding (and the calibration text's) there")
    ap.add_argument("--report", action="store_true", help="only rewrite the table from the rows measured so far")
    ap.add_argument("--diagnose", metavar="DIR", help="only analyse the embeddings --save-emb wrote there (see diagnose())")
    args = ap.parse_args(argv)
    if args.diagnose:
        for f in sorted(Path(args.diagnose).glob("emb_seed*.pt")):
            print("\n".join(diagnose(f)))
        return 0
    torch.set_num_threads(args.threads)
    log = Path(args.log)
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    rows = [r for r in rows if r["base"] == args.base and r["curve"] in ("sparsegpt", "isotropic", args.variant)]
    if not args.report:
        dense, tok = load()
        for seed in args.seeds:
            if any(r["seed"] == seed for r in rows):
                continue
            new = measure_seed(seed, args.base, args.variant, dense, tok, args.save_emb)
            with log.open("a") as f:  # a seed at a time: an interrupted run keeps what it measured
                f.write("".join(json.dumps(r) + "\n" for r in new))
            rows += new
    rows = [r for r in rows if r["seed"] in args.seeds]
    table, summary = [], {"model": "all-MiniLM-L6-v2, all 37 Linears 2:4", "base": args.base, "variant": args.variant,
                          "seeds": sorted({r["seed"] for r in rows}), "threads": args.threads, "crossings": {}}
    for curve in ("sparsegpt", args.variant, "isotropic"):
        pts = []
        for alpha in ALPHAS:
            rs = [r for r in rows if r["curve"] == curve and r["alpha"] == alpha]
            if not rs:
                continue
            row = {"curve": curve, "alpha": alpha, "seeds": len(rs)}
            for m in ("cos_mixed", "acc1_vs_dense", "mrr_vs_dense"):
                xs = [r[m] for r in rs]
                row[m] = f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else float('nan'):.4f}"
                row[m + "_mean"] = statistics.mean(xs)
            table.append(row)
            pts.append((row["cos_mixed_mean"], row["acc1_vs_dense_mean"]))
        summary["crossings"][curve] = {f"acc1 {lvl:+.2f}": crossing(pts, lvl) for lvl in (-0.01, -0.02)}
    jpath, mpath = write_results(args.name, table, ["curve", "alpha", "seeds", "cos_mixed", "acc1_vs_dense", "mrr_vs_dense"], summary)
    with mpath.open("a") as f:
        f.write("\nHeld-out cosine at which the mean acc@1 − dense first falls below the level (None: never on this curve):\n\n")
        for curve, c in summary["crossings"].items():
            f.write(f"- {curve}: " + ", ".join(f"{k}: {'never' if v is None else f'{v:.4f}'}" for k, v in c.items()) + "\n")
    print("wrote", jpath, mpath)
    print(json.dumps(summary["crossings"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

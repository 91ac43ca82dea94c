"""Seconds per distillation step with and without the teacher-output cache (``distill``'s
``teacher_cache_mb``), on the real all-MiniLM-L6-v2: every Linear 2:4 by SparseGPT, the default
restore recipe (:func:`sparselora.restore.restore`, cosine loss as for embedding models), ``--batches``
batches of 16 mixed-domain sentences cycled (default 8, so a short run revisits each batch 5 times).

    nice python benchmarks/distill_cache_speed.py --steps 40 --batches 8 [--threads 1]

The saving per cached step (``(uncached - cached) / cache hits``) predicts the saving of the default
budget (200 steps over 32 batches: 168 hits); the prediction is labelled as such.

Process CPU time is reported beside wall time: on a shared machine the wall time of either run
depends on what else runs. Both runs start from the same pruned model and seed; their loss histories must agree (checked).
Results go to ``benchmarks/results/distill_cache_speed.{md,json}``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write_results  # noqa: E402
from benchmarks.eval_ood import batches, load  # noqa: E402
from benchmarks.quality_sparselora import Embedder, prune_24  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating uncached / cached")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from sparselora.restore import restore
    from sparselora.text_sources import calibration_texts

    dense, tok = load()
    mixed = batches(tok, calibration_texts(512, seed=args.seed))
    pruned = copy.deepcopy(dense)
    prune_24(pruned, "sparsegpt", mixed[:8])
    train = mixed[:args.batches]
    rows, losses = [], {}
    for cache_mb in (0, 1024) * args.repeats:
        student = copy.deepcopy(pruned)
        torch.manual_seed(args.seed)
        t, c = time.perf_counter(), time.process_time()
        stats = restore(Embedder(student), Embedder(dense), train, steps=args.steps, loss="cosine", progress=False,
                        teacher_cache_mb=cache_mb, method="sparselora")
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        losses.setdefault(cache_mb, stats["loss"])
        rows.append({"teacher_cache_mb": cache_mb, "steps": args.steps, "batches": len(train),
                     "teacher_forwards": stats["teacher_forwards"], "s_per_step": wall / args.steps, "cpu_s_per_step": cpu / args.steps,
                     "loss_last": stats["last"]})
        print(rows[-1], flush=True)
    # what a cache hit skips: one teacher forward (no_grad, every block hooked), timed directly
    from sparselora.distill import _Recorder, _resolve, find_blocks

    teacher = Embedder(dense).eval()
    rec = _Recorder(_resolve(teacher, find_blocks(teacher), "the teacher"))
    fwd = []
    with torch.no_grad():
        for b in train * 2:
            t, c = time.perf_counter(), time.process_time()
            teacher(**b)
            rec.take()
            fwd.append((time.perf_counter() - t, time.process_time() - c))
    rec.close()
    fwd_wall, fwd_cpu = (sorted(x[i] for x in fwd)[len(fwd) // 2] for i in (0, 1))
    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[1024], losses[0]))
    assert diff < 1e-5, f"cached and uncached losses differ (max relative {diff:.2e})"
    mean = {mb: {k: sum(r[k] for r in rows if r["teacher_cache_mb"] == mb) / args.repeats for k in ("s_per_step", "cpu_s_per_step")}
            for mb in (0, 1024)}
    hits = rows[0]["teacher_forwards"] - rows[1]["teacher_forwards"]
    per_hit = {k: (mean[0][k] - mean[1024][k]) * args.steps / hits for k in ("s_per_step", "cpu_s_per_step")}
    summary = {"model": "all-MiniLM-L6-v2, all Linears 2:4 (SparseGPT, 8 calibration batches)",
               "recipe": "sparselora.restore.restore defaults, loss=cosine, r=16",
               "threads": args.threads, "repeats": args.repeats,
               "mean s/step uncached / cached (wall)": f"{mean[0]['s_per_step']:.3f} / {mean[1024]['s_per_step']:.3f}",
               "mean s/step uncached / cached (CPU)": f"{mean[0]['cpu_s_per_step']:.3f} / {mean[1024]['cpu_s_per_step']:.3f}",
               "machine load": "shared 2-core CPU, 1-min load average %.1f at the end" % __import__("os").getloadavg()[0],
               "max relative loss difference": diff,
               "teacher forward (median, hooked), wall / CPU s": f"{fwd_wall:.3f} / {fwd_cpu:.3f}",
               "cache hits": hits, "saved per hit, wall s": per_hit["s_per_step"], "saved per hit, CPU s": per_hit["cpu_s_per_step"],
               "prediction: saved over the default 200 steps / 32 batches (168 hits), CPU s": 168 * per_hit["cpu_s_per_step"]}
    write_results("distill_cache_speed", rows, list(rows[0]), summary)


if __name__ == "__main__":
    main()

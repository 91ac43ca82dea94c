"""SparseLoRA benchmark (GPU, bf16, r = 16): one command, ``python benchmarks/bench_sparse_lora.py``.

Forward, per weight shape of ``benchmarks.common.SHAPES`` and a few token counts M:
  * fused      — ``sparselora::sparse_lora_linear`` (Triton: packed W + on-the-fly masked s·B·A)
  * merged     — ``torch.ops.sparselora.sparse24_linear`` on the merged packed weight (the kernel the
                 fastest registered CUDA backend provides; target: fused ≤ 1.10× merged)
  * materialize — ``F.linear(x, (W + s·B·A) ⊙ M)`` rebuilding the masked update every call, as the
                 paper's reference code does (target: fused ≥ 3× faster)
  * dense      — ``F.linear`` with the dense weight (context only)
Training step (forward + backward w.r.t. x, A, B):
  * fused SparseLoRA vs peft's LoRA ``lora.Linear`` on the dense layer.

Writes ``benchmarks/results/sparse_lora.{json,md}`` via ``benchmarks.common.write_results`` (rewritten
after every point). Forward times (``*_us``) are graph-timed by ``benchmarks.common.time_rotating``:
rotating weight copies (> 3x L2) inside one CUDA graph of many calls, per call; ``*_eager_us`` is
the same loop from Python. The training steps are eager loops (``step_*_eager_us``): autograd is
not captured. ``--shapes llava --m 1 16 4096 --forward-only --name lora`` is the first-contact slice.
Predictions before any GPU run (H100, bf16, r = 16; to be checked against the results):
  * decode (M <= 16): bound by the packed weight bytes (9/16 of dense). The fused kernel reads the
    same bytes as the merged GEMM plus A and B (R·(N+K)·2 bytes, < 1 % at 4096²); every N tile
    re-reads A from L2 (N/BN · R·K·2 = 16 MB at 4096², BN = 32), and the B·A dot doubles the
    tensor-core work of a 16-token tile (hidden while memory-bound). Expect fused/merged
    1.05-1.25 against the Triton 2:4 GEMM. Materializing reads/writes ~5 dense N×K passes:
    expect materialize/fused >= 5.
  * prefill (M >= 4096): compute-bound; the fused kernel expands to dense tiles and uses dense
    tensor cores plus r/BM = 12.5 % extra flops for B·A: ~1.15× a dense-expanding 2:4 GEMM, but up
    to ~2× a GEMM on sparse tensor cores (cuSPARSELt / mma.sp). Materializing costs O(N·K) extra
    per call, amortized over M: materialize/fused → ~1 at large M.
  * fwd+bwd vs peft LoRA on the dense layer: the masked adapter needs the N×K product dyᵀ·x
    (a full dW-sized GEMM) that plain LoRA avoids, so expect ~1.3-1.6× peft's step time at
    large M and ~1× at small M.

``--smoke`` runs one tiny shape on CPU (reference path, wall-clock timing, nothing written) to
check the script itself.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import SHAPES, geomean, time_rotating, write_results  # noqa: E402

M_LIST = [1, 16, 256, 4096]
RANK, ALPHA = 16, 32


def _cpu_time(make, graph=True, warmup=2, iters=5) -> dict:
    fn = make()
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return {"eager_us": (time.perf_counter() - t) / iters * 1e6}


def _gpu_time(make, graph=True) -> dict:
    return time_rotating(make, graph=graph)


def _peft_lora_layer(w, bias, r, alpha):
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
            with torch.no_grad():
                self.lin.weight.copy_(w)
                self.lin.bias.copy_(bias)

        def forward(self, x):
            return self.lin(x)

    pm = get_peft_model(One(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"]))
    return pm.to(device=w.device, dtype=w.dtype)


def bench_one(n, k, m, dtype, device, timer, step=True):
    """One (N, K, M) point. ``timer(make, graph=...)`` takes a builder of fresh weight copies
    (``make()`` returns the callable to time) and returns ``{"graph_us", "eager_us"}``."""
    from sparselora.format import nm_mask, pack_24
    from sparselora.lora import sparse_lora_linear

    s = ALPHA / RANK
    w = torch.randn(n, k, device=device, dtype=dtype)
    mask = nm_mask(w.abs())
    w = w * mask
    bias = torch.randn(n, device=device, dtype=dtype)
    a = torch.randn(RANK, k, device=device, dtype=dtype) / k**0.5
    b = torch.randn(n, RANK, device=device, dtype=dtype) * 0.1  # a trained (nonzero) adapter
    x = torch.randn(m, k, device=device, dtype=dtype)
    p = pack_24(w, mask)
    merged = pack_24(((w.float() + s * (b.float() @ a.float())) * mask).to(dtype), mask)
    maskd = mask.to(dtype)

    # each builder clones the weights it reads: the timer rotates over such copies
    def fused():
        v, mt, ac, bc = p.values.clone(), p.meta.clone(), a.clone(), b.clone()
        return lambda: sparse_lora_linear(x, v, mt, ac, bc, s, bias)

    def merged_gemm():
        v, mt = merged.values.clone(), merged.meta.clone()
        return lambda: torch.ops.sparselora.sparse24_linear(x, v, mt, bias)

    def materialize():
        wc, ac, bc, mk = w.clone(), a.clone(), b.clone(), maskd.clone()
        return lambda: F.linear(x, torch.addmm(wc, bc, ac, alpha=s) * mk, bias)

    def dense():
        wc = w.clone()
        return lambda: F.linear(x, wc, bias)

    row = {"N": n, "K": k, "M": m}
    with torch.no_grad():
        row["max_abs_diff_vs_materialize"] = (fused()().float() - materialize()().float()).abs().max().item()
        for name, make in (("fused", fused), ("merged", merged_gemm), ("materialize", materialize), ("dense", dense)):
            t = timer(make)
            row[f"{name}_us"] = t.get("graph_us", t["eager_us"])
            row[f"{name}_eager_us"] = t["eager_us"]
            if "graph_error" in t:
                row[f"{name}_graph_error"] = t["graph_error"]
    row["fused_vs_merged"] = row["fused_us"] / row["merged_us"]
    row["materialize_vs_fused"] = row["materialize_us"] / row["fused_us"]
    if not step:
        return row

    # training step: forward + backward w.r.t. x, A, B (frozen base); eager (autograd is not captured)
    dy = torch.randn(m, n, device=device, dtype=dtype)

    def step_fused():
        v, mt = p.values.clone(), p.meta.clone()
        xg, ag, bg = x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
        return lambda: torch.autograd.backward(sparse_lora_linear(xg, v, mt, ag, bg, s, bias), dy)

    def step_peft():
        layer = _peft_lora_layer(w, bias, RANK, ALPHA)
        with torch.no_grad():
            for nme, prm in layer.named_parameters():
                if "lora_B" in nme:
                    prm.copy_(b)
        xg = x.clone().requires_grad_()
        return lambda: torch.autograd.backward(layer(xg), dy)

    row["step_fused_eager_us"] = timer(step_fused, graph=False)["eager_us"]
    row["step_peft_dense_eager_us"] = timer(step_peft, graph=False)["eager_us"]
    row["step_fused_vs_peft"] = row["step_fused_eager_us"] / row["step_peft_dense_eager_us"]
    return row


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the script logic; writes nothing")
    ap.add_argument("--m", type=int, nargs="*", default=M_LIST, help="token counts M")
    ap.add_argument("--shapes", nargs="*", default=None, help="model names of common.SHAPES to keep (e.g. llava)")
    ap.add_argument("--forward-only", action="store_true", help="skip the training-step comparison")
    ap.add_argument("--name", default="sparse_lora", help="results file stem")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    shapes = [t for t in SHAPES if any(t[0].startswith(p) for p in args.shapes)] if args.shapes else SHAPES
    if not shapes:
        ap.error(f"--shapes {args.shapes}: no shape of {sorted({t[0] for t in SHAPES})} matches")

    import sparselora  # noqa: F401  (registers the ops)
    from sparselora.backends import list_backends

    list_backends()  # imports the optional backends, which register the CUDA kernel of sparse24_linear
    if args.smoke:
        row = bench_one(64, 128, 8, torch.float32, "cpu", _cpu_time, step=not args.forward_only)
        print(row)
        return 0
    if not torch.cuda.is_available():
        print("bench_sparse_lora: needs a CUDA GPU (none found). On a GPU machine run:\n"
              "    python benchmarks/bench_sparse_lora.py\n"
              "(`--smoke` checks the script on CPU.)", file=sys.stderr)
        return 2

    # the merged baseline is only a sparse kernel if a backend registered one for the CUDA key
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("sparselora::sparse24_linear", "CUDA")
    merged_impl = ("CUDA kernel registered by a backend" if has_cuda_kernel else
                   "NONE registered: reference decompress + F.linear (fused/merged ratios are not vs a sparse kernel)")
    print("merged baseline:", merged_impl, flush=True)
    rows = []
    cols = ["model", "layer", "N", "K", "M", "fused_us", "merged_us", "materialize_us", "dense_us", "fused_vs_merged",
            "materialize_vs_fused", "fused_eager_us", "merged_eager_us", "step_fused_eager_us",
            "step_peft_dense_eager_us", "step_fused_vs_peft"]
    for model, layer, n, k in shapes:
        for m in args.m:
            row = bench_one(n, k, m, torch.bfloat16, "cuda", _gpu_time, step=not args.forward_only)
            row = {"model": model, "layer": layer, **row}
            rows.append(row)
            print(f"{model:14s} {layer:12s} {n:6d}x{k:<6d} M={m:<5d} fused/merged {row['fused_vs_merged']:.2f}  "
                  f"materialize/fused {row['materialize_vs_fused']:.2f}  "
                  f"step fused/peft {row.get('step_fused_vs_peft', float('nan')):.2f}", flush=True)
            torch.cuda.empty_cache()
            summary = {
                "dtype": "bf16", "rank": RANK, "merged baseline (sparse24_linear on CUDA)": merged_impl,
                "timing": "graph of many calls over rotating weight copies (> 3x L2), per call",
                "geomean fused / merged sparse GEMM (target <= 1.10)": geomean([r["fused_vs_merged"] for r in rows]),
                "geomean materialize / fused (target >= 3)": geomean([r["materialize_vs_fused"] for r in rows]),
            }
            if not args.forward_only:
                summary["geomean fwd+bwd fused SparseLoRA / peft LoRA on dense (eager)"] = geomean(
                    [r["step_fused_vs_peft"] for r in rows])
            paths = write_results(args.name, rows, cols, summary)
    print(summary)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())

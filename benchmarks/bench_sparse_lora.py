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

Writes ``benchmarks/results/sparse_lora.{json,md}`` via ``benchmarks.common.write_results``.
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
from benchmarks.common import SHAPES, cuda_time_us, geomean, write_results  # noqa: E402

M_LIST = [1, 16, 256, 4096]
RANK, ALPHA = 16, 32


def _cpu_time_us(fn, warmup=2, iters=5):
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e6


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


def bench_one(n, k, m, dtype, device, timer):
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

    def fused():
        return sparse_lora_linear(x, p.values, p.meta, a, b, s, bias)

    def merged_gemm():
        return torch.ops.sparselora.sparse24_linear(x, merged.values, merged.meta, bias)

    def materialize():
        return F.linear(x, torch.addmm(w, b, a, alpha=s) * maskd, bias)

    def dense():
        return F.linear(x, w, bias)

    with torch.no_grad():
        err = (fused().float() - materialize().float()).abs().max().item()
        t_fused, t_merged, t_mat, t_dense = (timer(f) for f in (fused, merged_gemm, materialize, dense))

    # training step: forward + backward w.r.t. x, A, B (frozen base)
    xg = x.clone().requires_grad_()
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dtype)

    def step_fused():
        y = sparse_lora_linear(xg, p.values, p.meta, ag, bg, s, bias)
        torch.autograd.backward(y, dy)

    layer = _peft_lora_layer(w, bias, RANK, ALPHA)
    with torch.no_grad():
        for nme, prm in layer.named_parameters():
            if "lora_B" in nme:
                prm.copy_(b)

    def step_peft():
        y = layer(xg)
        torch.autograd.backward(y, dy)

    t_step_fused, t_step_peft = timer(step_fused), timer(step_peft)
    return {
        "N": n, "K": k, "M": m,
        "fused_us": t_fused, "merged_us": t_merged, "materialize_us": t_mat, "dense_us": t_dense,
        "fused_vs_merged": t_fused / t_merged, "materialize_vs_fused": t_mat / t_fused,
        "step_fused_us": t_step_fused, "step_peft_dense_us": t_step_peft, "step_fused_vs_peft": t_step_fused / t_step_peft,
        "max_abs_diff_vs_materialize": err,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the script logic; writes nothing")
    ap.add_argument("--m", type=int, nargs="*", default=M_LIST, help="token counts M")
    args = ap.parse_args(argv)

    import sparselora  # noqa: F401  (registers the ops)
    from sparselora.backends import list_backends

    list_backends()  # imports the optional backends, which register the CUDA kernel of sparse24_linear
    if args.smoke:
        row = bench_one(64, 128, 8, torch.float32, "cpu", _cpu_time_us)
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
    for model, layer, n, k in SHAPES:
        for m in args.m:
            row = bench_one(n, k, m, torch.bfloat16, "cuda", cuda_time_us)
            row = {"model": model, "layer": layer, **row}
            rows.append(row)
            print(f"{model:14s} {layer:12s} {n:6d}x{k:<6d} M={m:<5d} fused/merged {row['fused_vs_merged']:.2f}  "
                  f"materialize/fused {row['materialize_vs_fused']:.2f}  step fused/peft {row['step_fused_vs_peft']:.2f}",
                  flush=True)
            torch.cuda.empty_cache()
    summary = {
        "dtype": "bf16", "rank": RANK, "merged baseline (sparse24_linear on CUDA)": merged_impl,
        "geomean fused / merged sparse GEMM (target <= 1.10)": geomean([r["fused_vs_merged"] for r in rows]),
        "geomean materialize / fused (target >= 3)": geomean([r["materialize_vs_fused"] for r in rows]),
        "geomean fwd+bwd fused SparseLoRA / peft LoRA on dense": geomean([r["step_fused_vs_peft"] for r in rows]),
    }
    cols = ["model", "layer", "N", "K", "M", "fused_us", "merged_us", "materialize_us", "dense_us", "fused_vs_merged",
            "materialize_vs_fused", "step_fused_us", "step_peft_dense_us", "step_fused_vs_peft"]
    paths = write_results("sparse_lora", rows, cols, summary)
    print(summary)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())

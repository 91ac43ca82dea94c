"""Sweep tiles of the v2 GEMV decode kernel against dense cuBLAS and the v1 Triton GEMM.

    python benchmarks/tune_gemv.py            # decode M in {1, 4, 16} x every shape; GPU only
    python benchmarks/tune_gemv.py --quick    # 3 shapes

For each weight N x K of ``common.SHAPES`` and M in ``common.DECODE_M`` it times (median CUDA
``common.time_rotating``: one CUDA graph of many calls over rotating weight copies > 3x L2, per
call, so launch overhead is excluded the same way for every method): ``dense`` (``F.linear``), ``v1`` (``sparse24_linear_triton``) and the GEMV
kernel for every config of ``CONFIGS`` with the automatic split-K choice. Writes
``benchmarks/results/tune_gemv.{json,md}``; the summary gives, per M, the geo-mean speedup over
dense of v1 and of the best GEMV config overall, and which config that is. Results are only
accepted when they match dense (max-norm relative error <= 2e-2).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DECODE_M, SHAPES, geomean, time_rotating, write_results  # noqa: E402

# (BLOCK_N, BLOCK_KV, num_warps, num_stages): the shipped tile first, then wider/narrower ones
CONFIGS = [(16, 64, 4, 3), (16, 128, 4, 3), (32, 64, 4, 3), (32, 64, 8, 3), (64, 64, 8, 3),
           (16, 256, 4, 3), (8, 128, 4, 3), (32, 128, 8, 3)]
DTYPE = torch.bfloat16
MAX_REL_ERR = 2e-2


def _graph_time(make) -> float:
    """``make()`` builds a fresh weight copy and returns the call to time."""
    t = time_rotating(make, eager=False)
    if "graph_us" not in t:
        raise RuntimeError(f"CUDA graph capture failed: {t.get('graph_error')}")
    return t["graph_us"]


def _rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def run(quick: bool) -> tuple[list[dict], dict]:
    from sparselora.format import nm_mask, pack_24
    from sparselora.triton_kernels.sparse24_gemm import sparse24_linear_triton
    from sparselora.triton_kernels.sparse24_gemv import sparse24_gemv_triton

    shapes = [SHAPES[0], SHAPES[3], SHAPES[7]] if quick else SHAPES
    rows = []
    for model, layer, n, k in shapes:
        w = torch.randn(n, k, device="cuda")
        w = (w * nm_mask(w.abs())).to(DTYPE)
        p = pack_24(w)
        for m in DECODE_M:
            x = torch.randn(m, k, device="cuda").to(DTYPE)
            ref = F.linear(x, w)
            row = {"model": model, "layer": layer, "N": n, "K": k, "M": m,
                   "dense_us": _graph_time(lambda: (lambda wc: lambda: F.linear(x, wc))(w.clone()))}
            methods = {"v1": lambda v=p.values, mt=p.meta: sparse24_linear_triton(x, v, mt)}
            for c in CONFIGS:
                methods["gemv_" + "x".join(map(str, c))] = (
                    lambda c: lambda v=p.values, mt=p.meta: sparse24_gemv_triton(x, v, mt, config=c))(c)
            for name, fn in methods.items():
                try:
                    err = _rel_err(fn(), ref)
                    if err > MAX_REL_ERR:
                        row[f"{name}_error"] = f"wrong result: rel err {err:.3g}"
                        continue
                    # fn's defaults are the weight: each copy binds clones of it
                    row[f"{name}_us"] = _graph_time(lambda: (lambda v, mt: lambda: fn(v, mt))(p.values.clone(), p.meta.clone()))
                    row[f"{name}_x"] = row["dense_us"] / row[f"{name}_us"]
                except Exception as e:  # noqa: BLE001 - record (e.g. out of resources), go on
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            print(row, flush=True)
            rows.append(row)
    summary = {}
    names = ["v1"] + ["gemv_" + "x".join(map(str, c)) for c in CONFIGS]
    for m in DECODE_M:
        sel = [r for r in rows if r["M"] == m]
        g = {nm: geomean([r.get(f"{nm}_x") for r in sel]) for nm in names}
        best = max((nm for nm in names[1:] if g[nm] == g[nm]), key=lambda nm: g[nm], default=None)
        summary[f"M={m} v1 geomean x"] = g["v1"]
        if best:
            summary[f"M={m} best gemv"] = best
            summary[f"M={m} best gemv geomean x"] = g[best]
            summary[f"M={m} shipped gemv geomean x"] = g[names[1]]
    return rows, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 shapes only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_gemv needs a CUDA device (none present): run it on a GPU machine")
    rows, summary = run(args.quick)
    cols = ["model", "layer", "N", "K", "M", "dense_us", "v1_x"] + [f"gemv_{'x'.join(map(str, c))}_x" for c in CONFIGS]
    jpath, mpath = write_results("tune_gemv", rows, cols, summary)
    for key, val in summary.items():
        print(f"{key}: {val:.3f}" if isinstance(val, float) else f"{key}: {val}")
    print(f"wrote {jpath}, {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

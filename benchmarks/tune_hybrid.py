"""Measure dense vs Triton vs cuSPARSELt on the VLM grid and write the ``hybrid`` backend's table.

    python benchmarks/tune_hybrid.py                 # full grid, bf16; GPU only
    python benchmarks/tune_hybrid.py --quick         # 3 shapes x 4 token counts

For every weight shape N x K of ``common.SHAPES`` and token count M of ``common.TOKENS`` it times
(``common.time_rotating``: one CUDA graph of many calls over rotating weight copies > 3x L2, per
call; same process):

* ``dense``: ``F.linear`` (cuBLAS) on the dense weight;
* ``triton``: ``sparselora.ops.sparse24_linear`` on the canonical layout (the Triton kernel, if the
  triton backend is registered; else the column is empty);
* ``cusparselt``: ``torch.ops.sparselora.cslt_linear`` with its per-shape algorithm search done
  during warm-up (the search is not timed);

then derives (``hybrid_backend.derive_thresholds``), per shape, ``cusparselt_min_m`` (smallest measured M from which cuSPARSELt is at
least as fast as Triton at every larger measured M) and ``slower_than_dense_m`` (M where the path
the hybrid backend picks lost to dense), and writes

* ``sparselora/backends/tables/hybrid_<gpu>.json``: the table the hybrid backend reads;
* ``sparselora/backends/tables/cusparselt_tuning_<gpu>.json``: the algorithm choices found;
* ``benchmarks/results/hybrid_gemm.{json,md}``: every timing and the summary ratios.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DECODE_M, PREFILL_M, SHAPES, TOKENS, device_info, per_call_us, tuning_parser, geomean, write_results  # noqa: E402

from sparselora.backends import get_backend  # noqa: E402
from sparselora.backends import cusparselt_backend as cb  # noqa: E402
from sparselora.backends import hybrid_backend as hb  # noqa: E402
from sparselora.format import nm_mask, pack_24  # noqa: E402
from sparselora.ops import sparse24_linear  # noqa: E402


def random_24(n, k, dtype):
    w = torch.randn(n, k, device="cuda", dtype=torch.float32)
    return (w * nm_mask(w.abs())).to(dtype)


def main(argv=None):
    args = tuning_parser(__doc__, "3 shapes x 4 token counts").parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_hybrid: needs a CUDA device")
    if cb.extension_error():
        raise SystemExit(f"tune_hybrid: {cb.extension_error()}")
    dtype = getattr(torch, args.dtype)
    try:
        triton_why = get_backend("triton").unavailable_reason()
    except KeyError:
        triton_why = "not registered"
    shapes = SHAPES[:1] + SHAPES[3:4] + SHAPES[7:8] if args.quick else SHAPES
    tokens = [1, 16, 1024, 4096] if args.quick else TOKENS
    device = torch.cuda.get_device_name()
    print(f"tune_hybrid: {device}, {args.dtype}, triton: {triton_why or 'available'}")

    rows = []
    table = {"device": device, "dtype": args.dtype, "info": device_info(), "shapes": {}}
    with torch.inference_mode():
        for model, layer, n, k in shapes:
            w = random_24(n, k, dtype)
            packed = pack_24(w)
            comp = cb.cslt_compress(w)
            shape_rows = []
            for m in tokens:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                row = {"model": model, "layer": layer, "N": n, "K": k, "M": m}
                row["dense_us"] = per_call_us(lambda: (lambda wc: lambda: F.linear(x, wc))(w.clone()))
                row["cusparselt_us"] = per_call_us(lambda: (lambda c: lambda: cb.cslt_linear(x, c, n, k))(comp.clone()))
                row["triton_us"] = None if triton_why else per_call_us(
                    lambda: (lambda v, mt: lambda: sparse24_linear(x, v, mt))(packed.values.clone(), packed.meta.clone()))
                row["cusparselt_speedup"] = row["dense_us"] / row["cusparselt_us"]
                if row["triton_us"]:
                    row["triton_speedup"] = row["dense_us"] / row["triton_us"]
                print(" ".join(f"{k_}={v:.1f}" if isinstance(v, float) else f"{k_}={v}" for k_, v in row.items()), flush=True)
                shape_rows.append(row)
                del x
            min_m, slower = hb.derive_thresholds(shape_rows)
            table["shapes"][f"{n}x{k}"] = {"cusparselt_min_m": min_m, "slower_than_dense_m": slower,
                                               "measured_m": [r["M"] for r in shape_rows], "models": f"{model} {layer}"}
            rows += shape_rows
            del w, packed, comp
            torch.cuda.empty_cache()

    pre = [r["cusparselt_speedup"] for r in rows if r["M"] in PREFILL_M]
    dec = [r.get("triton_speedup") for r in rows if r["M"] in DECODE_M and r.get("triton_speedup")]
    summary = {
        "device": device,
        "dtype": args.dtype,
        "prefill_geomean_cusparselt_vs_dense (M>=4096)": geomean(pre),
        "decode_geomean_triton_vs_dense (M<=16)": geomean(dec) if dec else None,
        "hybrid_min_speedup_vs_dense": min(r["hybrid_speedup"] for r in rows),
        "hybrid_points_slower_than_dense": sum(r["hybrid_speedup"] < 1 for r in rows),
        "points": len(rows),
        "cusparselt_cache": cb.cache_stats(),
    }
    cols = ["model", "layer", "N", "K", "M", "dense_us", "triton_us", "cusparselt_us", "triton_speedup",
            "cusparselt_speedup", "hybrid_path", "hybrid_speedup"]
    jpath, mpath = write_results("hybrid_gemm", rows, cols, summary)
    print(f"tune_hybrid: wrote {jpath} and {mpath}")
    if not args.no_write_table:
        hb.TABLE_DIR.mkdir(parents=True, exist_ok=True)
        tpath = hb.table_path(device)
        tmp = tpath.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(table, indent=1, default=str))
        os.replace(tmp, tpath)
        n_tuned = cb.save_tuning(cb.shipped_tuning_path(device))
        print(f"tune_hybrid: wrote {tpath} and {cb.shipped_tuning_path(device)} ({n_tuned} tuned cuSPARSELt shapes)")
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()

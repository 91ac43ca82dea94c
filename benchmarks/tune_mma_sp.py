"""Measure the ``mma-sp`` backend against dense cuBLAS and write its per-device table for ``auto``.

    python benchmarks/tune_mma_sp.py            # every shape of common.SHAPES x common.TOKENS; GPU only
    python benchmarks/tune_mma_sp.py --quick    # 3 shapes x M in {1, 16, 64, 4096}

For every weight N x K and token count M it times (``common.time_rotating``: one CUDA graph of
many calls over rotating weight copies > 3x L2, per call; same process) ``dense`` (``F.linear``)
and ``mma-sp`` (``torch.ops.sparselora.mma_sp_linear`` on the GPU layout, the table's config).
A point counts as a win only if the output also matches dense (norm-wise relative error <= 1e-2);
a mismatch is recorded and counts as a loss. Writes

* ``sparselora/backends/tables/mma_sp_<gpu>.json`` (and a copy next to the results, so a
  ``tools/gpu_run.py`` run brings it back): per shape ``measured_m`` and ``slower_than_dense_m``,
  the table ``sparsify(backend="auto", tokens=...)`` reads (:mod:`sparselora.backends.mma_sp_policy`);
* ``benchmarks/results/tune_mma_sp.{json,md}``: every timing and the geo-means.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DECODE_M, PREFILL_M, RESULTS, SHAPES, TOKENS, device_info, geomean, per_call_us, tuning_parser, write_results  # noqa: E402

MAX_REL_ERR = 1e-2


def main(argv=None):
    args = tuning_parser(__doc__, "3 shapes x M in {1, 16, 64, 4096}").parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_mma_sp: needs a CUDA device")
    from sparselora.backends import mma_sp_backend as mb
    from sparselora.backends import mma_sp_policy as mp
    from sparselora.format import nm_mask, pack_24
    from sparselora.gpu_layout import to_gpu_layout
    from sparselora.mma_sp_configs import TileConfig, arch_class, choose_config, choose_splits

    if mb.extension_error():
        raise SystemExit(f"tune_mma_sp: {mb.extension_error()}")
    dtype = getattr(torch, args.dtype)
    shapes = [SHAPES[0], SHAPES[3], SHAPES[7]] if args.quick else SHAPES
    tokens = [1, 16, 64, 4096] if args.quick else TOKENS
    device = torch.cuda.get_device_name()
    print(f"tune_mma_sp: {device}, {args.dtype}")
    table = {"device": device, "dtype": args.dtype, "backend": "mma-sp", "info": device_info(), "shapes": {}}
    arch = arch_class(*torch.cuda.get_device_capability())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    with torch.inference_mode():
        for model, layer, n, k in shapes:
            w = torch.randn(n, k, device="cuda")
            w = (w * nm_mask(w.abs())).to(dtype)
            gpu = to_gpu_layout(pack_24(w))
            shape_rows = []
            for m in tokens:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = F.linear(x.float(), w.float())
                y = mb.mma_sp_linear(x, gpu.values, gpu.meta, None, n)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                row = {"model": model, "layer": layer, "N": n, "K": k, "M": m, "rel_err": err,
                       "dense_us": per_call_us(lambda: (lambda wc: lambda: F.linear(x, wc))(w.clone())),
                       "mma_sp_us": per_call_us(lambda: (lambda v, mt: lambda: mb.mma_sp_linear(x, v, mt, None, n))(
                           gpu.values.clone(), gpu.meta.clone()))}
                row["speedup"] = row["dense_us"] / row["mma_sp_us"]
                # split-K across CTAs: the launcher's choice as its Python mirror predicts it (shared
                # memory occupancy); where it splits, the same call with splits forced to 1 says
                # whether the split paid for its reduction tail (benchmarks/NOTES.md, split-K)
                cfg = choose_config(m, n, arch)
                row["splits"] = choose_splits(cfg, m, n, k, sms, arch) if isinstance(cfg, TileConfig) else 1
                if row["splits"] > 1:
                    row["mma_sp_nosplit_us"] = per_call_us(lambda: (lambda v, mt: lambda: mb.mma_sp_linear(x, v, mt, None, n, -1, 1))(
                        gpu.values.clone(), gpu.meta.clone()))
                    row["split_gain"] = row["mma_sp_nosplit_us"] / row["mma_sp_us"]
                row["ok"] = err <= MAX_REL_ERR
                print(" ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}" for k_, v in row.items()), flush=True)
                shape_rows.append(row)
                del x, ref, y
            slower = [r["M"] for r in shape_rows if not r["ok"] or r["mma_sp_us"] > r["dense_us"]]
            table["shapes"][f"{n}x{k}"] = {"measured_m": [r["M"] for r in shape_rows], "slower_than_dense_m": slower,
                                           "models": f"{model} {layer}"}
            rows += shape_rows
            del w, gpu
            torch.cuda.empty_cache()
            # rewrite after every shape: a run killed at its budget keeps what it measured
            summary = {
                "device": device, "dtype": args.dtype,
                "decode_geomean (M<=16)": geomean([r["speedup"] for r in rows if r["M"] in DECODE_M]),
                "prefill_geomean (M>=4096)": geomean([r["speedup"] for r in rows if r["M"] in PREFILL_M]),
                "points_slower_than_dense": sum(r["M"] in t["slower_than_dense_m"] for r in rows
                                                for t in [table["shapes"][f"{r['N']}x{r['K']}"]]),
                "points_wrong": sum(not r["ok"] for r in rows), "points": len(rows),
            }
            write_results("tune_mma_sp", rows, ["model", "layer", "N", "K", "M", "dense_us", "mma_sp_us", "speedup",
                                                "splits", "mma_sp_nosplit_us", "split_gain", "rel_err", "ok"], summary)
            if not args.no_write_table:
                for path in (mp.table_path(device), RESULTS / mp.table_path(device).name):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".json.tmp")
                    tmp.write_text(json.dumps(table, indent=1, default=str))
                    os.replace(tmp, path)
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()

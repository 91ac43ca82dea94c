"""Correctness smoke on a GPU: every method that runs vs a float64 reference, LLaVA-1.5-7B shapes.

    python benchmarks/gpu_smoke.py            # writes results/smoke.{json,md}; exit 1 if any point fails

Methods: dense ``F.linear`` (cuBLAS, context), PyTorch's ``to_sparse_semi_structured``, and every
registered backend that is available and supports the layer on CUDA (from the registry, so a new
backend is checked without edits). bf16, random 2:4 weight, random bias, random input, tokens
M in {1, 16, 4096} plus an odd M. Error: norm-wise ``||out - ref|| / ||ref||`` against
``F.linear`` in float64 of the very same (bf16-rounded) operands; a point fails above
``TOL`` or with non-finite output or a wrong shape. The file is rewritten after every point, so
a run stopped by a time limit keeps what it checked.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SHAPES, write_results  # noqa: E402

DTYPE = torch.bfloat16
TOKENS = [1, 16, 4096, 37]  # 37: odd, not a multiple of any tile or of cuSPARSELt's 8
#: the test oracle's bf16 bound (tests/helpers.py REL_TOL): one bf16 rounding of an fp32-accumulated
#: result is ~2e-3 norm-wise; a dropped bias is ~1.3e-2 at K = 11008 (random bias against sqrt(K/2))
TOL = 8e-3


def methods(w: torch.Tensor, bias: torch.Tensor) -> dict:
    """name -> callable(x), or the reason text when the method cannot be set up."""
    from sparselora.backends import list_backends
    from sparselora.format import pack_24

    n, k = w.shape
    out: dict = {"dense": lambda x: F.linear(x, w, bias)}
    try:
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(w)
        out["torch24"] = lambda x: F.linear(x, ws, bias)
    except Exception as e:  # noqa: BLE001 - record why PyTorch's path does not run here
        out["torch24"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    packed = pack_24(w)
    for b in list_backends():
        why = b.unavailable_reason() or b.unsupported_reason(torch.device("cuda"), DTYPE, n, k)
        if why:
            out[b.name] = f"skipped: {why[:160]}"
            continue
        try:
            extra = b.prepare(packed)
            if getattr(b, "resident", "canonical") == "own":  # called as SparseLinear calls it: no canonical copy
                out[b.name] = (lambda b, extra: lambda x: b.linear(x, None, extra, bias, shape=(n, k)))(b, extra)
            else:
                out[b.name] = (lambda b, extra: lambda x: b.linear(x, packed, extra, bias))(b, extra)
        except Exception as e:  # noqa: BLE001
            out[b.name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    return out


def check(fn, x, w, bias) -> dict:
    ref = F.linear(x.double(), w.double(), bias.double())
    try:
        with torch.no_grad():
            out = fn(x)
        if out.is_cuda:
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - a failing method is a result, not a crash of the smoke
        return {"ok": False, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    if tuple(out.shape) != tuple(ref.shape):
        return {"ok": False, "error": f"shape {tuple(out.shape)} != {tuple(ref.shape)}"}
    if not torch.isfinite(out).all():
        return {"ok": False, "error": "non-finite output"}
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    return {"ok": rel <= TOL, "rel_err": rel, **({} if rel <= TOL else {"error": f"rel err {rel:.3g} > {TOL}"})}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="smoke")
    ap.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke.py needs a CUDA device (none present)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows, failed = [], 0
    for model, layer, n, k in [s for s in SHAPES if s[0].startswith("llava")]:
        w = torch.randn(n, k, device="cuda")
        from sparselora.format import nm_mask

        w = (w * nm_mask(w.abs())).to(DTYPE)
        bias = torch.randn(n, device="cuda").to(DTYPE)
        for name, fn in methods(w, bias).items():
            for m in args.tokens:
                row = {"method": name, "N": n, "K": k, "M": m}
                if isinstance(fn, str):
                    row.update(ok=None, error=fn)  # None: did not run (reason given)
                else:
                    x = torch.randn(m, k, device="cuda").to(DTYPE)
                    row.update(check(fn, x, w, bias))
                    failed += row["ok"] is False
                rows.append(row)
                print(row, flush=True)
                summary = {"points": len(rows), "failed": failed, "tolerance (norm-wise rel err)": TOL}
                write_results(args.name, rows, ["method", "N", "K", "M", "ok", "rel_err", "error"], summary)
        del w
        torch.cuda.empty_cache()
    print(f"smoke: {failed} failed of {sum(r['ok'] is not None for r in rows)} run points", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""2:4 GEMM benchmark over the VLM grid (benchmarks.common.SHAPES x TOKENS), bf16.

For every (weight shape N x K, tokens M) it times, in one run on one GPU:

* ``dense``   -- ``F.linear(x, W)`` (cuBLAS), the baseline of every ratio;
* ``torch24`` -- PyTorch's own 2:4 path, ``F.linear(x, to_sparse_semi_structured(W))`` (where it
  runs; errors are recorded, not fatal);
* every registered backend (``sparselora.backends.list_backends()``) that is available and
  supports the layer on CUDA -- ``triton``, ``cusparselt`` once it exists, ``reference`` -- through
  ``Backend.prepare`` / ``Backend.linear``, so a new backend shows up here without edits.

Each method is timed with ``benchmarks.common.time_rotating``: enough distinct copies of its
weight to exceed 3x L2, called round-robin inside one CUDA graph of ~100 calls, graph time / calls
(``<method>_graph_us``, the headline: a layer's cost inside a model, weight from HBM, no CPU
between kernels). ``<method>_eager_us`` is the same loop issued from Python (per-call wall time of
back-to-back launches: includes CPU launch overhead wherever it exceeds GPU time). Speedups are
``dense_time / method_time`` in the same mode, same run. Every method's output is also checked
against dense (relative error), so a fast wrong kernel cannot look good.

Run on a GPU machine (writes results/gemm.{json,md,png}):

    python benchmarks/bench_gemm.py            # full grid
    python benchmarks/bench_gemm.py --quick    # 3 shapes x M in {1, 16, 4096}
    python benchmarks/bench_gemm.py --shapes llava --tokens 1 4 16 --name decode   # a slice
    pytest benchmarks/bench_gemm.py            # pytest-benchmark: a few points + the quick grid
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.common` from anywhere

from benchmarks.common import DECODE_M, PREFILL_M, RESULTS, SHAPES, TOKENS, device_info, geomean, time_rotating, write_results  # noqa: E402

DTYPE = torch.bfloat16
QUICK_SHAPES = [SHAPES[0], SHAPES[3], SHAPES[7]]
QUICK_TOKENS = [1, 16, 4096]
# a method whose output differs from dense by more than this (relative, max-norm) is flagged
MAX_REL_ERR = 2e-2


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemm needs a CUDA device (none present): run it on a GPU machine, "
                         "e.g. `python benchmarks/bench_gemm.py --quick`")


def _weight(n: int, k: int):
    from sparselora.format import nm_mask, pack_24

    w = torch.randn(n, k, device="cuda", dtype=torch.float32)
    w = (w * nm_mask(w.abs())).to(DTYPE)  # kept values are random normals: never zero in practice
    return w, pack_24(w)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def _err(e: Exception) -> str:
    return f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def methods_for(w: torch.Tensor, packed) -> dict:
    """name -> ``make(x)`` for every method that can run this weight (or the error text).

    ``make(x)`` builds a fresh copy of the method's weight (and whatever its backend prepares)
    and returns a no-argument callable running the method on ``x``: the timer rotates over such
    copies. Every registered backend that runs on CUDA is listed, so a new one shows up here."""
    from sparselora.backends import list_backends
    from sparselora.format import Packed24

    n, k = w.shape
    def dense(x):
        wc = w.clone()
        return lambda: F.linear(x, wc)

    out: dict = {"dense": dense}
    try:
        from torch.sparse import to_sparse_semi_structured

        to_sparse_semi_structured(w)  # fails early (and is recorded) where PyTorch's path does not run

        def torch24(x):
            ws = to_sparse_semi_structured(w.clone())
            return lambda: F.linear(x, ws)

        out["torch24"] = torch24
    except Exception as e:  # noqa: BLE001 - record why PyTorch's path does not run here
        out["torch24"] = _err(e)
    for b in list_backends():
        why = b.unavailable_reason() or b.unsupported_reason(torch.device("cuda"), DTYPE, n, k)
        if why:
            continue

        def make(x, b=b):
            pc = Packed24(packed.values.clone(), packed.meta.clone(), packed.shape)
            extra = b.prepare(pc)
            if getattr(b, "resident", "canonical") == "own":  # its buffers ARE the weight: keep only them
                del pc
                return lambda: b.linear(x, None, extra, None, shape=(n, k))
            return lambda: b.linear(x, pc, extra, None)

        try:
            make(torch.zeros(1, k, device=w.device, dtype=w.dtype))  # prepare once: errors show here
            out[b.name] = make
        except Exception as e:  # noqa: BLE001
            out[b.name] = _err(e)
    return out


MODES = ("_graph", "_eager")


def bench_point(model: str, layer: str, n: int, k: int, m: int, w, packed, methods: dict, cold: bool = False) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.float32).to(DTYPE)
    row = {"model": model, "layer": layer, "N": n, "K": k, "M": m}
    ref = F.linear(x, w)
    for name, make in methods.items():
        if isinstance(make, str):
            row[f"{name}_error"] = make
            continue
        try:
            out = make(x)()
            row[f"{name}_relerr"] = _rel_err(out, ref)
            del out
            if row[f"{name}_relerr"] > MAX_REL_ERR:
                row[f"{name}_error"] = f"wrong result: rel err {row[f'{name}_relerr']:.3g}"
            t = time_rotating(lambda: make(x), cold=cold)
            row[f"{name}_copies"] = t["copies"]
            for key in ("graph_us", "eager_us", "cold_us", "graph_error"):
                if key in t:
                    row[f"{name}_{key}"] = t[key]
        except Exception as e:  # noqa: BLE001 - e.g. torch24 rejecting a shape: record, go on
            row[f"{name}_error"] = _err(e)[len("error: "):]
        torch.cuda.empty_cache()
    for name in methods:
        if name == "dense" or f"{name}_error" in row:
            continue
        for mode in MODES:
            t, d = row.get(f"{name}{mode}_us"), row.get(f"dense{mode}_us")
            if t and d:
                row[f"{name}{mode}_x"] = d / t
    return row


def _print(*a):
    print(*a, flush=True)


def run_grid(quick: bool = False, log=_print, shapes=None, tokens=None, name: str | None = None,
             cold: bool = False) -> tuple[list[dict], dict]:
    """Time the grid; with ``name``, rewrite ``results/<name>.{json,md}`` after every point, so
    a run stopped by a time limit keeps what it measured."""
    _need_cuda()
    torch.manual_seed(0)
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)
    tokens = tokens or (QUICK_TOKENS if quick else TOKENS)
    rows, names = [], []
    for model, layer, n, k in shapes:
        w, packed = _weight(n, k)
        methods = methods_for(w, packed)
        names = names + [m for m in methods if m not in names]
        for m in tokens:
            row = bench_point(model, layer, n, k, m, w, packed, methods, cold)
            rows.append(row)
            log(" ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}" for key, val in row.items()
                         if not key.endswith("relerr")))
            if name:
                write_results(name, rows, columns_for(rows), summarize(rows, names))
        del w, packed, methods
        torch.cuda.empty_cache()
    return rows, summarize(rows, names)


def summarize(rows: list[dict], names: list[str]) -> dict:
    """Per method and timing mode: decode (M <= 16) and prefill (M >= 4096) geo-mean speedups
    over the points where it ran, its worst point, and how many points failed."""
    summary = {}
    for name in names:
        if name == "dense":
            continue
        for mode in MODES:
            tag = mode[1:]
            for regime, ms in (("decode", DECODE_M), ("prefill", PREFILL_M)):
                xs = [r.get(f"{name}{mode}_x") for r in rows if r["M"] in ms]
                if any(xs):
                    summary[f"{name} {regime} geomean x ({tag})"] = geomean(xs)
            xs = [r.get(f"{name}{mode}_x") for r in rows if r.get(f"{name}{mode}_x")]
            if xs:
                summary[f"{name} min x ({tag})"] = min(xs)
        errs = sum(1 for r in rows if f"{name}_error" in r)
        if errs:
            summary[f"{name} points with errors"] = errs
    return summary


def columns_for(rows: list[dict]) -> list[str]:
    cols = ["model", "layer", "N", "K", "M", "dense_graph_us", "dense_eager_us"]
    extra = []
    for r in rows:
        for key in r:
            if key not in cols and key not in extra and (key.endswith("_us") or key.endswith("_x")):
                extra.append(key)
    errors = sorted({key for r in rows for key in r if key.endswith("_error")})
    return cols + sorted(extra, key=lambda c: (c.split("_")[0], c)) + errors


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shapes = list(dict.fromkeys((r["model"], r["layer"], r["N"], r["K"]) for r in rows))
    methods = sorted({key[: -len("_graph_x")] for r in rows for key in r if key.endswith("_graph_x")})
    cols = 3
    nrow = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(5 * cols, 3.6 * nrow), squeeze=False)
    for ax, (model, layer, n, k) in zip(axes.flat, shapes):
        pts = [r for r in rows if (r["model"], r["layer"], r["N"], r["K"]) == (model, layer, n, k)]
        for name in methods:
            xs = [(r["M"], r[f"{name}_graph_x"]) for r in pts if r.get(f"{name}_graph_x")]
            if xs:
                ax.plot(*zip(*xs), marker="o", label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(16 / 9, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {layer} {n}x{k}", fontsize=9)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("speedup vs dense (graph)")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"2:4 GEMM, bf16, {device_info()['device']} (dashed: 1.78x memory-bound limit)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 shapes x M in {1, 16, 4096}")
    ap.add_argument("--shapes", nargs="*", default=None, help="model names of common.SHAPES to keep (e.g. llava)")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help="token counts M (default: the grid's)")
    ap.add_argument("--name", default=None, help="results file stem (default gemm, or gemm_quick)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--cold-check", action="store_true",
                    help="also <method>_cold_us: one call after a read-only pass over 2x L2 (a cross-check of the graph figure)")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    _need_cuda()
    shapes = [s for s in SHAPES if any(s[0].startswith(p) for p in args.shapes)] if args.shapes else None
    if args.shapes and not shapes:
        raise SystemExit(f"--shapes {args.shapes}: no shape of {sorted({s[0] for s in SHAPES})} matches")
    name = args.name or ("gemm_quick" if args.quick else "gemm")
    rows, summary = run_grid(args.quick, shapes=shapes, tokens=args.tokens, name=name, cold=args.cold_check)
    jpath, mpath = write_results(name, rows, columns_for(rows), summary)
    png = None if args.no_plot else plot(rows, RESULTS / f"{name}.png")
    for key, val in summary.items():
        print(f"{key}: {val:.3f}" if isinstance(val, float) else f"{key}: {val}")
    print(f"wrote {jpath}, {mpath}" + (f", {png}" if png else ""))
    return 0


# -------------------------------------------------------------------------------------------------
# pytest-benchmark entry points (`pytest benchmarks/bench_gemm.py`)
# -------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none present)")
POINTS = [(SHAPES[0], 1), (SHAPES[0], 16), (SHAPES[1], 4096)]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dense", "torch24", "triton"])
@pytest.mark.parametrize("shape,m", POINTS, ids=[f"{s[2]}x{s[3]}-M{m}" for s, m in POINTS])
def test_gemm_point(benchmark, method, shape, m):
    _, _, n, k = shape
    w, packed = _weight(n, k)
    make = methods_for(w, packed).get(method)
    if make is None or isinstance(make, str):
        pytest.skip(f"{method}: {make or 'not available'}")
    x = torch.randn(m, k, device="cuda").to(DTYPE)
    fn = make(x)

    def run():  # pytest-benchmark's wall clock: eager, warm L2 (use main() for the graph-timed figures)
        fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update({"N": n, "K": k, "M": m, "method": method, "device": torch.cuda.get_device_name()})
    benchmark.pedantic(run, warmup_rounds=5, rounds=50)


@needs_cuda
@pytest.mark.gpu
def test_quick_grid_writes_results():
    rows, summary = run_grid(quick=True)
    jpath, _ = write_results("gemm_quick", rows, columns_for(rows), summary)
    assert jpath.exists() and rows
    for r in rows:
        assert "dense_graph_us" in r and "triton_error" not in r, r


if __name__ == "__main__":
    sys.exit(main())

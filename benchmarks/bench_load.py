"""Peak memory of loading a packed checkpoint, next to a dense ``from_pretrained`` of the same model.

Builds a LLaVA configuration scaled to about 1B parameters (CLIP ViT-B-sized vision tower, an
18-layer 2048-wide Llama; random weights in bf16), prunes it 2:4 by magnitude (vision, projector
and language Linears), and saves it three ways: dense (``save_pretrained`` of the pruned model),
packed transformers-native (``save_pretrained`` after ``sparsify``) and packed single-file
(``save_sparse``). Each load then runs in a fresh Python process, which reports the peak RSS
(``VmHWM``, and ``resource.getrusage(RUSAGE_SELF).ru_maxrss``), the peak just before the load (imports done),
the wall time and, on a GPU (``--device cuda``), ``torch.cuda.max_memory_allocated``:

Peak RSS is ``VmHWM`` of the loading process, with ``ru_maxrss`` recorded next to it (Linux carries
a parent's peak into a child's ``ru_maxrss``, so the parent here never imports torch before the
loads, and the checkpoints are built in a child of their own).

* ``dense``: ``AutoModelForImageTextToText.from_pretrained(dense_dir, dtype=bf16)``
* ``packed_hf``: the same call on the packed directory (sparselora imported)
* ``packed_single``: ``init_empty_weights()`` + ``load_sparse`` of the single-file checkpoint
* ``old_path``: what ``load_sparse`` callers did before (build the dense model at random, then
  load the packed file): the figure the streaming loaders replace

Usage::

    python benchmarks/bench_load.py --workdir /tmp/bench_load            # CPU
    python benchmarks/bench_load.py --workdir /tmp/bench_load --device cuda

Writes ``results/bench_load.json`` and ``results/bench_load.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memprobe import MiB, build_in_child, build_llava, llava_config, run_child, safetensors_bytes  # noqa: E402  (no torch import: see memprobe)


def llava_1b_config():
    return llava_config(image_size=224, hidden_size=2048, intermediate_size=5504, num_hidden_layers=18, num_attention_heads=16)


def build(workdir: Path) -> dict:
    """Write the three checkpoints (once; reused when present)."""
    import torch

    import sparselora
    from sparselora.checkpoint import save_sparse
    from sparselora.format import nm_mask
    from sparselora.patch import sparsify

    dense_dir, hf_dir, single_dir = workdir / "dense", workdir / "packed_hf", workdir / "packed_single"
    if (single_dir / "model.safetensors").exists() and (hf_dir / "config.json").exists() and (dense_dir / "config.json").exists():
        return {"dense": dense_dir, "packed_hf": hf_dir, "packed_single": single_dir}
    t = time.time()
    model = build_llava(llava_1b_config())
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e9:.3f}B parameters in {time.time() - t:.0f}s", flush=True)
    pruned = 0
    with torch.no_grad():
        for name, lin in model.named_modules():
            if isinstance(lin, torch.nn.Linear) and name != "lm_head" and lin.in_features % 4 == 0:
                mask = nm_mask(lin.weight.float().abs(), name=name)
                lin.weight.mul_(mask)
                lin.register_buffer("sparse_mask", mask, persistent=False)
                pruned += 1
    model.save_pretrained(dense_dir)
    report = sparsify(model)
    print(f"pruned {pruned} layers, packed {len(report.sparse)}", flush=True)
    model.save_pretrained(hf_dir)
    save_sparse(model, single_dir)
    (workdir / "params.json").write_text(json.dumps({"parameters": params, "packed_layers": len(report.sparse),
                                                     "sparselora": sparselora.__version__}))
    return {"dense": dense_dir, "packed_hf": hf_dir, "packed_single": single_dir}


_CHILD = r'''
import json, sys, time
from memprobe import peak_rss as hwm, ru_maxrss as maxrss  # VmHWM starts afresh at exec, unlike ru_maxrss
import torch
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration
kind, path, device = sys.argv[1], sys.argv[2], sys.argv[3]
if kind != "dense":
    import sparselora
    from sparselora.checkpoint import load_sparse
    from sparselora.patch import sparse_layers
before, before_maxrss = hwm(), maxrss()
cuda = device == "cuda"
t = time.time()
if kind in ("dense", "packed_hf"):
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, device_map=device)
elif kind == "packed_single":
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    with init_empty_weights():
        model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(path)).to(torch.bfloat16)
    load_sparse(model, path, device=device)
else:  # old_path: the dense model at random first, then the packed file
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(path)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = LlavaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16).to(device)
    load_sparse(model, path)
if cuda:
    torch.cuda.synchronize()
seconds, peak_load, maxrss_load = time.time() - t, hwm(), maxrss()
# a CPU load through a memory map is lazy: pages become resident when a forward reads them.
# Read one byte per page of every host tensor, so the second figure is the model made resident.
with torch.no_grad():
    for v in model.state_dict().values():
        if v.device.type == "cpu" and v.numel():
            v.contiguous().reshape(-1).view(torch.uint8)[::4096].sum()
out = {"kind": kind, "seconds": seconds, "rss_before": before, "peak_rss": peak_load, "peak_rss_resident": hwm(),
       "ru_maxrss_before": before_maxrss, "ru_maxrss": maxrss_load,
       "sparse_layers": 0 if kind == "dense" else len(sparse_layers(model)),
       "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())}
if cuda:
    out["max_allocated"] = torch.cuda.max_memory_allocated()
print("RESULT " + json.dumps(out))
'''


def measure(kind: str, path: Path, device: str) -> dict:
    return run_child(_CHILD, kind, str(path), device, what=f"{kind} load")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="where the checkpoints go (~3.5 GB)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--kinds", nargs="*", default=["dense", "packed_hf", "packed_single", "old_path"])
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        build(args.workdir)
        return 0
    build_in_child(__file__, args.workdir)  # the loads report VmHWM as well
    dirs = {k: args.workdir / k for k in ("dense", "packed_hf", "packed_single")}
    dirs["old_path"] = dirs["packed_single"]
    rows = []
    for kind in args.kinds:
        m = measure(kind, dirs[kind], args.device)
        m["checkpoint_bytes"] = safetensors_bytes(dirs[kind])
        rows.append(m)
        print(f"{kind:14s} checkpoint {m['checkpoint_bytes'] / MiB:7.0f} MiB  peak RSS {m['peak_rss'] / MiB:7.0f} MiB "
              f"(+{(m['peak_rss'] - m['rss_before']) / MiB:.0f} over imports), resident {m['peak_rss_resident'] / MiB:.0f} MiB "
              f"(+{(m['peak_rss_resident'] - m['rss_before']) / MiB:.0f})  {m['seconds']:.1f}s"
              + (f"  max_allocated {m['max_allocated'] / MiB:.0f} MiB" if "max_allocated" in m else ""), flush=True)
    from common import RESULTS, device_info  # imports torch: only now, after the loads

    info = dict(device_info(), **json.loads((args.workdir / "params.json").read_text()), load_device=args.device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_load.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    lines = [f"# Load memory, LLaVA ~{info['parameters'] / 1e9:.2f}B (bf16, {info['packed_layers']} packed layers), "
             f"load device {args.device}", "",
             f"{info['device']}, torch {info['torch']}, {info['date']}. Each load in a fresh process; peak RSS = VmHWM of "
             "that process (ru_maxrss agrees: the parent stays small); 'over imports' = peak minus the peak after "
             "importing torch/transformers/sparselora, i.e. what the load itself adds; ",
             "'resident' = the same after reading one byte per page of every weight (a CPU load through a memory "
             "map is lazy until a forward reads the weights).", "",
             "| load | checkpoint MiB | peak RSS at load MiB | load over imports MiB | resident peak MiB | "
             "resident over imports MiB | resident over imports / checkpoint | load s |"
             + (" max_allocated MiB |" if args.device == "cuda" else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.device == "cuda" else "")]
    for m in rows:
        extra, res = m["peak_rss"] - m["rss_before"], m["peak_rss_resident"] - m["rss_before"]
        lines.append(f"| {m['kind']} | {m['checkpoint_bytes'] / MiB:.0f} | {m['peak_rss'] / MiB:.0f} | {extra / MiB:.0f} | "
                     f"{m['peak_rss_resident'] / MiB:.0f} | {res / MiB:.0f} | {res / m['checkpoint_bytes']:.2f} | {m['seconds']:.1f} |"
                     + (f" {m['max_allocated'] / MiB:.0f} |" if "max_allocated" in m else ""))
    (RESULTS / "bench_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

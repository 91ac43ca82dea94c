"""Peak memory of Wanda 2:4 pruning in memory vs disk-offloaded (accelerate), on a ~0.5B LLaVA.

Builds a LLaVA configuration scaled to about 0.5B parameters (CLIP ViT-B-sized vision tower at
112 px, a 12-layer 1536-wide Llama; random weights, bf16) and saves it dense. Each run is then a
fresh Python process that loads the checkpoint and prunes it with Wanda 2:4 (vision and language
Linears, ``strategy="both"``) on a few short calibration batches, and reports its peak RSS
(``VmHWM``, which starts afresh at exec):

* ``in_memory``: ``from_pretrained(dir, dtype=bf16)``, then ``prune``
* ``disk_offload``: ``from_pretrained(dir, dtype=bf16, device_map=..., offload_folder=...)`` with
  every vision and language block on ``"disk"`` (embeddings, projector, norms and ``lm_head`` on the
  CPU), then the same ``prune``: the offload path of :mod:`sparselora.pruning.offload` onloads one
  block per calibration forward and writes pruned weights into the offload folder

The parent never imports torch (a child's ``ru_maxrss`` would start from the parent's peak).

Usage::

    python benchmarks/bench_offload_prune.py --workdir /tmp/bench_offload_prune

Writes ``results/bench_offload_prune.json`` and ``results/bench_offload_prune.md``. Not part of the tests.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memprobe import MiB, build_in_child, build_llava, llava_config, run_child, safetensors_bytes  # noqa: E402  (no torch import: see memprobe)


def llava_half_b_config():
    return llava_config(image_size=112, hidden_size=1536, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=12)


def build(workdir: Path) -> Path:
    dense = workdir / "dense"
    if (dense / "config.json").exists():
        return dense
    model = build_llava(llava_half_b_config())
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dense)
    (workdir / "params.json").write_text(json.dumps({"parameters": params}))
    print(f"built {params / 1e9:.3f}B parameters", flush=True)
    return dense


_CHILD = r'''
import json, sys, tempfile, time
# RssAnon: anonymous pages only (VmHWM also counts file pages of memory-mapped safetensors / offload files)
from memprobe import AnonPeak, peak_rss as hwm, rss_anon, ru_maxrss
import torch
from transformers import LlavaForConditionalGeneration
from sparselora.pruning import prune
kind, path, n_batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
anon = AnonPeak()
before, anon_before = hwm(), rss_anon()
t = time.time()
if kind == "in_memory":
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
else:
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(path)
    dm = {"model.vision_tower.embeddings": "cpu", "model.vision_tower.pre_layrnorm": "cpu",
          "model.vision_tower.post_layernorm": "cpu", "model.multi_modal_projector": "cpu",
          "model.language_model.embed_tokens": "cpu", "model.language_model.norm": "cpu",
          "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    dm.update({f"model.vision_tower.encoder.layers.{i}": "disk" for i in range(cfg.vision_config.num_hidden_layers)})
    dm.update({f"model.language_model.layers.{i}": "disk" for i in range(cfg.text_config.num_hidden_layers)})
    folder = tempfile.mkdtemp(prefix="bench_offload_")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, device_map=dm, offload_folder=folder)
model.eval()
loaded, load_s = hwm(), time.time() - t
c = model.config
g = torch.Generator().manual_seed(1)
batches = []
for i in range(n_batches):
    ids = torch.cat([torch.full((1, c.image_seq_length), c.image_token_index), torch.randint(3, 30000, (1, 16), generator=g)], 1)
    batches.append({"input_ids": ids, "pixel_values": torch.randn(1, 3, 112, 112, generator=g).to(torch.bfloat16)})
resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
t = time.time()
prune(model, "wanda", strategy="both", calib=batches, progress=False)
masked = sum(isinstance(getattr(m, "sparse_mask", None), torch.Tensor) for m in model.modules())
print("RESULT " + json.dumps({"kind": kind, "rss_before": before, "peak_after_load": loaded, "peak_rss": hwm(),
      "anon_before": anon_before, "anon_peak": anon.final(), "ru_maxrss": ru_maxrss(), "resident_param_bytes": resident,
      "load_s": load_s, "prune_s": time.time() - t, "pruned_layers": masked}))
'''


def measure(kind: str, path: Path, n_batches: int) -> dict:
    return run_child(_CHILD, kind, str(path), str(n_batches), what=kind)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="where the dense checkpoint goes (~1 GB)")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--kinds", nargs="*", default=["in_memory", "disk_offload"])
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        build(args.workdir)
        return 0
    build_in_child(__file__, args.workdir)
    dense = args.workdir / "dense"
    ckpt = safetensors_bytes(dense)
    rows = []
    for kind in args.kinds:
        m = measure(kind, dense, args.calib_batches)
        rows.append(m)
        print(f"{kind:13s} peak RSS {m['peak_rss'] / MiB:6.0f} MiB (+{(m['peak_rss'] - m['rss_before']) / MiB:.0f} over imports, "
              f"{(m['peak_rss'] - m['rss_before']) / ckpt:.2f}x the dense checkpoint)  prune {m['prune_s']:.0f}s  "
              f"{m['pruned_layers']} layers; anonymous peak +{(m['anon_peak'] - m['anon_before']) / MiB:.0f} MiB", flush=True)
    from common import RESULTS, device_info

    info = dict(device_info(), **json.loads((args.workdir / "params.json").read_text()), checkpoint_bytes=ckpt,
                calib_batches=args.calib_batches)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_offload_prune.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    lines = [f"# Wanda 2:4 pruning memory, LLaVA ~{info['parameters'] / 1e9:.2f}B (bf16, random weights): in memory vs disk-offloaded", "",
             f"{info['device']}, torch {info['torch']}, {info['date']}. Dense checkpoint {ckpt / MiB:.0f} MiB. "
             f"{args.calib_batches} calibration batches of 1 image (49 tokens) + 16 text tokens; strategy both. "
             "Each run in a fresh process; peak RSS = VmHWM; 'over imports' = peak minus the peak after importing "
             "torch/transformers/sparselora.", "",
             f"Command: `python benchmarks/bench_offload_prune.py --workdir /tmp/bench_offload_prune --calib-batches {args.calib_batches}`", "",
             "'anon' = peak of RssAnon (sampled every 20 ms) over its value after the imports: RSS without file-backed pages.", "",
             "| run | resident params MiB | peak RSS MiB | over imports MiB | over imports / dense checkpoint | anon over imports MiB | anon / checkpoint | load s | prune s | pruned layers |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        extra = m["peak_rss"] - m["rss_before"]
        lines.append(f"| {m['kind']} | {m['resident_param_bytes'] / MiB:.0f} | {m['peak_rss'] / MiB:.0f} | {extra / MiB:.0f} | "
                     f"{extra / ckpt:.2f} | {(m['anon_peak'] - m['anon_before']) / MiB:.0f} | {(m['anon_peak'] - m['anon_before']) / ckpt:.2f} | {m['load_s']:.1f} | {m['prune_s']:.1f} | {m['pruned_layers']} |")
    (RESULTS / "bench_offload_prune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

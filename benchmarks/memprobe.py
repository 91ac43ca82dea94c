"""Shared helpers of the host-memory benchmarks (``bench_load.py``, ``bench_offload_prune.py``).

* :func:`llava_config` / :func:`build_llava`: a LLaVA scaled down (CLIP-ViT-B-sized vision tower, a
  small Llama), random weights in bf16;
* :func:`peak_rss` (``VmHWM``: starts afresh at exec), :func:`rss_anon`, :func:`ru_maxrss`,
  :class:`AnonPeak` (the kernel keeps no peak of ``RssAnon``: a sampling thread does);
* :func:`run_child`: a measurement in a fresh Python process that prints ``RESULT {json}``.

Nothing here imports torch or transformers at module level: a parent that did would carry its
peak into every child's ``ru_maxrss`` (Linux keeps it across fork and exec), and a child measures
its baseline right after importing this module.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

MiB = 2**20
HERE = Path(__file__).resolve().parent


def llava_config(*, image_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 num_attention_heads: int, num_key_value_heads: int = 4, patch_size: int = 16):
    """A LlavaConfig with a CLIP ViT-B-sized vision tower (12 layers, 768 wide) at ``image_size``
    and a Llama text model of the given size (vocabulary 32000)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=image_size, patch_size=patch_size, projection_dim=768)
    text = LlamaConfig(vocab_size=32000, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                       num_key_value_heads=num_key_value_heads, max_position_embeddings=2048)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999,
                       image_seq_length=(image_size // patch_size) ** 2)


def build_llava(config, seed: int = 0):
    """``LlavaForConditionalGeneration(config)`` with random weights (``seed``), bf16, eval mode."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).to(torch.bfloat16).eval()


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def peak_rss() -> int:
    """Peak RSS of this process image in bytes (``VmHWM``)."""
    return _status("VmHWM")


def rss_anon() -> int:
    """Anonymous resident bytes now (``RssAnon``: without file pages of memory-mapped files)."""
    return _status("RssAnon")


def ru_maxrss() -> int:
    """``getrusage`` peak RSS in bytes (inherited from the parent's peak across exec, unlike VmHWM)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AnonPeak:
    """Samples ``RssAnon`` every ``interval`` s on a daemon thread; :attr:`peak` is the largest seen."""

    def __init__(self, interval: float = 0.02):
        self.peak = rss_anon()
        self._interval = interval
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_anon())
            time.sleep(self._interval)

    def final(self) -> int:
        return max(self.peak, rss_anon())


def run_child(script: str, *args: str, what: str = "run", timeout: float = 3600) -> dict:
    """Run ``script`` (Python source) in a fresh interpreter with ``args`` in ``sys.argv[1:]`` and
    this folder on its path (``from memprobe import ...`` works there); return the JSON of its
    ``RESULT `` line, or raise with the end of its stderr."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"{what}: failed (status {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def build_in_child(script: str, workdir: Path) -> None:
    """Run ``script --workdir WORKDIR --build-only`` in a child process. The measuring process
    must stay small: a child's ru_maxrss starts from its parent's peak (Linux keeps it across
    fork and exec), so building the checkpoints here would inflate every later reading."""
    subprocess.run([sys.executable, script, "--workdir", str(workdir), "--build-only"], check=True)


def safetensors_bytes(d: Path) -> int:
    """Bytes of the ``*.safetensors`` files directly in ``d`` (a checkpoint's weights on disk)."""
    return sum(f.stat().st_size for f in Path(d).iterdir() if f.suffix == ".safetensors")

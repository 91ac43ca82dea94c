"""``python -m sparselora.env``: versions, GPU, and which backends load here."""
from __future__ import annotations

import importlib.metadata as md
import platform

import torch


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    from .backends import list_backends

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "cusparselt_torch": (torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": {},
    }
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for b in list_backends():
        why = b.unavailable_reason()
        if why is None:
            why = b.unsupported_reason(dev, torch.bfloat16, 4096, 4096)
        info["backends"][b.name] = {"available": why is None, "why_not": why, "weight_copies": b.weight_copies,
                                   "copies": b.copies, "resident": b.resident}
    return info


def report() -> str:
    info = collect()
    lines = [f"{k:>18}: {v}" for k, v in info.items() if k != "backends"]
    dev = "cuda" if info["gpu"] else "cpu"
    lines.append(f"backends (bf16 4096x4096 on {dev}):")
    for name, b in info["backends"].items():
        state = "yes" if b["available"] else f"no ({b['why_not']})"
        copies = f"{b['copies']} weight copies, auto only with allow_extra_copy" if b["copies"] > 1 else "1 weight copy"
        lines.append(f"  {name:<12} [{copies}] {state}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())

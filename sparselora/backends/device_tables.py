"""Where per-GPU tables shipped with the package live (hybrid thresholds, cuSPARSELt tuning).

A module of its own so that the cuSPARSELt backend and the hybrid backend (which builds on it)
both name these files without importing each other."""
from __future__ import annotations

import re
from pathlib import Path

TABLE_DIR = Path(__file__).parent / "tables"


def slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3' (the file-name part of a device)."""
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")

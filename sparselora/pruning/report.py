"""The per-layer pruning report: a table (markdown) and JSON."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = ["LayerRow", "PruneReport"]


@dataclass
class LayerRow:
    name: str
    part: str
    method: str
    pattern: str  # "2:4", "4:8" or the unstructured ratio asked for this layer (6 digits)
    target: float  # sparsity asked for (1 - N/M, or the exact ratio)
    sparsity: float  # achieved: fraction of the weight outside the mask
    shape: tuple[int, int]
    seconds: float

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class PruneReport:
    """What :func:`sparselora.pruning.prune` did, one row per pruned Linear."""

    rows: list[LayerRow] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # method, strategy, ratios, peak live stats, ...

    @property
    def total_sparsity(self) -> float:
        """Parameter-weighted sparsity over the pruned layers."""
        n = sum(r.numel for r in self.rows)
        return sum(r.sparsity * r.numel for r in self.rows) / n if n else 0.0

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rows)

    def __getitem__(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    def to_dict(self) -> dict:
        return {"meta": self.meta, "total_sparsity": self.total_sparsity, "rows": [asdict(r) for r in self.rows]}

    def to_markdown(self) -> str:
        lines = [
            f"Pruned {len(self.rows)} layers, total sparsity {self.total_sparsity:.4f}, "
            + ", ".join(f"{k}={v}" for k, v in self.meta.items()),
            "",
            "| layer | part | method | pattern | sparsity | shape | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(f"| {r.name} | {r.part} | {r.method} | {r.pattern} | {r.sparsity:.4f} | "
                         f"{r.shape[0]}x{r.shape[1]} | {r.seconds:.3f} |")
        return "\n".join(lines) + "\n"

    def to_json(self, path: Union[str, os.PathLike]) -> Path:
        """Write the report as JSON atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        os.replace(tmp, path)
        return path

    def __str__(self) -> str:
        return self.to_markdown()

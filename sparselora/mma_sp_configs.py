"""Tile configurations of the mma.sp linear kernel, as data (the C++ dispatch is generated from it).

A config is ``(MT, NT, WK, S)``: MT row tiles of 16 output features and NT token tiles of 8 per CTA,
WK warps splitting K inside the CTA, S cp.async stages per warp. ``tools/gen_sparse_mma.py``
writes one ``.cu`` per (config, dtype) under ``csrc/sparse_mma/instantiations/`` and the switch
``csrc/sparse_mma/dispatch.inc``; ``tests/test_sparse_mma_configs.py`` checks they are up to date,
that every config is instantiated and every entry of :data:`CHOICE` reachable.

Shared memory per CTA: ``WK * S * (MT * 4608 + NT * 4096)`` bytes (values + meta of 8 k-tiles
per row tile, x [8 NT tokens][256 columns] per stage). Limits: sm_80 163 KB, sm_86/89 99 KB,
sm_90 227 KB (opt-in dynamic shared memory per block).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TileConfig", "CONFIGS", "CHOICE", "SMEM_LIMIT", "smem_bytes", "choose_config", "arch_class"]


@dataclass(frozen=True)
class TileConfig:
    id: int
    mt: int
    nt: int
    wk: int
    stages: int
    why: str

    @property
    def name(self) -> str:
        return f"mt{self.mt}_nt{self.nt}_wk{self.wk}_s{self.stages}"

    @property
    def tokens(self) -> int:
        return 8 * self.nt

    @property
    def threads(self) -> int:
        return 32 * self.wk


#: Every config the extension instantiates (ids are the C++ switch's cases: append, never renumber).
CONFIGS: tuple[TileConfig, ...] = (
    TileConfig(0, 1, 1, 2, 4, "M<=8, N<2048: 68 KB smem (2-3 CTAs/SM on sm_80/90), 27 KB of weights in flight per CTA"),
    TileConfig(1, 1, 2, 2, 3, "M<=16, N<2048: 75 KB smem, 18 KB of weights in flight per CTA"),
    TileConfig(2, 2, 1, 2, 3, "M<=8, N>=2048: x read once per 32 rows (L2 reads 1.44x the weight bytes, not 1.89x); "
                              "78 KB smem, 2 CTAs/SM on sm_80/90, 36 KB in flight per CTA"),
    TileConfig(3, 2, 2, 2, 2, "M<=16, N>=2048 on sm_86/89 (99 KB): 68 KB smem, double-buffered"),
    TileConfig(4, 2, 2, 2, 3, "M<=16, N>=2048 on sm_80/90: 102 KB smem, 36 KB in flight per CTA"),
    TileConfig(5, 2, 4, 2, 2, "M<=32 (and larger M, 32 tokens per CTA row) on sm_80/90: 102 KB smem; "
                              "half the weight re-reads of the 16-token configs"),
    TileConfig(6, 2, 4, 1, 3, "M<=32 on sm_86/89 (99 KB) and N<2048: one warp per CTA (no split-K), 75 KB smem "
                              "(32 rows x 16 rows of x staging keep the loop above 18.4 B/clk/SM; 16 rows did not)"),
)

#: opt-in shared memory per block by arch class (bytes)
SMEM_LIMIT = {"sm80": 166912, "sm86": 101376, "sm90": 232448}

#: (arch class, token bucket, wide N) -> config id. Token buckets: 8, 16, 32 (larger M runs the 32-token
#: config over several token tiles: correct, but it re-reads the weight once per 32 tokens).
#: Chosen from the static model (benchmarks/NOTES.md, "mma.sp kernels"), not measured yet.
CHOICE: dict[tuple[str, int, bool], int] = {
    ("sm80", 8, False): 0, ("sm80", 16, False): 1, ("sm80", 8, True): 2, ("sm80", 16, True): 4,
    ("sm86", 8, False): 0, ("sm86", 16, False): 1, ("sm86", 8, True): 2, ("sm86", 16, True): 3,
    ("sm90", 8, False): 0, ("sm90", 16, False): 1, ("sm90", 8, True): 2, ("sm90", 16, True): 4,
    ("sm80", 32, False): 6, ("sm80", 32, True): 5,
    ("sm86", 32, False): 6, ("sm86", 32, True): 6,
    ("sm90", 32, False): 6, ("sm90", 32, True): 5,
}
WIDE_N = 2048


def smem_bytes(cfg: TileConfig) -> int:
    pipe = cfg.wk * cfg.stages * (cfg.mt * 4608 + cfg.nt * 4096)
    reduce = cfg.wk * cfg.mt * cfg.nt * 32 * 16
    return max(pipe, reduce)


def arch_class(major: int, minor: int) -> str:
    if major == 8 and minor in (6, 7, 9):
        return "sm86"
    if major >= 9:
        return "sm90"
    return "sm80"


def choose_config(m: int, n: int, arch: str) -> TileConfig:
    bucket = 8 if m <= 8 else 16 if m <= 16 else 32
    return CONFIGS[CHOICE[(arch, bucket, n >= WIDE_N)]]

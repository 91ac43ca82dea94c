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

__all__ = ["TileConfig", "CONFIGS", "CHOICE", "SMEM_LIMIT", "smem_bytes", "choose_config", "arch_class",
           "PrefillConfig", "PREFILL_CONFIGS", "PREFILL_CHOICE", "PREFILL_MIN_M", "PREFILL_MIN_CTAS", "config_by_id", "config_smem_bytes",
           "SMEM_PER_SM", "ctas_per_sm", "decode_tiles", "choose_splits", "splits_fit", "WORKSPACE_BYTES"]


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


def choose_config(m: int, n: int, arch: str) -> "TileConfig | PrefillConfig":
    if m >= PREFILL_MIN_M:
        pre = config_by_id(PREFILL_CHOICE[arch])
        if prefill_ctas(pre, m, n) >= PREFILL_MIN_CTAS:
            return pre
    bucket = 8 if m <= 8 else 16 if m <= 16 else 32
    return CONFIGS[CHOICE[(arch, bucket, n >= WIDE_N)]]


# --- prefill: csrc/sparse_mma/prefill_kernel.cuh (same GPU layout, large CTA tiles) -----------------
@dataclass(frozen=True)
class PrefillConfig:
    """A CTA of ``wm x wn`` warps, each owning ``wmt`` row tiles x ``wnt`` token tiles (no split-K),
    ``stages`` cp.async stages of 4 k-tiles (128 dense columns)."""

    id: int
    wm: int
    wn: int
    wmt: int
    wnt: int
    stages: int
    why: str

    @property
    def name(self) -> str:
        return f"prefill_wm{self.wm}_wn{self.wn}_mt{self.wmt}_nt{self.wnt}_s{self.stages}"

    @property
    def rows(self) -> int:
        return 16 * self.wm * self.wmt

    @property
    def tokens(self) -> int:
        return 8 * self.wn * self.wnt

    @property
    def threads(self) -> int:
        return 32 * self.wm * self.wn


#: Prefill configs; ids from 100 so that decode configs can keep being appended to :data:`CONFIGS`.
PREFILL_CONFIGS: tuple[PrefillConfig, ...] = (
    PrefillConfig(100, 2, 2, 4, 8, 4, "M>=64 on sm_90: 128 rows x 128 tokens, 4 warps of 64x64, 4 stages, 208 KB smem "
                                      "(1 CTA/SM); 192 B of fragment reads per HMMA.SP from shared memory"),
    PrefillConfig(101, 2, 2, 4, 8, 3, "M>=64 on sm_80 (163 KB): the sm_90 tile with 3 stages, 156 KB smem"),
    PrefillConfig(102, 2, 2, 4, 4, 2, "M>=64 on sm_86/89 (99 KB): 128 rows x 64 tokens, 4 warps of 64x32, 2 stages, "
                                      "72 KB smem (the sparse tensor rate is half of sm_80's, so 256 B/HMMA.SP is enough)"),
)
#: arch class -> prefill config id, used for M >= PREFILL_MIN_M (static model, not measured yet)
PREFILL_CHOICE = {"sm80": 101, "sm86": 102, "sm90": 100}
#: the prefill kernel from this many tokens on (one weight read per 64..128 tokens, not per 32)...
PREFILL_MIN_M = 64
#: ...when its grid has at least this many CTAs (about one wave at 1 CTA/SM on A100/H100): a 128-row
#: x 128-token tile gives N = 4096, M = 64 only 32 CTAs, which would leave 3/4 of the SMs idle,
#: where the 32-token decode config launches 256 (it re-reads the weight per 32 tokens, from L2)
PREFILL_MIN_CTAS = 100


def prefill_ctas(cfg: "PrefillConfig", m: int, n: int) -> int:
    return -(-n // cfg.rows) * -(-m // cfg.tokens)


def prefill_smem_bytes(cfg: PrefillConfig) -> int:
    rt = cfg.wm * cfg.wmt
    stage = rt * 4 * 512 + rt * 512 + cfg.tokens * 128 * 2  # values, meta (whole k-block), x
    out = cfg.tokens * (cfg.rows + 8) * 2  # the epilogue's [token][row] tile
    return max(cfg.stages * stage, out)


def config_by_id(cid: int) -> "TileConfig | PrefillConfig":
    for c in CONFIGS + PREFILL_CONFIGS:
        if c.id == cid:
            return c
    raise KeyError(f"no mma.sp config {cid}; valid: {[c.id for c in CONFIGS + PREFILL_CONFIGS]}")


def config_smem_bytes(cfg: "TileConfig | PrefillConfig") -> int:
    return prefill_smem_bytes(cfg) if isinstance(cfg, PrefillConfig) else smem_bytes(cfg)


# --- split-K across CTAs (decode configs): the mirror of csrc/sparse_mma/split_k.h -----------------
#: the per-device workspace of ops.cpp: fp32 partial tiles, then int32 arrival counters (one per tile)
WORKSPACE_PARTIAL_BYTES = 2 << 20
WORKSPACE_COUNTERS = 8192
WORKSPACE_BYTES = WORKSPACE_PARTIAL_BYTES + 4 * WORKSPACE_COUNTERS
MAX_AUTO_SPLITS = 16
SPLIT_COST_KBLOCKS = 2
#: shared memory per SM by arch class (A100 164 KB, sm_86/89 100 KB, H100/H200 228 KB); 1 KB of it
#: is reserved per resident CTA
SMEM_PER_SM = {"sm80": 167936, "sm86": 102400, "sm90": 233472}
SMEM_RESERVED_PER_CTA = 1024


def ctas_per_sm(cfg: TileConfig, arch: str) -> int:
    """Resident CTAs per SM of a decode config, from shared memory (what the occupancy API gives for
    these 32-64-thread CTAs: registers allow 4 or more)."""
    return max(1, SMEM_PER_SM[arch] // (smem_bytes(cfg) + SMEM_RESERVED_PER_CTA))


def decode_tiles(cfg: TileConfig, m: int, n: int) -> int:
    """(row block, token block) tiles of a decode launch: its grid without split-K."""
    return -(-(-(-n // 16)) // cfg.mt) * -(-m // cfg.tokens)


def _k_blocks(k: int) -> int:
    return -(-(-(-k // 64) * 2) // 8)  # k-tiles of 32 (K padded to 64), 8 per 256-column k-block


def splits_fit(tiles: int, kq: int, splits: int, cfg: TileConfig) -> bool:
    """split_k.h splits_fit: at least one k-block per split, and the launch fits the workspace."""
    part = cfg.mt * cfg.nt * 32 * 16
    return 1 <= splits <= kq and (splits == 1 or (tiles <= WORKSPACE_COUNTERS and tiles * splits * part <= WORKSPACE_PARTIAL_BYTES))


def choose_splits(cfg: TileConfig, m: int, n: int, k: int, sm_count: int, arch: str) -> int:
    """The split count the launcher picks (split_k.h choose_splits, integer for integer): the one
    that minimises waves x (k-blocks per CTA + SPLIT_COST_KBLOCKS for a split), a wave being
    ``sm_count * ctas_per_sm(cfg, arch)`` CTAs; ties go to fewer splits, every warp gets a k-block."""
    tiles, kq, slots = decode_tiles(cfg, m, n), _k_blocks(k), sm_count * ctas_per_sm(cfg, arch)
    best, best_cost = 1, -(-tiles // slots) * kq
    for s in range(2, min(MAX_AUTO_SPLITS, kq // cfg.wk) + 1):
        if not splits_fit(tiles, kq, s, cfg):
            break
        cost = -(-(tiles * s) // slots) * (-(-kq // s) + SPLIT_COST_KBLOCKS)
        if cost < best_cost:
            best, best_cost = s, cost
    return best

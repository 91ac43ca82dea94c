"""Split-K across CTAs of the mma.sp decode kernel: the host-side choice of `splits`
(sparselora.mma_sp_configs.choose_splits, mirrored by csrc/sparse_mma/split_k.h; the host
simulation compares the two launch by launch) on the LLaVA-1.5-7B / Qwen2-VL-7B / CLIP shapes for
132 SMs (H100/H200) and 108 (A100). Pure Python, no GPU."""
import re
from pathlib import Path

import pytest

from sparselora import mma_sp_configs as C

ROOT = Path(__file__).resolve().parent.parent

# (out_features, in_features): LLaVA-1.5-7B (Llama-7B), Qwen2-VL-7B language model, CLIP ViT-L/14
LLAVA = [(4096, 4096), (11008, 4096), (4096, 11008)]
QWEN = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)]
CLIP = [(1024, 1024), (4096, 1024), (1024, 4096)]
DEVICES = [("sm90", 132), ("sm80", 108)]


def _cost(cfg, tiles, kq, slots, s):
    # the model, written out: waves of CTA slots x k-blocks per CTA (+ the split cost)
    waves = -(-tiles * s // slots)
    return waves * (-(-kq // s) + (C.SPLIT_COST_KBLOCKS if s > 1 else 0))


@pytest.mark.parametrize("arch,sms", DEVICES)
@pytest.mark.parametrize("m", [1, 8, 16, 32])
def test_choice_is_the_cheapest_valid_split(arch, sms, m):
    for n, k in LLAVA + QWEN + CLIP:
        cfg = C.choose_config(m, n, arch)
        s = C.choose_splits(cfg, m, n, k, sms, arch)
        tiles, kq, slots = C.decode_tiles(cfg, m, n), C._k_blocks(k), sms * C.ctas_per_sm(cfg, arch)
        valid = [t for t in range(1, min(C.MAX_AUTO_SPLITS, kq // cfg.wk) + 1) if C.splits_fit(tiles, kq, t, cfg)]
        assert s in valid, (n, k, m, arch, s)
        costs = {t: _cost(cfg, tiles, kq, slots, t) for t in valid}
        assert costs[s] == min(costs.values()), (n, k, m, arch, s, costs)
        assert s == min(t for t in valid if costs[t] == costs[s]), "ties go to fewer splits"
        # every split of a CTA's k-blocks gives each warp work, and the workspace holds the launch
        assert kq // s >= cfg.wk or s == 1
        assert s == 1 or tiles * s * cfg.mt * cfg.nt * 512 <= C.WORKSPACE_PARTIAL_BYTES


def test_predictions_written_in_notes():
    # benchmarks/NOTES.md ("split-K across CTAs") states these grids for M = 1 on H100/H200 (132 SMs)
    # and A100 (108); a change of the policy must update the predictions there
    def grid(n, k, arch, sms, m=1):
        cfg = C.choose_config(m, n, arch)
        s = C.choose_splits(cfg, m, n, k, sms, arch)
        return cfg.id, s, C.decode_tiles(cfg, m, n) * s
    # N = 3584 was 112 CTAs for 264 slots (2 x 132 of config 2): split in 2, 224 CTAs
    assert grid(3584, 3584, "sm90", 132) == (2, 2, 224)
    assert grid(4096, 4096, "sm90", 132) == (2, 2, 256)
    assert grid(11008, 4096, "sm90", 132) == (2, 2, 688)  # 1.3 waves -> 2.6 of half-length CTAs
    assert grid(18944, 3584, "sm90", 132) == (2, 1, 592)  # 2.24 waves: a split would not pay its tail
    assert grid(512, 3584, "sm90", 132) == (0, 7, 224)  # Qwen k/v: 32 CTAs for 396 slots
    assert grid(1024, 1024, "sm90", 132) == (0, 1, 64)  # CLIP: 4 k-blocks, launch-bound either way
    assert grid(1024, 4096, "sm90", 132) == (0, 6, 384)
    assert grid(4096, 11008, "sm80", 108) == (2, 5, 640)
    assert grid(4096, 4096, "sm80", 108) == (2, 1, 128)  # A100: 3 splits would tie, ties go to fewer

def test_no_split_where_the_grid_already_fills_the_gpu():
    cfg = C.CONFIGS[2]
    # exactly two full waves of config 2 on 132 SMs (2 CTAs each): nothing to gain
    n = 2 * 132 * 2 * cfg.mt * 16
    assert C.choose_splits(cfg, 1, n, 4096, 132, "sm90") == 1
    # a short K cannot be split below one k-block per warp
    assert C.choose_splits(cfg, 1, 1024, 256, 132, "sm90") == 1
    # a launch whose partial tiles would overflow the workspace is not split
    big = C.CONFIGS[5]
    tiles = C.WORKSPACE_PARTIAL_BYTES // (big.mt * big.nt * 512) + 1
    assert not C.splits_fit(tiles, 64, 2, big)
    assert not C.splits_fit(C.WORKSPACE_COUNTERS + 1, 64, 2, C.CONFIGS[0])
    assert C.splits_fit(C.WORKSPACE_COUNTERS + 1, 64, 1, C.CONFIGS[0])


def test_ctas_per_sm_from_shared_memory():
    # 68 KB config 0: 3 per H100 SM (228 KB), 2 per A100 SM (164 KB), 1 on sm_86 (100 KB)
    assert [C.ctas_per_sm(C.CONFIGS[0], a) for a in ("sm90", "sm80", "sm86")] == [3, 2, 1]
    assert [C.ctas_per_sm(C.CONFIGS[4], a) for a in ("sm90", "sm80")] == [2, 1]


def test_cpp_constants_match_the_python_mirror():
    text = (ROOT / "csrc" / "sparse_mma" / "split_k.h").read_text()

    def const(name):
        m = re.search(rf"constexpr (?:long long|int) {name} = ([^;]+);", text)
        assert m, name
        return eval(m.group(1).replace("LL", ""))  # integer literals and shifts only

    assert const("kWorkspacePartialBytes") == C.WORKSPACE_PARTIAL_BYTES
    assert const("kWorkspaceCounters") == C.WORKSPACE_COUNTERS
    assert const("kMaxAutoSplits") == C.MAX_AUTO_SPLITS
    assert const("kSplitCostKBlocks") == C.SPLIT_COST_KBLOCKS
    assert "kWorkspacePartialBytes + 4LL * kWorkspaceCounters" in text
    assert C.WORKSPACE_BYTES == C.WORKSPACE_PARTIAL_BYTES + 4 * C.WORKSPACE_COUNTERS

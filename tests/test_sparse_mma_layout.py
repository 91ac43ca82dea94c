"""csrc/sparse_mma/layout.h, compiled by the host compiler, against the Python tables of
sparselora.gpu_layout (which the reorder and the emulator use) for all 32 lanes; the generated
instantiations and dispatch table against sparselora.mma_sp_configs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparselora import gpu_layout as L
from sparselora import mma_sp_configs as C

ROOT = Path(__file__).resolve().parent.parent
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

DUMP = r"""
#include <cstdio>
#include "sparse_mma/layout.h"
using namespace sparselora::sparse_mma;
int main() {
  for (int l = 0; l < 32; ++l) {
    std::printf("a_row %d", l); for (int i = 0; i < 8; ++i) std::printf(" %d", a_row(l, i)); std::printf("\n");
    std::printf("a_col %d", l); for (int i = 0; i < 8; ++i) std::printf(" %d", a_col(l, i)); std::printf("\n");
    std::printf("b_k %d", l); for (int i = 0; i < 8; ++i) std::printf(" %d", b_k(l, i)); std::printf("\n");
    std::printf("b_n %d", l); for (int i = 0; i < 8; ++i) std::printf(" %d", b_n(l, i)); std::printf("\n");
    std::printf("c_row %d", l); for (int i = 0; i < 4; ++i) std::printf(" %d", c_row(l, i)); std::printf("\n");
    std::printf("c_col %d", l); for (int i = 0; i < 4; ++i) std::printf(" %d", c_col(l, i)); std::printf("\n");
    std::printf("meta %d %d %d %d %d\n", l, meta_selector(l), meta_chunk(l), meta_row(l, 0), meta_row(l, 1));
    std::printf("meta_ktile %d", l); for (int w = 0; w < 4; ++w) std::printf(" %d", meta_word_ktile(l, w)); std::printf("\n");
    std::printf("ldm %d %d %d %d\n", l, ldm_row(l), ldm_matrix(l), x_smem_chunk(l, 5));
    std::printf("supplier %d %d %d\n", l, (int)meta_supplier(l, 0), (int)meta_supplier(l, 1));
  }
  const int shapes[][2] = {{1, 8}, {17, 72}, {4096, 11008}, {33, 520}, {100, 64}, {16, 65}};
  for (auto& s : shapes) std::printf("sizes %d %d %d %d %d\n", s[0], s[1], row_tiles(s[0]), k_tiles(s[1]), k_blocks(s[1]));
  std::printf("voff %lld %lld\n", values_offset(2, 3, 5, 7, 10), meta_offset(2, 1, 5, 3, 4));
  std::printf("const %d %d %d %d %u %d\n", kTileM, kTileN, kTileK, kStageKTiles, kPadMetaWord, kKAlign);
  return 0;
}
"""


def _dump(include_root: Path, tmp_path: Path) -> dict:
    src = tmp_path / "dump.cpp"
    src.write_text(DUMP)
    exe = tmp_path / "dump"
    p = subprocess.run([CXX, "-std=c++17", "-O0", f"-I{include_root}", str(src), "-o", str(exe)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = {}
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        key, *vals = line.split()
        out.setdefault(key, []).append(tuple(int(v) for v in vals))
    return out


def _mismatches(d: dict) -> list[str]:
    t = L.lane_tables()
    bad = []
    for key in ("a_row", "a_col", "b_k", "b_n", "c_row", "c_col", "meta", "meta_ktile", "ldm"):
        for lane, row in enumerate(d[key]):
            if row[0] != lane or row[1:] != t[key][lane]:
                bad.append(f"{key} lane {lane}: header {row[1:]} != python {t[key][lane]}")
    for lane, s0, s1 in d["supplier"]:
        if (s0, s1) != (L.meta_selector(lane) == 0, L.meta_selector(lane) == 1):
            bad.append(f"supplier lane {lane}")
    for n, k, mt, kt, kq in d["sizes"]:
        if (mt, kt, kq) != L.gpu_layout_sizes(n, k):
            bad.append(f"sizes of {n}x{k}: header {(mt, kt, kq)} != python {L.gpu_layout_sizes(n, k)}")
    voff, moff = d["voff"][0]
    # the header's offsets are the row-major offsets of the Python buffers' shapes
    if voff != ((2 * 10 + 3) * 32 + 5) * 8 + 7 or moff != ((2 * 4 + 1) * 32 + 5) * 4 + 3:
        bad.append(f"offsets {voff}, {moff}")
    if d["const"][0] != (L.TILE_M, L.TILE_N, L.TILE_K, L.STAGE_KTILES, L.PAD_META_WORD, L.K_ALIGN):
        bad.append(f"constants {d['const'][0]}")
    return bad


needs_cxx = pytest.mark.skipif(CXX is None, reason="no host C++ compiler")


@needs_cxx
def test_header_tables_equal_python_tables(tmp_path):
    d = _dump(ROOT / "csrc", tmp_path)
    assert len(d["a_row"]) == 32
    assert _mismatches(d) == []


@needs_cxx
@pytest.mark.parametrize("old,new", [
    ("(i >> 2) * 8; }", "(i >> 1) * 4; }"),                     # a_col: wrong register -> column map
    ("return lane_in_group(lane) >> 1; }", "return lane_in_group(lane) & 1; }"),  # meta_selector swapped
    ("return chunk ^ (row & 7); }", "return chunk ^ (row & 3); }"),  # swizzle
])
def test_broken_header_is_caught(tmp_path, old, new):
    hdr = (ROOT / "csrc" / "sparse_mma" / "layout.h").read_text()
    assert old in hdr
    (tmp_path / "sparse_mma").mkdir()
    (tmp_path / "sparse_mma" / "layout.h").write_text(hdr.replace(old, new))
    assert _mismatches(_dump(tmp_path, tmp_path)) != []


def test_generated_sources_are_up_to_date():
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_sparse_mma.py"), "--check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_stale_generated_source_fails_the_check(tmp_path):
    # a copy of the tree with one instantiation edited: --check must say so
    for d in ("tools", "sparselora", "csrc"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    victim = next((tmp_path / "csrc" / "sparse_mma" / "instantiations").glob("*.cu"))
    victim.write_text(victim.read_text().replace("SPARSELORA_INSTANTIATE_", "SPARSELORA_INSTANTIATE_ "))
    p = subprocess.run([sys.executable, str(tmp_path / "tools" / "gen_sparse_mma.py"), "--check"], capture_output=True, text=True)
    assert p.returncode == 1 and victim.name in p.stdout


def test_every_config_instantiated_and_every_choice_reachable():
    inst = {p.name for p in (ROOT / "csrc" / "sparse_mma" / "instantiations").glob("*.cu")}
    for cfg in C.CONFIGS:
        for d in ("f16", "bf16"):
            assert f"linear_{d}_{cfg.name}.cu" in inst
    assert set(C.CHOICE.values()) == {c.id for c in C.CONFIGS}, "a config no table entry picks"
    for (arch, bucket, wide), cid in C.CHOICE.items():
        assert C.smem_bytes(C.CONFIGS[cid]) <= C.SMEM_LIMIT[arch], (arch, bucket, wide)
        assert C.CONFIGS[cid].tokens == bucket, (arch, bucket, wide)
    for arch in C.SMEM_LIMIT:
        for m, tokens in ((1, 8), (8, 8), (9, 16), (16, 16), (17, 32), (C.PREFILL_MIN_M - 1, 32)):
            assert C.choose_config(m, 4096, arch).tokens == tokens
    dispatch = (ROOT / "csrc" / "sparse_mma" / "dispatch.inc").read_text()
    for cfg in C.CONFIGS:
        assert f"case {cfg.id}:" in dispatch


def test_prefill_configs_instantiated_chosen_from_the_threshold_and_fit():
    inst = {p.name for p in (ROOT / "csrc" / "sparse_mma" / "instantiations").glob("*.cu")}
    dispatch = (ROOT / "csrc" / "sparse_mma" / "dispatch.inc").read_text()
    ids = [c.id for c in C.CONFIGS + C.PREFILL_CONFIGS]
    assert len(set(ids)) == len(ids), "config ids collide"
    for cfg in C.PREFILL_CONFIGS:
        for d in ("f16", "bf16"):
            assert f"linear_{d}_{cfg.name}.cu" in inst
        assert f"case {cfg.id}:" in dispatch and "launch_prefill_cfg" in dispatch
    assert set(C.PREFILL_CHOICE.values()) == {c.id for c in C.PREFILL_CONFIGS}, "a prefill config no arch picks"
    assert f"if (m >= {C.PREFILL_MIN_M})" in dispatch  # the generated C++ uses the same threshold
    assert f">= {C.PREFILL_MIN_CTAS}) return" in dispatch
    for arch, cid in C.PREFILL_CHOICE.items():
        cfg = C.config_by_id(cid)
        assert C.prefill_smem_bytes(cfg) <= C.SMEM_LIMIT[arch], arch
        for m, n in ((4096, 4096), (16384, 1024), (1024, 11008), (C.PREFILL_MIN_M, 300 * cfg.rows)):
            assert C.choose_config(m, n, arch) is cfg, (arch, m, n)
        # below the token threshold, or a grid of less than one wave: the decode configs
        for m, n in ((C.PREFILL_MIN_M - 1, 300 * cfg.rows), (C.PREFILL_MIN_M, 4096), (128, 64)):
            assert isinstance(C.choose_config(m, n, arch), C.TileConfig), (arch, m, n)
    # the sm_90 tile does not fit sm_80 or sm_86/89: the launcher refuses it there (launch.cu)
    assert C.prefill_smem_bytes(C.config_by_id(C.PREFILL_CHOICE["sm90"])) > C.SMEM_LIMIT["sm80"]
    with pytest.raises(KeyError, match="no mma.sp config 99"):
        C.config_by_id(99)

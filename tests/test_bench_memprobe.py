"""benchmarks/memprobe.py, shared by bench_load.py and bench_offload_prune.py: the peak-RSS readers
and the fresh-process runner measure a real allocation, the scaled LLaVA configs are the ones the
benchmarks documented, and both benchmarks' child scripts compile against it."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_ALLOC = r'''
import json, sys
from memprobe import AnonPeak, peak_rss, rss_anon, ru_maxrss
anon = AnonPeak(0.005)
before, anon_before = peak_rss(), rss_anon()
block = bytearray(int(sys.argv[1]) * 2**20)
block[::4096] = b"x" * len(block[::4096])  # touch every page
del block
print("RESULT " + json.dumps({"before": before, "peak": peak_rss(), "anon_before": anon_before,
                              "anon_peak": anon.final(), "ru_maxrss": ru_maxrss()}))
'''


def test_child_measures_a_real_allocation():
    mp = _load("memprobe")
    r = mp.run_child(_ALLOC, "96", what="alloc")
    assert r["peak"] - r["before"] >= 90 * mp.MiB  # VmHWM saw the 96 MiB, freed before the reading
    assert r["ru_maxrss"] >= r["peak"] - mp.MiB
    assert r["anon_peak"] >= r["anon_before"]
    with pytest.raises(RuntimeError, match="alloc: failed"):
        mp.run_child("raise SystemExit(3)", what="alloc")


def test_benchmarks_share_the_helpers_and_keep_their_configs():
    load, offload = _load("bench_load"), _load("bench_offload_prune")
    mp = sys.modules["memprobe"]
    assert load.run_child is offload.run_child is mp.run_child
    big, half = load.llava_1b_config(), offload.llava_half_b_config()
    # the sizes the benchmarks' docstrings and NOTES figures were measured with
    assert (big.image_seq_length, big.vision_config.image_size, big.text_config.hidden_size,
            big.text_config.intermediate_size, big.text_config.num_hidden_layers) == (196, 224, 2048, 5504, 18)
    assert (half.image_seq_length, half.vision_config.image_size, half.text_config.hidden_size,
            half.text_config.intermediate_size, half.text_config.num_hidden_layers) == (49, 112, 1536, 4096, 12)
    assert big.text_config.num_key_value_heads == half.text_config.num_key_value_heads == 4
    for mod in (load, offload):  # the child scripts: syntax, and no private VmHWM reader left
        compile(mod._CHILD, mod.__name__, "exec")
        assert "from memprobe import" in mod._CHILD and "/proc/self/status" not in mod._CHILD


def test_benchmark_parents_do_not_import_torch():
    # a parent that imported torch would carry its peak into every child's ru_maxrss
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import bench_load, bench_offload_prune; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr

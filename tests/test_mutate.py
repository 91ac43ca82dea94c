"""The mutation harness (tools/mutate.py) stays usable: every planted bug still finds its anchor
exactly once, and the machinery (a copy of the tree that is what gets imported, a baseline run,
one mutant killed) works end to end on one cheap mutant. The full run (35 mutants, a few
minutes) is `python tools/mutate.py`; README.md has its last result."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("mutate", ROOT / "tools" / "mutate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mutate"] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("mutate", None)


def test_every_anchor_matches_exactly_once(mutate):
    assert len(mutate.MUTANTS) >= 12 and len({m.id for m in mutate.MUTANTS}) == len(mutate.MUTANTS)
    assert mutate.check_anchors(ROOT, mutate.MUTANTS) == []
    areas = {m.area for m in mutate.MUTANTS}
    for area in ("format", "triton gemm", "triton gemv", "sparselora kernel", "sparselora merge", "backend reference",
                 "backend triton", "backend triton-gemv", "backend cusparselt", "dispatch", "pruning", "checkpoint", "patcher"):
        assert area in areas, area


def test_a_moved_anchor_is_reported(mutate, tmp_path):
    m = mutate.MUTANTS[0]
    (tmp_path / Path(m.file).parent).mkdir(parents=True)
    (tmp_path / m.file).write_text("the code moved on\n")
    for t in m.tests:
        (tmp_path / t.split("::")[0]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / t.split("::")[0]).touch()
    assert mutate.check_anchors(tmp_path, [m]) == [f"{m.id}: anchor occurs 0 times in {m.file} (must be exactly once): {m.old!r}"]


def test_harness_kills_a_planted_bug_in_a_copy(mutate, capsys):
    # the cheapest mutant: a pure-Python policy rule, its test runs in well under a second
    assert mutate.main(["nearest-tie"]) == 0
    out = capsys.readouterr().out
    assert "baseline (unmutated copy" in out and "passed" in out
    assert "nearest-tie" in out and "killed" in out and "1 of 1 mutants killed" in out

"""tools/gpu_run.py (the GPU lease runner) on CPU: the plan of every command fits the 9-minute
budget, every stage's arguments are accepted by its script, and a run with fake stages writes only
its few output files, keeps partial results of a stage killed at its time limit and reports it."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "tools" / "gpu_run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_run"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_quick_dry_run_lists_stages_budgets_and_outputs():
    p = subprocess.run(["bash", "tools/gpu_run.sh", "quick", "--dry-run", "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PY=sys.executable))
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    names = [s["name"] for s in plan["stages"]]
    assert names == ["install", "build", "smoke", "decode", "prefill", "lora", "pytest", "pack"]
    assert plan["budget_s"] == sum(s["budget_s"] for s in plan["stages"]) <= 9 * 60
    assert all(s["budget_s"] > 0 for s in plan["stages"])
    assert [s["name"] for s in plan["stages"] if s["background"]] == ["build"]
    # few files come back from $OUT: the quick run writes a handful, everything else is in the archive
    assert len(plan["outputs"]) <= 4 and "results.tgz" in plan["outputs"] and "summary.md" in plan["outputs"]
    for s in plan["stages"]:  # every stage leaves something in $OUT (a log and/or result files, via the archive)
        assert s["log"] or s["results"], s
    # the measurement stages write their named result files
    res = {s["name"]: s["results"] for s in plan["stages"]}
    assert res["decode"] == ["decode.json", "decode.md"] and res["smoke"] == ["smoke.json", "smoke.md"]


def test_every_command_fits_nine_minutes_and_list_shows_them():
    g = _load()
    for command in g.COMMANDS:
        plan = g.plan(command)
        assert plan["budget_s"] == sum(s["budget_s"] for s in plan["stages"]) <= g.LIMIT_S == 540, command
    p = subprocess.run([sys.executable, "tools/gpu_run.py", "list"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and all(c in p.stdout for c in g.COMMANDS)
    p = subprocess.run([sys.executable, "tools/gpu_run.py", "nonsense", "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "unknown command" in p.stderr


def test_quick_stage_arguments_are_accepted_by_their_scripts():
    # A renamed or dropped option would be an argparse error found only on the GPU machine.
    g = _load()
    checked = []
    for s in [s for stages in g.COMMANDS.values() for s in stages]:
        if not s.argv[1].startswith("benchmarks/"):
            continue
        spec = importlib.util.spec_from_file_location(f"stage_{s.name}", ROOT / s.argv[1])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if not hasattr(mod, "parser"):  # scripts that parse inside main (e2e, tune_*) take no arguments here
            assert s.argv[2:] == [], s
            continue
        args = mod.parser().parse_args(g._fill(s.argv[2:], sys.executable, ROOT / "build"))  # SystemExit(2) if not
        checked.append((s.name, args.name))
        with_parser = mod
    assert checked[:4] == [("smoke", "smoke"), ("decode", "decode"), ("prefill", "prefill"), ("lora", "lora")]
    assert ("gemm", "gemm") in checked and ("lora_full", "sparse_lora") in checked
    with pytest.raises(SystemExit):  # and the check can fail
        with_parser.parser().parse_args(["--no-such-option"])


def test_fake_run_keeps_partial_results_of_a_killed_stage(tmp_path, monkeypatch):
    g = _load()
    py = sys.executable
    write = "import pathlib,sys,time; pathlib.Path(sys.argv[1]).write_text('partial'); sys.stdout.flush(); time.sleep(float(sys.argv[2]))"
    monkeypatch.setattr(g, "_versions", lambda py, env: {"device": "fake"})
    monkeypatch.setattr(g, "_probe_extension", lambda py, env: (False, "no such extension"))
    monkeypatch.setattr(g.Run, "ensure_importable", lambda self: None)  # this venv has the package
    monkeypatch.setattr(g, "INSTALL", g.Stage("install", 5, [py, "-c", "print('installed')"], needs_ext=False))
    monkeypatch.setattr(g, "BUILD", g.Stage("build", 3, [py, "-c", "print('building')"], needs_ext=False))
    monkeypatch.setitem(g.COMMANDS, "fake", [
        g.Stage("first", 20, ["{PY}", "-c", write, "{WORK}/first.json", "0"], results=["first.json"]),
        g.Stage("slow", 2, ["{PY}", "-c", write, "{WORK}/slow.json", "60"], results=["slow.json"]),
        g.Stage("broken", 20, ["{PY}", "-c", "import sys; sys.exit(3)"], needs_ext=False),
    ])
    out, work = tmp_path / "out", tmp_path / "work"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setenv("GPU_RUN_WORK", str(work))
    monkeypatch.setenv("PY", py)
    assert g.main(["fake"]) == 1  # some stage was not ok
    assert sorted(p.name for p in out.iterdir()) == ["build.log", "results.tgz", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "| slow | timeout |" in summary and "| broken | failed |" in summary and "| first | ok |" in summary
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
        assert {"fake/first.json", "fake/slow.json", "fake/slow.log", "fake/broken.log", "fake/build.log",
                "fake/gpu_run.json"} <= names, names
        assert tar.extractfile("fake/slow.json").read() == b"partial"  # written before the kill
        status = json.loads(tar.extractfile("fake/gpu_run.json").read())["status"]
    assert status["slow"]["status"] == "timeout" and status["slow"]["seconds"] < 15
    assert status["build"]["status"] == "failed" and "does not load" in status["build"]["note"]


def test_smoke_verdict_rejects_wrong_answers():
    # benchmarks/gpu_smoke.py's check() decides what the first GPU run calls correct: it must
    # pass a right answer and fail a dropped bias, a NaN, a wrong shape and an exception.
    import torch
    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    k, n = 4096, 256
    w = torch.randn(n, k).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16)
    x = torch.randn(37, k).to(torch.bfloat16)
    assert smoke.check(lambda x: F.linear(x, w, b), x, w, b)["ok"] is True
    assert smoke.check(lambda x: F.linear(x, w), x, w, b)["ok"] is False  # bias dropped
    assert smoke.check(lambda x: F.linear(x, w, b).index_fill(0, torch.tensor([3]), float("nan")), x, w, b)["ok"] is False
    assert smoke.check(lambda x: F.linear(x, w, b)[:-1], x, w, b)["ok"] is False
    bad = smoke.check(lambda x: 1 / 0, x, w, b)
    assert bad["ok"] is False and "ZeroDivisionError" in bad["error"]

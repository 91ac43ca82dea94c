"""GPU runs that fit a lease: each command finishes in <= 9 minutes and returns a handful of files.

    bash tools/gpu_run.sh quick              # first contact (9 min worst case): see COMMANDS
    bash tools/gpu_run.sh quick --dry-run    # stages, time budgets and output names; runs nothing
    bash tools/gpu_run.sh list               # every command with its budget

A device machine gives ~15 minutes in all (its start included), 10 per command, and only a few
files back from ``$OUT``. So every command here:

* runs its stages one after the other, each in its own process group under its own time limit
  (``timeout`` semantics: killed at the limit, what it wrote so far is kept);
* installs the Python package first (editable, no deps, no extension: seconds), then builds the
  CUDA extension in the background (log: ``$OUT/build.log``); stages that use it wait for the
  build up to its budget and otherwise run without it (the backends then report "extension not
  built", which the summary repeats);
* after every stage rewrites ``$OUT/summary.md`` (device, versions, command, each stage's status,
  the decode/prefill geo-means) and ``$OUT/results.tgz`` (every stage's log and result files):
  an interrupted run still returns everything that finished. Three files in all.

Without ``$OUT`` the files go to ``build/gpu_run/<command>/out``. ``PY`` (default ``python3``)
is the interpreter. This file imports no torch: ``--dry-run`` works anywhere (a CPU test checks
it: tests/test_gpu_run.py).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the device tool's limit is 10 minutes per command: every command plans for 9 at worst
LIMIT_S = 540
OUTPUTS = ("build.log", "summary.md", "results.tgz")
# the focused GPU test subset of `quick`: the kernels and backends, not inductor compiles
# (cheapest first: a stage killed at its limit still reports the files it finished)
QUICK_TESTS = ["tests/test_gpu_risks.py", "tests/test_mma_sp_backend.py", "tests/test_cusparselt.py",
               "tests/test_triton_gemv.py", "tests/test_triton_gemm.py"]


@dataclass
class Stage:
    name: str
    budget_s: int
    argv: list[str]  # "{PY}" and "{WORK}" are filled in at run time
    needs_ext: bool = True  # wait for the extension build first
    results: list[str] = field(default_factory=list)  # result files (in the run folder) it writes
    env: dict = field(default_factory=dict)  # extra environment of this stage


def _py(script: str, *args: str) -> list[str]:
    return ["{PY}", script, *args]


# the Python package only (seconds): the extension is BUILD's job, in the background
INSTALL = Stage("install", 30, ["{PY}", "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
                needs_ext=False, env={"SPARSELORA_BUILD_CUDA": "0", "PIP_BREAK_SYSTEM_PACKAGES": "1",
                                      "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
# background: an in-place build next to the editable install's sources (sparselora/_C*.so)
BUILD = Stage("build", 150, ["{PY}", "setup.py", "-q", "build_ext", "--inplace"], needs_ext=False,
              env={"SPARSELORA_BUILD_CUDA": "1"})
PACK_S = 15  # each publish (summary + archive), the version probe, the import probe

COMMANDS: dict[str, list[Stage]] = {
    "quick": [
        Stage("smoke", 75, _py("benchmarks/gpu_smoke.py", "--name", "smoke"), results=["smoke.json", "smoke.md"]),
        Stage("decode", 90, _py("benchmarks/bench_gemm.py", "--shapes", "llava", "--tokens", "1", "4", "16",
                                "--name", "decode", "--no-plot"), results=["decode.json", "decode.md"]),
        Stage("prefill", 60, _py("benchmarks/bench_gemm.py", "--shapes", "llava", "--tokens", "4096", "16384",
                                 "--name", "prefill", "--no-plot"), results=["prefill.json", "prefill.md"]),
        Stage("lora", 45, _py("benchmarks/bench_sparse_lora.py", "--shapes", "llava", "--m", "1", "16", "4096",
                              "--forward-only", "--name", "lora"), results=["lora.json", "lora.md"]),
        Stage("pytest", 75, ["{PY}", "-m", "pytest", "-q", "-x", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                             "-k", "not torch_compile", "--junitxml={WORK}/pytest.xml", *QUICK_TESTS],
              results=["pytest.xml"]),
    ],
    # later calls, one per command, each <= 9 minutes on paper (benchmarks/NOTES.md)
    "gemm": [Stage("gemm", 330, _py("benchmarks/bench_gemm.py", "--name", "gemm", "--cold-check"),
                   results=["gemm.json", "gemm.md", "gemm.png"])],
    "lora_full": [Stage("lora_full", 330, _py("benchmarks/bench_sparse_lora.py", "--name", "sparse_lora"),
                        results=["sparse_lora.json", "sparse_lora.md"])],
    "e2e": [Stage("e2e", 330, _py("benchmarks/bench_e2e.py"), results=["e2e_llava.json", "e2e_llava.md", "e2e_llava.png"])],
    "tune": [Stage("tune_hybrid", 200, _py("benchmarks/tune_hybrid.py"), results=["tune_hybrid.json", "tune_hybrid.md"]),
             Stage("tune_gemv", 130, _py("benchmarks/tune_gemv.py"), results=["tune_gemv.json", "tune_gemv.md"])],
    # the mma-sp table auto reads (sparselora/backends/mma_sp_policy.py); the table comes back in results.tgz
    "tune_mma": [Stage("tune_mma_sp", 330, _py("benchmarks/tune_mma_sp.py"), results=["tune_mma_sp.json", "tune_mma_sp.md"])],
    "tests": [Stage("pytest_all", 330, ["{PY}", "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                                        "--junitxml={WORK}/pytest_all.xml", "tests/"], results=["pytest_all.xml"])],
    "sanitize": [
        Stage("sanitize_cslt", 150, ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", "{PY}", "-m",
                                     "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_cusparselt.py", "-k",
                                     "leading_dims or non_contiguous or interleaved or (matches and 48-80)"]),
        Stage("sanitize_triton", 180, ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", "{PY}", "-m",
                                       "pytest", "-q", "-x", "-m", "gpu", "-p", "no:cacheprovider", "-k",
                                       "not torch_compile", "tests/test_triton_gemm.py", "tests/test_triton_gemv.py"]),
    ],
    # memcheck + racecheck over every mma.sp tile config (racecheck is slow: its own command)
    "sanitize_mma": [Stage("sanitize_mma", 320, ["bash", "tools/sanitize_sparse_mma.sh"])],
}


def budget(command: str) -> int:
    """Worst case on paper: install, the whole build budget (the first stage that needs the
    extension may wait for all of it), every stage's budget, packing."""
    return INSTALL.budget_s + BUILD.budget_s + sum(s.budget_s for s in COMMANDS[command]) + PACK_S


def plan(command: str) -> dict:
    stages = [INSTALL, BUILD, *COMMANDS[command]]
    return {
        "command": command,
        "limit_s": LIMIT_S,
        "budget_s": budget(command),
        "outputs": list(OUTPUTS),
        "stages": [{"name": s.name, "budget_s": s.budget_s, "background": s is BUILD, "needs_extension": s.needs_ext,
                    "log": f"{s.name}.log", "results": s.results, "argv": s.argv} for s in stages]
               + [{"name": "pack", "budget_s": PACK_S, "background": False, "needs_extension": False,
                   "log": None, "results": list(OUTPUTS), "argv": []}],
    }


# -------------------------------------------------------------------------------------------------
# running


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)  # its own session: the stage and everything it started
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _probe_extension(py: str, env: dict) -> tuple[bool, str]:
    """Does the built extension load in a fresh interpreter? (ok, cuSPARSELt version or the error)"""
    try:
        p = subprocess.run([py, "-c", "import sparselora._C, torch; print(torch.ops.sparselora.cslt_version(0))"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, repr(e)
    if p.returncode == 0:
        return True, p.stdout.strip()
    return False, (p.stderr.strip().splitlines() or ["?"])[-1][:300]


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200].replace("|", "/") if lines else ""


def _fill(argv: list[str], py: str, work: Path) -> list[str]:
    return [a.replace("{PY}", py).replace("{WORK}", str(work)) for a in argv]


class Run:
    def __init__(self, command: str, out: Path, work: Path, py: str):
        self.command, self.out, self.work, self.py = command, out, work, py
        self.t0 = time.time()
        self.status: dict[str, dict] = {}
        self.build: subprocess.Popen | None = None
        self.build_deadline = 0.0
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", SPARSELORA_RESULTS_DIR=str(work),
                        TRITON_CACHE_AUTOTUNING="1",  # stages are separate processes: keep autotune choices
                        MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 8)))
        self.env.pop("TRITON_INTERPRET", None)
        if shutil.which("nvcc", path=self.env.get("PATH")) is None:  # setup.py and torch look nvcc up on PATH
            for cand in ("/usr/local/cuda/bin", "/usr/local/cuda-13.0/bin", "/usr/local/cuda-12/bin"):
                if os.path.isfile(os.path.join(cand, "nvcc")):
                    self.env["PATH"] = self.env.get("PATH", "") + os.pathsep + cand
                    break

    def ensure_importable(self) -> None:
        """After INSTALL: if ``sparselora.triton_kernels`` does not import (the editable install
        failed, e.g. an old setuptools), fall back to the source tree on PYTHONPATH, with the
        link that ``package_dir`` would have made (``sparselora/triton_kernels -> ../triton_kernels``)."""
        probe = [self.py, "-c", "import sparselora.triton_kernels.sparse24_gemm"]
        if subprocess.run(probe, cwd=self.work, env=self.env, capture_output=True, timeout=120).returncode == 0:
            return
        link = ROOT / "sparselora" / "triton_kernels"
        if not link.exists():
            link.symlink_to(Path("..") / "triton_kernels")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p)
        ok = subprocess.run(probe, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=120)
        note = "package imports from the source tree (PYTHONPATH fallback)" if ok.returncode == 0 else \
            "sparselora does not import: " + (ok.stderr.strip().splitlines() or ["?"])[-1][:200]
        self.status.setdefault("install", {}).setdefault("note", "")
        self.status["install"]["note"] = (self.status["install"]["note"] + "; " + note).strip("; ")
        self.log(note)

    def log(self, msg: str) -> None:
        line = f"[gpu_run {time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        with open(self.work / "gpu_run.log", "a") as f:
            f.write(line + "\n")

    def start_build(self) -> None:
        env = dict(self.env, **BUILD.env)
        logf = open(self.out / "build.log", "w")
        self.build = subprocess.Popen(_fill(BUILD.argv, self.py, self.work), cwd=ROOT, env=env, stdout=logf,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.build_deadline = time.time() + BUILD.budget_s
        self.status["build"] = {"status": "running", "budget_s": BUILD.budget_s}
        self.log(f"build started in the background (log: build.log, budget {BUILD.budget_s} s)")

    def _finish_build(self, rc: int | None, note: str = "") -> None:
        st = self.status["build"]
        if st["status"] != "running":
            return
        st["seconds"] = round(time.time() - (self.build_deadline - BUILD.budget_s), 1)
        if rc == 0:
            ok, what = _probe_extension(self.py, self.env)
            st.update(status="ok" if ok else "failed",
                      note="sparselora._C loads, cuSPARSELt " + what if ok else "built but does not load: " + what)
        else:
            st.update(status="failed" if rc is not None else "timeout", note=note or f"exit {rc}, see build.log")
        with open(self.out / "build.log", "a") as f:
            f.write(f"\n[gpu_run] build: {st['status']}: {st.get('note', '')}\n")
        self.log(f"build: {st['status']} {st.get('note', '')}")

    def wait_build(self) -> None:
        if self.build is None or self.status["build"]["status"] != "running":
            return
        try:
            rc = self.build.wait(max(0.0, self.build_deadline - time.time()))
            self._finish_build(rc)
        except subprocess.TimeoutExpired:
            # leave it running: a later stage may still find it; stages now run without it
            self.status["build"]["note"] = f"still building after its {BUILD.budget_s} s budget"
            self.log("build not finished within its budget: stages run without the extension")

    def stop_build(self) -> None:
        if self.build is None:
            return
        rc = self.build.poll()
        if rc is None:
            _kill(self.build)
            self.status["build"]["status"] = "running"
            self._finish_build(None, f"killed at the end of the run (over {BUILD.budget_s} s)")
        else:
            self._finish_build(rc)

    def stage(self, s: Stage) -> None:
        if s.needs_ext:
            self.wait_build()
        if self.build is not None and self.build.poll() is not None:
            self._finish_build(self.build.returncode)
        self.log(f"stage {s.name} (budget {s.budget_s} s)")
        t = time.time()
        with open(self.work / f"{s.name}.log", "w") as logf:
            logf.write("$ " + " ".join(_fill(s.argv, self.py, self.work)) + "\n")
            logf.flush()
            try:
                proc = subprocess.Popen(_fill(s.argv, self.py, self.work), cwd=ROOT, env=dict(self.env, **s.env), stdout=logf,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                self.status[s.name] = {"status": "failed", "seconds": 0.0, "budget_s": s.budget_s, "note": str(e)}
                self.log(f"stage {s.name}: could not start: {e}")
                return
            try:
                rc = proc.wait(s.budget_s)
                status = "ok" if rc == 0 else "failed"
                note = "" if rc == 0 else f"exit {rc}: {_last_line(self.work / f'{s.name}.log')}"
            except subprocess.TimeoutExpired:
                _kill(proc)
                status, note = "timeout", f"killed at its {s.budget_s} s budget (partial results kept)"
        self.status[s.name] = {"status": status, "seconds": round(time.time() - t, 1), "budget_s": s.budget_s, "note": note}
        self.log(f"stage {s.name}: {status} in {time.time() - t:.0f} s {note}")

    def publish(self) -> None:
        """Rewrite summary.md and results.tgz in the output folder (each atomically)."""
        summary = render_summary(self.command, self.status, self.work, self.py, self.env, time.time() - self.t0)
        (self.work / "summary.md").write_text(summary)
        tmp = self.out / "summary.md.tmp"
        tmp.write_text(summary)
        os.replace(tmp, self.out / "summary.md")
        tmp = self.out / "results.tgz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for p in sorted(self.work.iterdir()):
                if p.is_file() and not p.name.endswith(".tmp"):
                    tar.add(p, arcname=f"{self.command}/{p.name}")
            if (self.out / "build.log").is_file():
                tar.add(self.out / "build.log", arcname=f"{self.command}/build.log")
            meta = json.dumps({"status": self.status, "plan": plan(self.command)}, indent=1).encode()
            info = tarfile.TarInfo(f"{self.command}/gpu_run.json")
            info.size, info.mtime = len(meta), int(time.time())
            tar.addfile(info, io.BytesIO(meta))
        os.replace(tmp, self.out / "results.tgz")


def _versions(py: str, env: dict) -> dict:
    code = (
        "import json, platform, importlib.metadata as md\n"
        "v = lambda d: (md.version(d) if d in {x.metadata['Name'] for x in md.distributions()} else None)\n"
        "import torch\n"
        "i = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
        "     'triton': v('triton'), 'transformers': v('transformers'),\n"
        "     'cusparselt (torch)': torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,\n"
        "     'nvidia-cusparselt-cu13': v('nvidia-cusparselt-cu13'), 'nvidia-cusparselt-cu12': v('nvidia-cusparselt-cu12')}\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    i.update(device=p.name, capability=f'{p.major}.{p.minor}', sms=p.multi_processor_count,\n"
        "             memory_gib=round(p.total_memory / 2**30, 1), l2_mib=round(p.L2_cache_size / 2**20, 1))\n"
        "print(json.dumps(i))\n")
    try:
        p = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        info = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-300:]}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        info = {"error": repr(e)}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                     timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


_VERSIONS: dict = {}


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def render_summary(command: str, status: dict, work: Path, py: str, env: dict, elapsed: float) -> str:
    if not _VERSIONS:
        _VERSIONS.update(_versions(py, env))
    lines = [f"# gpu_run {command}", "",
             f"command: `bash tools/gpu_run.sh {command}` (PY={py}), {elapsed:.0f} s so far of a {budget(command)} s plan", ""]
    lines += ["| what | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in _VERSIONS.items()]
    lines += ["", "## Stages", "", "| stage | status | seconds | budget s | note |", "|---|---|---|---|---|"]
    for name, st in status.items():
        lines.append(f"| {name} | {st['status']} | {st.get('seconds', '')} | {st.get('budget_s', '')} | {st.get('note', '')} |")
    for name in ("decode", "prefill", "gemm", "smoke", "lora", "sparse_lora", "e2e_llava", "tune_hybrid", "tune_gemv", "tune_mma_sp"):
        path = work / f"{name}.json"
        if not path.is_file():
            continue
        try:
            summ = json.loads(path.read_text()).get("summary", {})
        except ValueError:
            continue
        keys = [k for k in summ if name not in ("decode", "prefill", "gemm") or "(graph)" in k or "errors" in k]
        if name == "smoke":
            rows = json.loads(path.read_text()).get("rows", [])
            for r in rows:
                if r.get("ok") is False:
                    summ[f"FAIL {r['method']} {r['N']}x{r['K']} M={r['M']}"] = r.get("error", "")
            worst: dict = {}
            for r in rows:
                if isinstance(r.get("rel_err"), float):
                    worst[r["method"]] = max(worst.get(r["method"], 0.0), r["rel_err"])
            for m, e in worst.items():
                summ[f"{m} worst rel err"] = e
            keys = list(summ)
        if keys:
            lines += ["", f"## {name}" + (" (graph-timed: many calls over rotating weight copies; eager in the json)"
                                          if name in ("decode", "prefill", "gemm") else ""), "",
                      "| | |", "|---|---|"] + [f"| {k} | {_fmt(summ[k])} |" for k in keys]
    for log in sorted(work.glob("pytest*.log")) + sorted(work.glob("sanitize*.log")):
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        lines += ["", f"## {log.stem} (last lines of its log)", "", "```", *tail, "```"]
    for xml in sorted(work.glob("pytest*.xml")):
        head = xml.read_text()[:2000]
        counts = {k: re.search(fr'{k}="(\d+)"', head) for k in ("tests", "failures", "errors", "skipped")}
        lines += ["", f"## {xml.stem}: " + ", ".join(f"{k} {v.group(1)}" for k, v in counts.items() if v)]
    lines += ["", "Every figure above was measured in this run; logs and result files are in results.tgz."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", default="quick", help="quick (default), list, or one of: " + ", ".join(COMMANDS))
    ap.add_argument("--dry-run", action="store_true", help="print the plan (stages, budgets, outputs); run nothing")
    ap.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    args = ap.parse_args(argv)
    if args.command == "list":
        for c in COMMANDS:
            print(f"{c:10s} {budget(c):4d} s  stages: {', '.join(s.name for s in COMMANDS[c])}")
        return 0
    if args.command not in COMMANDS:
        print(f"gpu_run: unknown command {args.command!r}; commands: list, {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if args.dry_run:
        p = plan(args.command)
        if args.json:
            print(json.dumps(p, indent=1))
        else:
            print(f"gpu_run {args.command}: worst case {p['budget_s']} s (limit {LIMIT_S} s); outputs in $OUT: "
                  + ", ".join(p["outputs"]))
            for s in p["stages"]:
                print(f"  {s['name']:16s} {s['budget_s']:4d} s{'  (background)' if s['background'] else ''}"
                      f"{'  waits for the extension' if s['needs_extension'] and not s['background'] else ''}"
                      f"  -> {', '.join(s['results']) or s['log']}")
        return 0

    py = os.environ.get("PY", "python3")
    default_out = ROOT / "build" / "gpu_run" / args.command / "out"
    out = Path(os.environ.get("OUT") or default_out)
    work = Path(os.environ.get("GPU_RUN_WORK") or ROOT / "build" / "gpu_run" / args.command / "work")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for p in work.iterdir():
        if p.is_file():
            p.unlink()
    run = Run(args.command, out, work, py)
    run.log(f"command {args.command}: plan {budget(args.command)} s, out {out}, work {work}")
    run.stage(INSTALL)
    run.ensure_importable()
    run.publish()
    run.start_build()
    try:
        for s in COMMANDS[args.command]:
            run.stage(s)
            run.publish()
    finally:
        run.stop_build()
        run.publish()
    bad = [n for n, st in run.status.items() if st["status"] != "ok"]
    run.log("done: " + ("all stages ok" if not bad else "not ok: " + ", ".join(bad)) + f"; files in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

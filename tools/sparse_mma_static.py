#!/usr/bin/env python
"""Static gates of the mma.sp kernels, read from the cubin (no GPU needed).

    python tools/sparse_mma_static.py                   # every config, bf16, sm_80/86/89/90a; exit 1 if a gate fails
    python tools/sparse_mma_static.py --report FILE.md  # also write the table
    python tools/sparse_mma_static.py --src DIR --configs 0   # gate a (modified) copy of csrc/ (tests)

One nvcc run per config (a fatbin with every arch, ``-Xptxas -v``), then ``cuobjdump -sass``
(shipped in the triton wheel). Gates, per (config, arch):

* no spills (ptxas: 0-byte stack frame, no spill stores/loads);
* the main loop (the backward branch whose body holds the HMMAs) has ``HMMA.SP`` (sparse tensor
  cores; the same mnemonic on sm_80..sm_90a), exactly MT * NT * 8 of them per iteration, and every
  global load in it is 16 bytes wide (``LDGSTS.E.BYPASS.128`` / ``LDG.E.128``);
* static roofline: the loop's instructions by pipe, per packed weight byte (MT * 4608 bytes per
  warp-iteration), and the bound they imply in packed bytes / clock / SM must reach the HBM need
  (default 18.4, H200; H100 needs 12.8).
* prefill configs (``prefill_kernel.cuh``, compute-bound): exactly WMT * WNT * 4 HMMA.SP per
  iteration (one stage), and on the archs the table picks them for, the tensor pipe's clocks must
  be >= 60% of the busiest pipe's (the predicted fraction of the sparse tensor-core peak); the
  report also gives HMMA.SP's share of the loop's issue slots.

Pipe model (warp instructions per SM, a model, not a measurement): issue 4 / clock (one per
scheduler); integer ALU (IADD3, LOP3, SHF, SEL, ISETP, LEA, MOV, ...) 2 / clock and FMA-pipe ops
(IMAD, FFMA, ...) 2 / clock (64 lanes each); the shared-memory / L1 datapath 128 bytes / clock, so
a warp's 16-byte-per-lane access (LDS.128, LDGSTS.128, LDSM.x4) costs 4 clocks and any access at
least 1 (a never-executed ``@!PT`` filler costs an issue slot only); a sparse m16n8k32 HMMA 2 clocks on sm_80/sm_90 (1024 dense-equivalent FMA / clock / SM),
4 on sm_86/89. The bound is bytes per iteration / the busiest pipe's clocks: it assumes perfect
overlap between pipes and enough resident warps, so it is an upper bound on the kernel's speed.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90a")
HBM_NEED = 18.4  # H200: 4.8 TB/s / (132 SMs * ~1.98 GHz)
BYTES_PER_KTILE = 576  # 16 rows x 32 columns: 512 bytes of kept values + 64 of metadata
PREFILL_NEED = 0.6  # prefill gate: the loop's tensor pipe must be >= 60% of its busiest pipe


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def find_nvcc() -> str:
    for c in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda-13.0/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if c and os.path.isfile(c):
            return c
    raise SystemExit("sparse_mma_static: nvcc not found (set NVCC)")


def find_cuobjdump() -> str:
    cands = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and os.path.isfile(c):
            return c
    raise SystemExit("sparse_mma_static: cuobjdump not found (the triton wheel ships one; or set CUOBJDUMP)")


ALU = {"IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "SEL", "FSEL", "ISETP", "FSETP", "PRMT", "LEA", "MOV",
       "IABS", "IMNMX", "VIMNMX", "PLOP3", "P2R", "R2P", "BMSK", "FMNMX", "LEA.HI", "IADD32I", "ISCADD"}
FMA = {"IMAD", "FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "IDP", "DFMA"}
MEM = {"LDG", "LDGSTS", "LDS", "LDSM", "STS", "STG", "LD", "ST", "ATOM", "ATOMS", "ATOMG", "RED", "LDL", "STL"}
TENSOR = {"HMMA", "HGMMA", "IMMA"}


def _width(op: str) -> int:
    """Bytes per lane of a memory instruction, from its suffixes."""
    if op.startswith("LDSM"):
        return {".4": 16, ".2": 8}.get(op[-2:], 4)
    for suf, w in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suf in op:
            return w
    return 4


@dataclass
class LoopStats:
    instructions: int = 0
    by_pipe: dict = field(default_factory=lambda: {"alu": 0, "fma": 0, "mem": 0, "tensor": 0, "other": 0})
    mem_clocks: float = 0.0
    hmma_sp: int = 0
    global_loads: list = field(default_factory=list)


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """{arch: [(address, instruction)]} of the one kernel in a cuobjdump -sass listing."""
    out, arch = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            out.setdefault(arch, [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and arch:
            out[arch].append((int(m.group(1), 16), m.group(2).strip()))
    return out


def _opcode(ins: str) -> str:
    toks = ins.split()
    if toks and toks[0].startswith("@"):
        toks = toks[1:]
    return toks[0] if toks else ""


def main_loop(code: list[tuple[int, str]]) -> list[str]:
    """Instructions of the backward-branch range holding the most HMMAs (the K loop)."""
    best, best_n = None, 0
    for addr, ins in code:
        op = _opcode(ins)
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", ins)
            if m and int(m.group(1), 16) < addr:
                body = [i for a, i in code if int(m.group(1), 16) <= a <= addr]
                n = sum(_opcode(i).startswith("HMMA") for i in body)
                if n > best_n or (n == best_n and best is not None and len(body) < len(best)):
                    best, best_n = body, n
    return best or []


def loop_stats(body: list[str]) -> LoopStats:
    s = LoopStats(instructions=len(body))
    for ins in body:
        op = _opcode(ins)
        base = op.split(".")[0]
        if ins.startswith("@!PT"):  # never executed (scheduling filler): an issue slot, no pipe work
            s.by_pipe["other"] += 1
        elif base in TENSOR:
            s.by_pipe["tensor"] += 1
            s.hmma_sp += op.startswith("HMMA.SP")
        elif base in MEM:
            s.by_pipe["mem"] += 1
            s.mem_clocks += max(1.0, 32 * _width(op) / 128)
            if base in ("LDG", "LDGSTS", "LD"):
                s.global_loads.append(op)
        elif base in FMA:
            s.by_pipe["fma"] += 1
        elif base in ALU:
            s.by_pipe["alu"] += 1
        else:
            s.by_pipe["other"] += 1
    return s


def roofline(s: LoopStats, bytes_per_iter: int, arch: str) -> dict:
    hmma_clk = 4.0 if arch in ("sm_86", "sm_89") else 2.0
    clocks = {"issue": s.instructions / 4, "alu": s.by_pipe["alu"] / 2, "fma": s.by_pipe["fma"] / 2,
              "mem": s.mem_clocks, "tensor": s.by_pipe["tensor"] * hmma_clk}
    limiter = max(clocks, key=clocks.get)
    return {"clocks": clocks, "limiter": limiter, "bound": bytes_per_iter / clocks[limiter] if clocks[limiter] else float("inf")}


def compile_config(nvcc: str, src_root: Path, cfg, dtype: str, out: Path, archs=ARCHS) -> tuple[str, Path]:
    gen = _load("gen_sparse_mma", ROOT / "tools" / "gen_sparse_mma.py")
    cu = src_root / "csrc" / "sparse_mma" / "instantiations" / gen.instantiation_name(cfg, dtype)
    fat = out / (cu.stem + ".fatbin")
    cmd = [nvcc, "-fatbin", "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{src_root / 'csrc'}", "-Xptxas", "-v",
           str(cu), "-o", str(fat)]
    for a in archs:
        cmd.append(f"-gencode=arch=compute_{a[3:]},code={a}")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"sparse_mma_static: nvcc failed for {cu.name}:\n{p.stdout}{p.stderr}")
    return p.stdout + p.stderr, fat


def ptxas_resources(log: str) -> dict[str, dict]:
    res, arch = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '.*' for '(sm_\w+)'", line)
        if m:
            arch = m.group(1)
            res[arch] = {}
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and arch:
            res[arch].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and arch:
            res[arch]["regs"] = int(m.group(1))
    return res


def expected_hmma_sp(cfg) -> int:
    """HMMA.SP per main-loop iteration: decode, a warp's MT x NT tiles x 8 k-tiles; prefill, a warp's
    WMT x WNT tiles x 4 k-tiles (one stage)."""
    return cfg.wmt * cfg.wnt * 4 if hasattr(cfg, "wmt") else cfg.mt * cfg.nt * 8


def tensor_fraction(rl: dict) -> float:
    """Prefill (compute-bound) roofline: the sparse tensor pipe's share of the busiest pipe's clocks,
    i.e. the predicted fraction of the sparse tensor-core peak (mma.sp) the loop can reach."""
    c = rl["clocks"]
    return c["tensor"] / max(c.values()) if max(c.values()) else 0.0


def prefill_picked(cfgs, cfg, arch: str) -> bool:
    """Whether the dispatch table picks prefill config `cfg` on `arch` (sm_80, sm_86, sm_89, sm_90a)."""
    major, minor = int(arch[3]), int(arch[4])
    return cfgs.PREFILL_CHOICE.get(cfgs.arch_class(major, minor)) == cfg.id


def gate(cfg, arch: str, res: dict, s: LoopStats, rl: dict, need: float) -> list[str]:
    fails = []
    if res.get("stack", 1) or res.get("spill_st", 1) or res.get("spill_ld", 1):
        fails.append(f"spills/stack: {res}")
    if s.hmma_sp != expected_hmma_sp(cfg):
        fails.append(f"{s.hmma_sp} HMMA.SP in the main loop, expected {expected_hmma_sp(cfg)}")
    narrow = [op for op in s.global_loads if ".128" not in op]
    if narrow or not s.global_loads:
        fails.append(f"global loads not all 16 bytes wide: {sorted(set(narrow)) or 'none found'}")
    if hasattr(cfg, "wmt"):  # prefill: compute-bound, gated on the tensor pipe's share
        if tensor_fraction(rl) < PREFILL_NEED:
            fails.append(f"static roofline: HMMA.SP at {tensor_fraction(rl):.0%} of the sparse tensor peak < "
                         f"{PREFILL_NEED:.0%} ({rl['limiter']}-bound)")
    elif rl["bound"] < need:
        fails.append(f"static roofline {rl['bound']:.1f} B/clk/SM < {need} ({rl['limiter']}-bound)")
    return fails


def run(src_root: Path, config_ids, dtype: str, need: float, archs=ARCHS, verbose=True, jobs: int = 2):
    cfgs = _load("mma_sp_configs", ROOT / "sparselora" / "mma_sp_configs.py")
    nvcc, cuobjdump = find_nvcc(), find_cuobjdump()
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="sparse_mma_static_") as tmp:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # one nvcc run per config, in parallel
            built = list(pool.map(lambda cid: compile_config(nvcc, src_root, cfgs.config_by_id(cid), dtype, Path(tmp),
                                                             archs), config_ids))
        for cid, (log, fat) in zip(config_ids, built):
            cfg = cfgs.config_by_id(cid)
            res = ptxas_resources(log)
            sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(fat)], capture_output=True, text=True, check=True).stdout)
            for arch in archs:
                body = main_loop(sass.get(arch, []))
                s = loop_stats(body)
                nbytes = cfg.wmt * 4 * BYTES_PER_KTILE if hasattr(cfg, "wmt") else cfg.mt * 8 * BYTES_PER_KTILE
                rl = roofline(s, nbytes, arch)
                fails = gate(cfg, arch, res.get(arch, {}), s, rl, need)
                if hasattr(cfg, "wmt") and not prefill_picked(cfgs, cfg, arch):
                    # a prefill tile sized for other archs: its roofline is reported, not gated here
                    fails = [f for f in fails if "static roofline" not in f]
                row = dict(config=cfg.id, name=cfg.name, arch=arch, regs=res.get(arch, {}).get("regs"),
                           spills=res.get(arch, {}).get("spill_st", "?"), loop=s.instructions, **s.by_pipe,
                           hmma_sp=s.hmma_sp, bytes=nbytes, rl=rl, fails=fails, prefill=hasattr(cfg, "wmt"))
                rows.append(row)
                if verbose:
                    print(f"sparse_mma_static: config {cfg.id} {cfg.name} {arch}: regs {row['regs']}, loop {s.instructions} "
                          f"instr (alu {s.by_pipe['alu']}, fma {s.by_pipe['fma']}, mem {s.by_pipe['mem']}, "
                          f"tensor {s.by_pipe['tensor']}), {rl['bound']:.1f} B/clk/SM ({rl['limiter']}-bound)"
                          + (f", HMMA.SP {s.hmma_sp / max(s.instructions, 1):.0%} of issue slots, tensor pipe "
                             f"{tensor_fraction(rl):.0%} of the busiest" if row["prefill"] else "")
                          + (f"  FAIL: {'; '.join(fails)}" if fails else "  ok"))
                failures += [f"config {cfg.id} {arch}: {f}" for f in fails]
    return rows, failures


def report(rows, path: Path, dtype: str, need: float) -> None:
    lines = [f"# mma.sp kernels: static gates from the cubin ({dtype}, no GPU)\n",
             "Command: `python tools/sparse_mma_static.py --report benchmarks/results/sparse_mma_static.md`. "
             "Main loop = one warp-iteration over one stage (8 k-tiles x MT row tiles, MT x 4608 packed weight bytes). "
             "Pipe model and gates: the docstring of tools/sparse_mma_static.py. The bound is a *prediction* "
             f"(upper bound from instruction counts); the gate is >= {need} packed bytes/clock/SM (H200 HBM need).\n",
             "| config | arch | regs | spill B | loop instr | alu | fma | mem | HMMA.SP | other | bytes/iter | "
             "clk issue/alu/fma/mem/tensor | bound B/clk/SM | limiter | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [r for r in rows if not r.get("prefill")]:
        c = r["rl"]["clocks"]
        lines.append(f"| {r['config']} {r['name']} | {r['arch']} | {r['regs']} | {r['spills']} | {r['loop']} | {r['alu']} | "
                     f"{r['fma']} | {r['mem']} | {r['hmma_sp']} | {r['other']} | {r['bytes']} | "
                     f"{c['issue']:.0f}/{c['alu']:.0f}/{c['fma']:.0f}/{c['mem']:.0f}/{c['tensor']:.0f} | "
                     f"{r['rl']['bound']:.1f} | {r['rl']['limiter']} | {'FAIL' if r['fails'] else 'ok'} |")
    pre = [r for r in rows if r.get("prefill")]
    if pre:
        lines += ["", "## Prefill configs (compute-bound: csrc/sparse_mma/prefill_kernel.cuh)\n",
                  "Main loop = one warp over one stage (4 k-tiles x its WMT x WNT tiles). Figures of merit: HMMA.SP's "
                  "share of the loop's issue slots, and the tensor pipe's clocks / the busiest pipe's clocks = the "
                  "*predicted* fraction of the sparse tensor-core peak (mma.sp) the loop can reach (an upper bound: "
                  f"perfect overlap, latencies hidden). Gate: >= {PREFILL_NEED:.0%}.\n",
                  "| config | arch | regs | spill B | loop instr | HMMA.SP | HMMA.SP / issue slots | "
                  "clk issue/alu/fma/mem/tensor | limiter | tensor / busiest | gate |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in pre:
            c = r["rl"]["clocks"]
            lines.append(f"| {r['config']} {r['name']} | {r['arch']} | {r['regs']} | {r['spills']} | {r['loop']} | "
                         f"{r['hmma_sp']} | {r['hmma_sp'] / max(r['loop'], 1):.0%} | "
                         f"{c['issue']:.0f}/{c['alu']:.0f}/{c['fma']:.0f}/{c['mem']:.0f}/{c['tensor']:.0f} | "
                         f"{r['rl']['limiter']} | {tensor_fraction(r['rl']):.0%} | {'FAIL' if r['fails'] else 'ok'} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT, help="repository root whose csrc/ to compile (default: this one)")
    ap.add_argument("--configs", type=int, nargs="*", help="config ids (default: all)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "f16"))
    ap.add_argument("--archs", nargs="*", default=list(ARCHS))
    ap.add_argument("--need", type=float, default=HBM_NEED, help="gate, packed bytes/clock/SM")
    ap.add_argument("--report", type=Path)
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    cfgs = _load("mma_sp_configs", ROOT / "sparselora" / "mma_sp_configs.py")
    ids = (args.configs if args.configs is not None and len(args.configs)
           else [c.id for c in cfgs.CONFIGS + cfgs.PREFILL_CONFIGS])
    rows, failures = run(args.src, ids, args.dtype, args.need, tuple(args.archs), jobs=args.jobs)
    if args.report:
        report(rows, args.report, args.dtype, args.need)
    if failures:
        print("sparse_mma_static: FAILED\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"sparse_mma_static: {len(rows)} (config, arch) builds pass every gate")
    return 0


if __name__ == "__main__":
    sys.exit(main())

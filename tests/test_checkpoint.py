"""save_sparse / load_sparse: identical outputs, smaller files, atomic writes, clear errors,
compressed-tensors sparse-24-bitmask interop."""
import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from sparselora.checkpoint import CheckpointError, FORMAT_VERSION, load_sparse, read_metadata, save_sparse
from sparselora.format import nm_mask
from sparselora.patch import sparse_layers, sparsify
from sparselora.tiny_models import build, example_inputs

from helpers import REL_TOL, assert_linear
from test_patch import _out, _to64, prune_24


def _sparse_model(family="llava", seed=0, dtype=torch.float32):
    model = build(family, seed=seed, dtype=dtype)
    prune_24(model)
    report = sparsify(model)
    assert report.sparse
    return model


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "siglip"])
def test_save_load_identical_and_smaller(family, tmp_path, seed):
    s = seed % 10_000
    model = _sparse_model(family, seed=s)
    inputs = example_inputs(family, model, seed=s)
    with torch.no_grad():
        ref = _out(model(**inputs))
    path = save_sparse(model, tmp_path / "sparse", extra_config={"family": family})
    assert path == tmp_path / "sparse" / "model.safetensors" and (tmp_path / "sparse" / "config.json").exists()

    fresh = build(family, seed=s + 1)  # different random weights: everything must come from the file
    load_sparse(fresh, tmp_path / "sparse")
    assert set(sparse_layers(fresh)) == set(sparse_layers(model))
    assert _state_equal(fresh, model)
    with torch.no_grad():
        assert torch.equal(_out(fresh(**inputs)), ref)
    if family != "siglip":
        kw = dict(max_new_tokens=3, do_sample=False)
        assert torch.equal(fresh.generate(**inputs, **kw), model.generate(**inputs, **kw))

    meta = read_metadata(path)
    assert meta["format_version"] == FORMAT_VERSION and meta["extra_config"] == {"family": family}
    assert meta["sparse_layers"] and all(v["pattern"] == "2:4" and v["dtype"] == "float32" for v in meta["sparse_layers"].values())

    # the same model saved dense (masked weights as plain tensors) is larger
    dense = build(family, seed=s)
    prune_24(dense)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items() if "lm_head" not in k or family == "siglip"}, tmp_path / "dense.safetensors")
    assert os.path.getsize(path) < os.path.getsize(tmp_path / "dense.safetensors")


def test_bf16_file_size_ratio(tmp_path):
    """Packed 16-bit weights take 9/16 of the dense bytes; the whole file shrinks accordingly."""
    lin = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 256, bias=False)).to(torch.bfloat16)
    for m in lin:
        mask = nm_mask(m.weight.detach().float().abs())
        with torch.no_grad():
            m.weight.mul_(mask)
        m.register_buffer("sparse_mask", mask, persistent=False)
    save_file({k: v.contiguous() for k, v in lin.state_dict().items()}, tmp_path / "dense.safetensors")
    sparsify(lin)
    path = save_sparse(lin, tmp_path / "sparse.safetensors")
    ratio = os.path.getsize(path) / os.path.getsize(tmp_path / "dense.safetensors")
    assert 0.55 < ratio < 0.60, ratio


def test_failed_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    model = _sparse_model()
    target = tmp_path / "ckpt"
    save_sparse(model, target)
    old_bytes = (target / "model.safetensors").read_bytes()

    other = _sparse_model(seed=3)
    import safetensors.torch as st

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial write")  # as if the disk filled up mid-write
        raise OSError("No space left on device")

    monkeypatch.setattr(st, "save_file", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_sparse(other, target)
    monkeypatch.undo()
    assert (target / "model.safetensors").read_bytes() == old_bytes
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    fresh = build("llava", seed=7)
    load_sparse(fresh, target)
    assert _state_equal(fresh, model)
    with pytest.raises(TypeError, match="JSON"):
        save_sparse(other, target, extra_config={"x": object()})
    assert (target / "model.safetensors").read_bytes() == old_bytes


def test_failed_config_write_keeps_the_old_weights_too(tmp_path, monkeypatch):
    # weights and config.json are one save: a failure on the second file must not leave the new
    # weights next to the old config (or the reverse)
    model = _sparse_model()
    target = tmp_path / "ckpt"
    save_sparse(model, target, format="compressed-tensors")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import sparselora.checkpoint as ck

    real = ck._text_writer

    def broken_writer(text):
        def write(tmp):
            real(text[: len(text) // 2])(tmp)
            raise OSError("No space left on device")
        return write

    monkeypatch.setattr(ck, "_text_writer", broken_writer)
    with pytest.raises(OSError, match="No space"):
        save_sparse(_sparse_model(seed=3), target, format="compressed-tensors")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # same files, same bytes, no temps
    fresh = build("llava", seed=7)
    load_sparse(fresh, target)
    assert _state_equal(fresh, model)


def _untouched(fn, model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    fn()
    assert {n: type(m) for n, m in model.named_modules()} == types, "model was modified by a failing load"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_truncated_and_corrupt_files(tmp_path):
    model = _sparse_model()
    path = save_sparse(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    fresh = build("llava", seed=1)

    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _untouched(lambda: load_sparse(fresh, tmp_path / "trunc.safetensors"), fresh)

    flipped = bytearray(data)
    flipped[-100] ^= 0x40  # one bit in the tensor data: only the checksum can see it
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        _untouched(lambda: load_sparse(fresh, tmp_path / "flip.safetensors"), fresh)

    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_sparse(fresh, tmp_path / "garbage.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_sparse(fresh, tmp_path / "missing")


def _rewrite(path, out, meta_update=None, tensor_update=None):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_update or {})
    tensors.update(tensor_update or {})
    save_file(tensors, out, metadata=meta)
    return out


def test_wrong_format_version_and_metadata(tmp_path):
    model = _sparse_model()
    path = save_sparse(model, tmp_path / "m.safetensors")
    fresh = build("llava", seed=1)
    bad = _rewrite(path, tmp_path / "v99.safetensors", {"format_version": "99"})
    with pytest.raises(CheckpointError, match="format version 99"):
        _untouched(lambda: load_sparse(fresh, bad), fresh)
    bad = _rewrite(path, tmp_path / "fmt.safetensors", {"format": "other-format"})
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_sparse(fresh, bad)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.randn(4, 4)}, plain)
    with pytest.raises(CheckpointError, match="no sparse layers"):
        load_sparse(fresh, plain)


def test_mismatched_model_and_dtype(tmp_path):
    model = _sparse_model()
    path = save_sparse(model, tmp_path / "m.safetensors")

    # another architecture: the language model's intermediate size differs
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from sparselora.tiny_models import _TEXT, _VISION

    text = dict(_TEXT, intermediate_size=192)
    other = LlavaForConditionalGeneration(LlavaConfig(vision_config=CLIPVisionConfig(**_VISION, projection_dim=64),
                                                      text_config=LlamaConfig(**text), image_token_index=255,
                                                      vision_feature_layer=-1, image_seq_length=16)).eval()
    with pytest.raises(CheckpointError, match=r"shape mismatch for layer 'model\.language_model\.layers\.0\.mlp\.(gate|up|down)_proj'"):
        _untouched(lambda: load_sparse(other, path), other)

    bf16 = build("llava", dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="dtype mismatch.*checkpoint float32, model bfloat16"):
        _untouched(lambda: load_sparse(bf16, path), bf16)

    # a model with an extra module: the checkpoint misses its keys
    extra = build("llava", seed=1)
    extra.extra_head = nn.Linear(64, 3)
    with pytest.raises(CheckpointError, match="missing keys.*extra_head"):
        _untouched(lambda: load_sparse(extra, path), extra)

    # a checkpoint with a key the model lacks
    bad = _rewrite(path, tmp_path / "extra.safetensors", tensor_update={"bogus.weight": torch.ones(2)})
    fresh = build("llava", seed=1)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_sparse(fresh, bad)  # tampering without updating the checksum is caught first
    from sparselora.checkpoint import checksum

    with safe_open(str(bad), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    bad = _rewrite(bad, tmp_path / "extra2.safetensors", {"checksum": checksum(t)})
    with pytest.raises(CheckpointError, match="unexpected keys.*bogus.weight"):
        _untouched(lambda: load_sparse(fresh, bad), fresh)


def test_corrupt_meta_indices_named(tmp_path):
    model = _sparse_model()
    path = save_sparse(model, tmp_path / "m.safetensors")
    name = next(iter(sparse_layers(model)))
    with safe_open(str(path), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    t[f"{name}.meta"] = torch.zeros_like(t[f"{name}.meta"])  # all indices 0: i0 == i1 in every group
    from sparselora.checkpoint import checksum

    bad = _rewrite(path, tmp_path / "meta.safetensors", {"checksum": checksum(t)}, t)
    fresh = build("llava", seed=1)
    with pytest.raises(CheckpointError, match=f"layer '{name}'.*corrupt 2:4 meta"):
        _untouched(lambda: load_sparse(fresh, bad), fresh)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_packed_values_named(tmp_path, bad):
    model = _sparse_model()
    path = save_sparse(model, tmp_path / "m.safetensors")
    name = list(sparse_layers(model))[1]
    with safe_open(str(path), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    t[f"{name}.values"][3, 5] = bad
    from sparselora.checkpoint import checksum

    bad_file = _rewrite(path, tmp_path / "nan.safetensors", {"checksum": checksum(t)}, t)  # a valid checksum
    fresh = build("llava", seed=1)
    with pytest.raises(CheckpointError, match=rf"layer '{name}': packed values contain NaN/Inf: values\[3, 5\]"):
        _untouched(lambda: load_sparse(fresh, bad_file), fresh)


# --- compressed-tensors interop -------------------------------------------------------------
# compressed-tensors is in the [test] extra; without it these tests skip one by one (visibly),
# never the whole module at import
def _ct(module="compressed_tensors.utils"):
    return pytest.importorskip(module, reason="compressed-tensors is not installed (pip install -e '.[test]')")


def _their_compress(weight: torch.Tensor):
    """compressed-tensors' sparse-24-bitmask layout, built with the library's own bit packing:
    keep the 2 largest |w| of each group of 4 (their get_24_bytemasks rule), values in row-major
    order of the kept positions, bitmask = pack_bitmasks(bytemask), shape = [[N], [K]]."""
    n, k = weight.shape
    groups = weight.reshape(-1, 4)
    bytemask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True).reshape(n, k)
    return weight[bytemask].reshape(n, k // 2), _ct().pack_bitmasks(bytemask), torch.tensor([n, k]).reshape(-1, 1)


def _their_decompress(compressed, bitmask, shape):
    shape = shape.flatten().tolist()
    mask = _ct().unpack_bitmasks(bitmask, shape)
    dense = torch.zeros(shape, dtype=compressed.dtype)
    dense[mask] = compressed.flatten()
    return dense


def test_compressed_tensors_checkpoint_loads(tmp_path, seed):
    Sparse24BitMaskConfig = _ct("compressed_tensors.config").Sparse24BitMaskConfig

    dense = build("llava", seed=seed % 10_000)
    masks = prune_24(dense, parts=("language",))
    state = {k: v.contiguous() for k, v in dense.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = dense.lm_head.weight.detach().clone()
    for name in masks:
        w = state.pop(f"{name}.weight")
        state[f"{name}.compressed"], state[f"{name}.bitmask"], state[f"{name}.shape"] = _their_compress(w)
    ckpt = tmp_path / "ct"
    ckpt.mkdir()
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    cfg = dense.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "version": "0.9.0", "config_groups": {},
                                  "sparsity_config": Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"]).model_dump()}
    (ckpt / "config.json").write_text(json.dumps(cfg, default=str))

    inputs = example_inputs("llava", dense)
    with torch.no_grad():
        ref = _out(dense(**inputs))
    fresh = build("llava", seed=seed % 10_000 + 1)
    load_sparse(fresh, ckpt)
    assert set(sparse_layers(fresh)) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(fresh.get_submodule(name).mask(), mask)
    with torch.no_grad():
        torch.testing.assert_close(_out(fresh(**inputs)), ref, rtol=1e-5, atol=1e-5)


def test_our_compressed_tensors_output_decompresses_with_theirs(tmp_path):
    SparsityCompressionConfig = _ct("compressed_tensors.config").SparsityCompressionConfig
    get_nested_weight_mappings = _ct("compressed_tensors.utils.safetensors_load").get_nested_weight_mappings

    model = _sparse_model()
    ckpt = tmp_path / "ct"
    save_sparse(model, ckpt, format="compressed-tensors")
    mapping = get_nested_weight_mappings(str(ckpt), ["compressed", "bitmask", "shape"])
    layers = sparse_layers(model)
    assert set(mapping) == set(layers)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        for name, m in layers.items():
            w = _their_decompress(f.get_tensor(f"{name}.compressed"), f.get_tensor(f"{name}.bitmask"), f.get_tensor(f"{name}.shape"))
            assert torch.equal(w, m.dense_weight()), name
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    sc = SparsityCompressionConfig.load_from_registry(cfg["sparsity_config"]["format"], **cfg["sparsity_config"])
    assert sc.format == "sparse-24-bitmask" and sc.sparsity_structure == "2:4" and set(sc.targets) == set(layers)
    # and ours reads it back
    fresh = build("llava", seed=5)
    load_sparse(fresh, ckpt)
    assert _state_equal(fresh, model)


def test_compressed_tensors_bad_bitmask(tmp_path):
    w = torch.randn(8, 16)
    comp, bits, shape = _their_compress(w * nm_mask(w.abs()))
    bits = bits.clone()
    bits[0, 0] = 0b00000111  # three kept in the first group
    lin = nn.Sequential(nn.Linear(16, 8, bias=False))
    save_file({"0.compressed": comp, "0.bitmask": bits, "0.shape": shape}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="'0.bitmask' is not 2:4: row 0, group 0 keeps 3"):
        _untouched(lambda: load_sparse(lin, tmp_path / "bad.safetensors"), lin)


@pytest.mark.gpu
def test_load_onto_cuda_model(tmp_path):
    model = _sparse_model(dtype=torch.bfloat16)
    path = save_sparse(model, tmp_path / "m.safetensors")
    fresh = build("llava", seed=1, dtype=torch.bfloat16).to("cuda")
    load_sparse(fresh, path)
    for name, m in sparse_layers(fresh).items():
        assert m.values.device.type == "cuda" and torch.equal(m.values.cpu(), sparse_layers(model)[name].values)
    for name, m in sparse_layers(fresh).items():  # each loaded layer, on CUDA, against float64
        x = torch.randn(37, m.in_features, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            assert_linear(m(x), x, m.dense_weight(), m.bias, f"{name} ({m.backend.name})")
    inputs = example_inputs("llava", fresh)
    with torch.no_grad():  # the saved model's float64 evaluation (same bf16 weights)
        ref64 = _out(copy.deepcopy(model).double()(**_to64(inputs)))
        out = _out(fresh(**{k: v.to("cuda") for k, v in inputs.items()})).double().cpu()
    # whole model in bf16: errors compound over layers, so 4x the one-layer bound (as in
    # test_patch.test_cuda_llava_round_trip)
    rel = ((out - ref64).norm() / ref64.norm()).item()
    assert rel <= 4 * REL_TOL[torch.bfloat16], f"loaded model on CUDA vs float64: ‖err‖/‖ref‖ = {rel:.2e}"


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_compressed_tensors_with_save_pretrained_names(family, tmp_path):
    """A compressed-tensors checkpoint as the ecosystem writes it: transformers' save_pretrained key
    names (legacy names for these VLMs, tied lm_head dropped), 2:4 weights compressed."""
    dense = build(family, seed=2)
    masks = prune_24(dense, parts=("language",))
    ckpt = tmp_path / "ct"
    dense.save_pretrained(ckpt)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    packed = 0
    for k in list(state):
        w = state[k]
        if k.endswith(".weight") and w.dim() == 2 and w.shape[1] % 4 == 0 and "language_model" in k and "embed" not in k and "lm_head" not in k:
            if ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all():
                p = k[: -len(".weight")]
                state[f"{p}.compressed"], state[f"{p}.bitmask"], state[f"{p}.shape"] = _their_compress(state.pop(k))
                packed += 1
    assert packed == len(masks)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    fresh = build(family, seed=9)
    load_sparse(fresh, ckpt)
    assert set(sparse_layers(fresh)) == set(masks)
    inputs = example_inputs(family, dense)
    with torch.no_grad():
        torch.testing.assert_close(_out(fresh(**inputs)), _out(dense(**inputs)), rtol=1e-5, atol=1e-5)
    # a wrong explicit mapping is a clear error, not a partial load
    other = build(family, seed=9)
    with pytest.raises(CheckpointError, match="does not exist|does not fit"):
        _untouched(lambda: load_sparse(other, ckpt, key_mapping={"^": "nothing."}), other)

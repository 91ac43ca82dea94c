"""transformers-native packed checkpoints: save_pretrained / from_pretrained (any Auto class) with
SparseLinear in place, same logits as in memory, checksums, refusal without sparselora, and no
dense weight of a packed layer allocated while loading."""
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

import sparselora  # noqa: F401  (registers the method)
from sparselora.format import SparsityError
from sparselora.hf_quantizer import QUANT_METHOD, PackedSlot
from sparselora.modules import SparseLinear
from sparselora.patch import sparse_layers, sparsify, unsparsify
from sparselora.tiny_models import build, example_inputs

from test_patch import _out, prune_24


class AllocatedBytes(TorchDispatchMode):
    """Storages that aten ops create on a real device (views and in-place ops create none): their
    total bytes, the peak of those still alive (a storage counts until the tensor an op returned
    it in dies), and the shapes of the float ones. Tensors made outside aten (safetensors' own reads) are not seen."""

    def __init__(self):
        super().__init__()
        self.total = self.live = self.peak = 0
        self.seen, self.shapes = set(), []

    def _free(self, ptr, nbytes):
        self.live -= nbytes
        self.seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if ptr and ptr not in inputs and ptr not in self.seen:
                    self.seen.add(ptr)
                    self.total += nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    if t.is_floating_point():  # a dense weight is a float tensor (index tensors may share its shape)
                        self.shapes.append(tuple(t.shape))
                    weakref.finalize(t, self._free, ptr, nbytes)
        return out


def _packed_dir(family, tmp_path, seed, dtype=torch.float32):
    model = build(family, seed=seed, dtype=dtype)
    prune_24(model)
    inputs = example_inputs(family, model, seed=seed)
    with torch.no_grad():
        dense = _out(model(**inputs))
    report = sparsify(model)
    assert len(report.sparse) > 10
    with torch.no_grad():
        packed = _out(model(**inputs))
    out = tmp_path / f"{family}-packed"
    model.save_pretrained(out)
    return model, inputs, dense, packed, out


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "idefics3"])
def test_from_pretrained_gives_the_packed_model(family, tmp_path, seed):
    from transformers import AutoModel, AutoModelForImageTextToText

    model, inputs, dense, packed, out = _packed_dir(family, tmp_path, seed % 10_000)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == QUANT_METHOD and set(cfg["sparse_layers"]) == set(sparse_layers(model))
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # packed on disk: half the columns under the dense name
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert sum(k.endswith(".weight_meta") for k in shapes) == len(cfg["sparse_layers"])
    assert sorted(s for k, s in shapes.items() if k.endswith(".weight") and k[:-7] + ".weight_meta" in shapes) == \
        sorted((n, k // 2) for n, k in cfg["sparse_layers"].values())

    loaded = AutoModelForImageTextToText.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    assert type(loaded) is type(model)
    layers = sparse_layers(loaded)
    assert set(layers) == set(sparse_layers(model)) and not any(isinstance(m, PackedSlot) for m in loaded.modules())
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    for name, m in layers.items():
        assert torch.equal(m.values, sparse_layers(model)[name].values) and torch.equal(m.meta, sparse_layers(model)[name].meta)
    with torch.no_grad():
        got = _out(loaded(**inputs))
    assert torch.equal(got, packed)  # same kernels, same tensors: bit-identical to the in-memory packed model
    assert ((got.double() - dense.double()).norm() / dense.double().norm()).item() < 1e-5  # and the masked-dense one

    base = AutoModel.from_pretrained(out)  # another Auto class: its own module names, still packed
    assert sparse_layers(base) and all(isinstance(m, SparseLinear) for m in sparse_layers(base).values())


def test_resave_and_bf16_load(tmp_path, seed):
    model, inputs, _, packed, out = _packed_dir("llava", tmp_path, seed % 10_000)
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(out)
    loaded.save_pretrained(tmp_path / "again")  # a loaded model saves the same format
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(_out(again(**inputs)), packed)
    half = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.bfloat16)
    m = next(iter(sparse_layers(half).values()))
    assert m.values.dtype == torch.bfloat16 and m.meta.dtype == torch.int32
    ref = next(iter(sparse_layers(model).values()))
    assert torch.equal(m.values, ref.values.to(torch.bfloat16))


def test_unsparsified_model_saves_dense_again(tmp_path):
    model = build("llava")
    prune_24(model)
    sparsify(model)
    unsparsify(model)
    model.save_pretrained(tmp_path / "d")
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())


def test_corrupt_tensor_is_named(tmp_path):
    from transformers import AutoModelForImageTextToText

    _, _, _, _, out = _packed_dir("llava", tmp_path, 3)
    f = out / "model.safetensors"
    with safe_open(str(f), "pt") as sf:
        name = next(k for k in sf.keys() if k.endswith("mlp.down_proj.weight"))
    from sparselora.stream_io import read_header

    _, infos = read_header(f)
    raw = bytearray(f.read_bytes())
    raw[infos[name].start + 5] ^= 0x40
    f.write_bytes(bytes(raw))
    with pytest.raises(SparsityError, match=f"checksum mismatch for tensor '{name}'"):
        AutoModelForImageTextToText.from_pretrained(out)


def test_transformers_without_sparselora_refuses(tmp_path):
    """A fresh interpreter that never imports sparselora: transformers warns about the unknown
    method, then refuses the directory (packed L.weight has half the columns) instead of loading
    random layers. A text-only Llama keeps the subprocess's imports small."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparselora.format import nm_mask

    torch.manual_seed(4)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        for name, lin in model.model.named_modules():
            if isinstance(lin, torch.nn.Linear):
                lin.register_buffer("sparse_mask", nm_mask(lin.weight.abs()), persistent=False)
                lin.weight.mul_(lin.sparse_mask)
    assert len(sparsify(model).sparse) == 7
    model.save_pretrained(tmp_path / "packed")
    code = ("import sys\nfrom transformers import AutoModelForCausalLM as A\n"
            "try:\n    A.from_pretrained(sys.argv[1])\nexcept RuntimeError as e:\n"
            "    assert 'sparselora' not in sys.modules\n    print('REFUSED', e)\n    sys.exit(3)\nprint('LOADED')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "packed")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 3 and "REFUSED" in r.stdout and "ignore_mismatched_sizes" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert "Unknown quantization type, got sparselora" in r.stderr
    assert "mlp.down_proj.weight" in r.stderr and "MISMATCH" in r.stderr  # the report names the packed layers


def test_loading_allocates_no_dense_weight(tmp_path, monkeypatch):
    """Every storage created while loading, added up, stays below the packed file (+ the
    non-packed tensors' size): building the dense model first would allocate the dense weights
    of every packed layer again (and the old path did)."""
    from transformers import AutoModelForImageTextToText

    model, _, _, _, out = _packed_dir("llava", tmp_path, 5)
    dense_packed_layers = sum(m.out_features * m.in_features * 4 for m in sparse_layers(model).values())
    file_bytes = (out / "model.safetensors").stat().st_size
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # loader threads would escape the (thread-local) mode
    with AllocatedBytes() as alloc:
        AutoModelForImageTextToText.from_pretrained(out)
    assert alloc.total > 0
    assert alloc.total < 1.1 * file_bytes, (alloc.total, file_bytes)
    from test_streaming_load import _dense_only_shapes

    dense_shaped = [s for s in alloc.shapes if s in _dense_only_shapes(model)]
    assert not dense_shaped, dense_shaped[:5]

    # the counter sees a dense build: the same count around building the model at random is larger
    with AllocatedBytes() as alloc_dense:
        build("llava")
    assert alloc_dense.total > dense_packed_layers


def test_cli_stages_keep_a_complete_model_directory(tmp_path):
    """prune -> sparsify of a user directory: processor, chat template, tokenizer and generation
    config files travel along, and the sparsified output loads with from_pretrained, packed."""
    from transformers import AutoModelForImageTextToText

    from sparselora.cli import main

    src, pruned, packed = tmp_path / "src", tmp_path / "pruned", tmp_path / "packed"
    model = build("llava", seed=6)
    model.save_pretrained(src)
    extra = {"preprocessor_config.json": '{"image_processor_type": "CLIPImageProcessor", "crop_size": 32}',
             "processor_config.json": '{"processor_class": "LlavaProcessor", "patch_size": 8}',
             "chat_template.json": '{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}',
             "tokenizer_config.json": '{"model_max_length": 256}', "generation_config.json": '{"max_new_tokens": 7}'}
    for name, text in extra.items():
        (src / name).write_text(text)
    assert main(["prune", str(src), "--method", "magnitude", "-q", "--out", str(pruned)]) == 0
    assert main(["sparsify", str(pruned), "--out", str(packed)]) == 0
    for d in (pruned, packed):
        for name, text in extra.items():
            if name != "generation_config.json":
                assert (d / name).read_text() == text, (d, name)
        assert json.loads((d / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert json.loads((packed / "config.json").read_text())["quantization_config"]["quant_method"] == QUANT_METHOD
    loaded = AutoModelForImageTextToText.from_pretrained(packed)
    assert sparse_layers(loaded) and loaded.generation_config.max_new_tokens == 7


def test_sharded_and_disk_offloaded_loads(tmp_path):
    """Shards (each checked against the checksums in its own header), and a device_map that
    offloads everything to disk: packed layers stay whole in host memory, the rest is onloaded by
    accelerate's hooks; offloading buffers too is refused by name."""
    from transformers import AutoModelForImageTextToText

    model, inputs, _, packed, _ = _packed_dir("llava", tmp_path, 8)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    sharded = AutoModelForImageTextToText.from_pretrained(tmp_path / "sharded")
    offloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "sharded", device_map={"": "disk"},
                                                            offload_folder=str(tmp_path / "off"))
    assert set(offloaded.hf_device_map.values()) == {"disk"}
    assert all(t.device.type == "cpu" for m in sparse_layers(offloaded).values() for t in (m.values, m.meta))
    with torch.no_grad():
        assert torch.equal(_out(sharded(**inputs)), packed)
        assert torch.equal(_out(offloaded(**inputs)), packed)
    with pytest.raises(SparsityError, match="was not loaded .*offload_buffers"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "sharded", device_map={"": "disk"}, offload_buffers=True,
                                                    offload_folder=str(tmp_path / "off2"))


def test_cli_says_the_compressed_tensors_export_is_legacy(tmp_path, capsys):
    from sparselora.cli import main

    assert main(["sparsify", "--tiny", "llava", "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    assert "legacy export" in capsys.readouterr().err
    from sparselora.cli import build_parser

    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["sparsify"].format_help().split())
    assert "legacy" in help_text and "default: transformers" in help_text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_load_allocates_packed_bytes_only(tmp_path):
    """device_map='cuda': packed tensors land on the GPU directly; the peak allocation stays near
    the model's bytes as loaded (never the dense weights of the packed layers on top)."""
    from transformers import AutoModelForImageTextToText

    model, inputs, _, _, out = _packed_dir("llava", tmp_path, 9, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loaded = AutoModelForImageTextToText.from_pretrained(out, device_map="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    layers = sparse_layers(loaded)
    assert layers and all(m.values.is_cuda for m in layers.values())
    resident = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    dense_extra = sum(m.out_features * m.in_features * 2 for m in layers.values()) // 2  # half the dense weights
    assert torch.cuda.max_memory_allocated() - base < resident + dense_extra, (torch.cuda.max_memory_allocated() - base, resident)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    model.cuda()  # the in-memory packed model, on the same device: same backends, same tensors
    with torch.no_grad():
        got, ref = _out(loaded(**inputs)).double(), _out(model(**inputs)).double()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-3

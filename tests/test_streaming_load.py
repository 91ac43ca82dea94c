"""load_sparse onto a model built without weights (meta device): same model as a dense load, no
dense weight of a packed layer allocated, nothing silently left on meta."""
import pytest
import torch
from accelerate import init_empty_weights

from sparselora.checkpoint import CheckpointError, load_sparse, save_sparse
from sparselora.patch import sparse_layers, sparsify
from sparselora.tiny_models import build, example_inputs

from test_hf_quantizer import AllocatedBytes
from test_patch import _out, prune_24


def _saved(tmp_path, family="llava", seed=0):
    model = build(family, seed=seed)
    prune_24(model)
    sparsify(model)
    path = save_sparse(model, tmp_path / "ckpt")
    return model, path


def _dense_only_shapes(model):
    """Shapes only a packed layer's dense weight has (not its packed values, not another tensor)."""
    layers = sparse_layers(model).values()
    shapes = {(m.out_features, m.in_features) for m in layers} - {(m.out_features, m.in_features // 2) for m in layers}
    shapes -= {tuple(t.shape) for t in model.state_dict().values()}
    assert shapes
    return shapes


def _empty(model):
    with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq...) real
        return type(model)(model.config).eval()


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_meta_model_loads_everything(family, tmp_path, seed):
    model, path = _saved(tmp_path, family, seed % 10_000)
    empty = _empty(model)
    load_sparse(empty, path.parent)
    assert not [k for k, t in empty.state_dict().items() if t.device.type == "meta"]
    assert set(sparse_layers(empty)) == set(sparse_layers(model))
    sa, sb = empty.state_dict(), model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if getattr(model.config, "tie_word_embeddings", False):
        assert empty.get_output_embeddings().weight is empty.get_input_embeddings().weight
    inputs = example_inputs(family, model, seed=seed % 10_000)
    with torch.no_grad():
        assert torch.equal(_out(empty(**inputs)), _out(model(**inputs)))


def test_meta_buffers_not_in_the_checkpoint_are_refused(tmp_path):
    model, path = _saved(tmp_path)
    with torch.device("meta"):  # buffers on meta too: rotary inv_freq is not in any checkpoint
        empty = type(model)(model.config)
    before = {k: (t.device, t.shape) for k, t in empty.state_dict(keep_vars=True).items()}
    with pytest.raises(CheckpointError, match=r"on the meta device and not in the checkpoint \(first: buffer '[a-z_.]+'"):
        load_sparse(empty, path.parent)
    assert {k: (t.device, t.shape) for k, t in empty.state_dict(keep_vars=True).items()} == before
    assert not sparse_layers(empty)


def test_load_allocates_the_packed_bytes_only(tmp_path):
    """The storages alive at once while loading onto a meta-device model peak at the file's size, and
    none has the shape of a packed layer's dense weight; the old way (build dense at random, then
    load) holds the dense weights on top."""
    model, path = _saved(tmp_path, seed=7)
    size = path.stat().st_size
    dense_shapes = _dense_only_shapes(model)
    # built outside the count: init_empty_weights lets each nn.Linear torch.empty its weight before
    # moving it to meta (never written, so no resident page: RSS does not see it, aten ops do)
    empty = _empty(model)
    with AllocatedBytes() as alloc:
        load_sparse(empty, path.parent)
    assert 0.5 * size < alloc.peak < 1.2 * size, (alloc.peak, size)  # the counter sees the reads (no mmap)
    assert not [s for s in alloc.shapes if s in dense_shapes]

    with AllocatedBytes() as old:
        load_sparse(type(model)(model.config).eval(), path.parent)
    assert old.total > 2 * size, (old.total, size)
    assert [s for s in old.shapes if s in dense_shapes]


def test_meta_index_check_names_the_group_and_ignores_padding(tmp_path):
    from safetensors import safe_open

    from sparselora.format import SparsityError, check_meta, nm_mask, pack_24

    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 72, generator=g)  # K/4 = 18 groups: the last word holds 2 real groups and 6 of padding
    packed = pack_24(w * nm_mask(w.abs()))
    meta = packed.meta.clone()
    check_meta(meta, 72)
    meta[:, -1] &= 0xFF  # old-style zero padding past the real groups: still valid
    check_meta(meta, 72)
    for row, group in ((4, 13), (0, 17), (5, 0)):
        bad = meta.clone()
        word, field = divmod(group, 8)
        bad[row, word] = (bad[row, word] & ~(0xF << (4 * field))) | (0b0111 << (4 * field))  # i0 = 3, i1 = 1
        with pytest.raises(SparsityError, match=rf"row {row}, group {group} .*has indices \[3, 1\]"):
            check_meta(bad, 72)
    # and through load_sparse, on a real checkpoint, an interior group of a later row
    model, path = _saved(tmp_path, seed=2)
    name = sorted(sparse_layers(model))[3]
    with safe_open(str(path), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        meta_info = dict(f.metadata())
    m = t[f"{name}.meta"]
    m[2, 1] = (m[2, 1] & ~(0xF << 12)) | (0b0001 << 12)  # group 8 + 3 = 11 of row 2: i0 = 1, i1 = 0
    from safetensors.torch import save_file

    from sparselora.checkpoint import checksum

    meta_info["checksum"] = checksum(t)
    save_file(t, tmp_path / "bad.safetensors", metadata=meta_info)
    with pytest.raises(CheckpointError, match=rf"layer '{name}': corrupt 2:4 meta: row 2, group 11 .*has indices \[1, 0\]"):
        load_sparse(_empty(model), tmp_path / "bad.safetensors")


def test_corrupt_tensor_is_named(tmp_path):
    from sparselora.stream_io import read_header

    model, path = _saved(tmp_path, seed=4)
    _, infos = read_header(path)
    name = sorted(k for k in infos if k.endswith("mlp.up_proj.values"))[-1]
    raw = bytearray(path.read_bytes())
    raw[infos[name].start + 3] ^= 0x10
    path.write_bytes(bytes(raw))
    empty = _empty(model)
    with pytest.raises(CheckpointError, match=rf"checksum mismatch in tensor '{name}'"):
        load_sparse(empty, path.parent)
    assert not sparse_layers(empty)

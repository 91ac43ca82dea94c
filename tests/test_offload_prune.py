"""Pruning models larger than the device: accelerate-dispatched models (disk / CPU offload) prune
block by block to the same masks and weights as in memory, with the pruned weights stored back
where the offload hooks read them, and only one module's or block's weights resident at a time."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sparselora.format import SparsityError
from sparselora.pruning import prune
from sparselora.pruning.offload import layer_weight
from sparselora.tiny_models import build, example_inputs


@pytest.fixture(scope="module")
def base():
    model = build("llava", seed=5)
    return model, [example_inputs("llava", model, batch=2, seed=40 + i) for i in range(2)]


def _masked(model):
    return {n: m.sparse_mask for n, m in model.named_modules() if isinstance(getattr(m, "sparse_mask", None), torch.Tensor)}


def _block_map(model):
    """accelerate device map: the language blocks on disk, everything else on the CPU."""
    lm = model.model.language_model
    dm = {f"model.language_model.layers.{i}": "disk" for i in range(len(lm.layers))}
    for name, _ in model.named_children():
        if name != "model":
            dm[name] = "cpu"
    for name, _ in model.model.named_children():
        if name != "language_model":
            dm[f"model.{name}"] = "cpu"
    for name, _ in lm.named_children():
        if name != "layers":
            dm[f"model.language_model.{name}"] = "cpu"
    return dm


def _resident_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


@pytest.mark.parametrize("dispatch", ["disk_offload", "device_map"])
def test_offloaded_model_prunes_like_the_in_memory_one(base, tmp_path, monkeypatch, dispatch):
    from accelerate import disk_offload, dispatch_model

    model, batches = base
    # sparsegpt (weights updated) on the language part with a hook per module; wanda on both parts with block hooks
    method, strategy = ("sparsegpt", "language") if dispatch == "disk_offload" else ("wanda", "both")
    ref = copy.deepcopy(model)
    prune(ref, method, strategy=strategy, calib=batches, progress=False)
    off = copy.deepcopy(model)
    if dispatch == "disk_offload":  # every module offloaded, a hook per module
        disk_offload(off, tmp_path / "offload", execution_device="cpu")
    else:  # block-level hooks: a language block is onloaded whole
        dispatch_model(off, _block_map(off), main_device="cpu", offload_dir=str(tmp_path / "offload"))
    target = "model.language_model.layers.0.mlp.up_proj"
    assert off.get_submodule(target).weight.device.type == "meta"

    # what is resident while the calibration runs: at most one block's weights (plus the resident CPU part)
    always = _resident_bytes(off)
    block = sum(p.numel() * p.element_size() for p in model.model.language_model.layers[0].parameters())
    seen = []
    real_linear = F.linear

    def counting_linear(*a, **k):
        seen.append(_resident_bytes(off) - always)
        return real_linear(*a, **k)

    monkeypatch.setattr(F, "linear", counting_linear)
    prune(off, method, strategy=strategy, calib=batches, progress=False)
    monkeypatch.setattr(F, "linear", real_linear)
    assert seen and 0 < max(seen) <= block
    assert off.get_submodule(target).weight.device.type == "meta"  # dropped again after pruning

    want = _masked(ref)
    assert set(_masked(off)) == set(want) and len(want) >= 14
    for name, mask in want.items():
        with layer_weight(off, name) as lin:  # the stored weight, as the offload hook will load it
            assert lin.sparse_mask.device.type == "cpu"
            assert torch.equal(lin.sparse_mask, mask), name
            assert torch.equal(lin.weight, ref.get_submodule(name).weight), name
    with torch.no_grad():  # forwards read the pruned weights from the offload folder
        assert torch.equal(off(**batches[0]).logits, ref(**batches[0]).logits)


def test_offloaded_nan_weight_is_named_before_anything_is_pruned(base, tmp_path):
    from accelerate import disk_offload

    model, batches = base
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.language_model.layers[1].self_attn.q_proj.weight[3, 5] = float("nan")
    disk_offload(bad, tmp_path / "offload", execution_device="cpu")
    with pytest.raises(SparsityError, match="layers.1.self_attn.q_proj"):
        prune(bad, "wanda", calib=batches, progress=False)
    with layer_weight(bad, "model.language_model.layers.0.self_attn.q_proj") as lin:
        assert not hasattr(lin, "sparse_mask") and (lin.weight != 0).all()  # nothing was pruned


def test_restore_with_a_disk_offloaded_teacher(base, tmp_path):
    """SparseLoRA distillation whose teacher is disk-offloaded (its targets computed through the
    offload hooks, one module resident at a time) trains the same adapters as with the teacher in memory."""
    from accelerate import disk_offload

    from sparselora.distill import distill
    from sparselora.lora import add_sparse_lora, lora_parameters

    model, batches = base
    results = []
    for offload in (False, True):
        teacher = copy.deepcopy(model)
        student = copy.deepcopy(model)
        prune(student, "magnitude", strategy="both", progress=False)
        if offload:
            disk_offload(teacher, tmp_path / "teacher", execution_device="cpu")
            assert teacher.model.language_model.layers[0].mlp.up_proj.weight.device.type == "meta"
        torch.manual_seed(0)
        add_sparse_lora(student, r=4, alpha=8)
        distill(student, teacher, batches, steps=2, lr=1e-2, progress=False)
        results.append([p.detach().clone() for p in lora_parameters(student)])
    assert len(results[0]) > 4
    assert any(p.abs().sum() > 0 for p in results[0])  # the adapters moved
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_host_model_calibrated_on_a_device_one_module_at_a_time(base, monkeypatch):
    """prune(device=...): the model stays on the host, accelerate's cpu_offload hooks bring one
    module's weights to the device per forward; afterwards the model is its own host tensors again
    (same Parameter objects, ties kept, no hooks), pruned exactly as in memory."""
    model, batches = base
    ref = copy.deepcopy(model)
    prune(ref, "sparsegpt", calib=batches, progress=False)
    host = copy.deepcopy(model)
    before = dict(host.named_parameters(remove_duplicate=False))
    resident = []
    real_linear = F.linear

    def counting_linear(*a, **k):
        resident.append(_resident_bytes(host))
        return real_linear(*a, **k)

    monkeypatch.setattr(F, "linear", counting_linear)
    prune(host, "sparsegpt", calib=batches, progress=False, device="cpu")
    monkeypatch.setattr(F, "linear", real_linear)
    biggest = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in host.modules())
    assert resident and max(resident) <= biggest  # one module's own weights at a time
    after = dict(host.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert not any(hasattr(m, "_hf_hook") for m in host.modules())
    for name, mask in _masked(ref).items():
        lin = host.get_submodule(name)
        assert torch.equal(lin.sparse_mask, mask) and torch.equal(lin.weight, ref.get_submodule(name).weight), name
    with torch.no_grad():
        assert torch.equal(host(**batches[0]).logits, ref(**batches[0]).logits)


def test_ecoflap_refuses_offloaded_layers(base, tmp_path):
    from accelerate import disk_offload

    model, batches = base
    off = copy.deepcopy(model)
    disk_offload(off, tmp_path / "offload", execution_device="cpu")
    with pytest.raises(ValueError, match="ecoflap.*offloaded"):
        prune(off, "wanda", pattern=0.5, ratios="ecoflap", calib=batches, progress=False)


def test_cli_prune_device_calibrates_the_host_model_there(tmp_path, monkeypatch, capsys):
    import sparselora.pruning
    from sparselora.cli import load_model, main

    seen = []
    real = sparselora.pruning.prune

    def spy(model, *a, **k):
        seen.append(str(k.get("device")))
        if k.get("device") is not None:  # inside prune(device=...): the model's weights are offloaded to meta
            import sparselora.pruning.offload as off

            with off.host_model_on_device(model, k["device"]):
                seen.append(model.model.language_model.layers[0].mlp.up_proj.weight.device.type)
        return real(model, *a, **k)

    monkeypatch.setattr(sparselora.pruning, "prune", spy)
    outs = []
    for extra in ([], ["--device", "cpu"]):
        out = tmp_path / f"p{len(extra)}"
        assert main(["prune", "--tiny", "llava", "--method", "wanda", "-q", "--calib-batches", "2", *extra, "--out", str(out)]) == 0
        outs.append(load_model(str(out), None)[0])
    # plain run; --device run: offloaded inside, then prune's own call on the hooked model
    assert seen == ["None", "cpu", "meta", "None"]
    a, b = (_masked(m) for m in outs)
    assert a and set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    if not torch.cuda.is_available():
        assert main(["prune", "--tiny", "llava", "--method", "wanda", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
        assert "--device cuda" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_restore_with_teacher_offload(tmp_path, monkeypatch, capsys):
    """``sparselora restore --teacher-offload``: the dense teacher's weights stay on disk (its Linear
    weights on meta while the distillation runs) and the adapters are the ones trained with the
    teacher in memory; a non-empty offload folder is refused before anything is written."""
    import sparselora.restore as restore_mod
    from safetensors.torch import load_file

    from sparselora.cli import main

    p = tmp_path / "p"
    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "-q", "--out", str(p)]) == 0
    common = ["--method", "sparselora", "--teacher-tiny", "llava", "--steps", "3", "--rank", "4", "--lr", "1e-2", "--calib-batches", "2",
              "--batch", "2", "-q"]
    real_restore, seen = restore_mod.restore, []

    def spying_restore(student, teacher, *a, **k):
        lin = [m.weight for m in teacher.modules() if isinstance(m, torch.nn.Linear)]
        seen.append((len(lin), sum(w.device.type == "meta" for w in lin)))
        return real_restore(student, teacher, *a, **k)

    monkeypatch.setattr(restore_mod, "restore", spying_restore)
    torch.manual_seed(0)
    assert main(["restore", str(p), *common, "--out", str(tmp_path / "mem")]) == 0
    torch.manual_seed(0)
    assert main(["restore", str(p), *common, "--teacher-offload", str(tmp_path / "off"), "--out", str(tmp_path / "disk")]) == 0
    torch.manual_seed(0)
    assert main(["restore", str(p), *common, "--teacher-offload", "--out", str(tmp_path / "tmpdir")]) == 0
    assert seen[0][0] > 10 and seen[0][1] == 0  # in memory: every teacher weight resident
    assert seen[1] == (seen[0][0], seen[0][0]) and seen[2] == seen[1]  # offloaded: none
    assert any((tmp_path / "off").glob("*.dat"))
    want = load_file(tmp_path / "mem" / "sparselora_adapters.safetensors")
    for out in ("disk", "tmpdir"):
        got = load_file(tmp_path / out / "sparselora_adapters.safetensors")
        assert set(got) == set(want) and want
        for name, t in want.items():
            torch.testing.assert_close(got[name], t, rtol=1e-5, atol=1e-6, msg=name)

    capsys.readouterr()
    assert main(["restore", str(p), *common, "--teacher-offload", str(tmp_path / "off"), "--out", str(tmp_path / "again")]) == 2
    assert "--teacher-offload" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_cli_blocks_restore_with_teacher_offload(tmp_path):
    """The default restore (block-wise reconstruction) with the teacher kept on disk gives the same
    model as with the teacher in memory (the teacher's blocks replay through accelerate's hooks)."""
    from sparselora.cli import load_model, main

    p = tmp_path / "p"
    assert main(["prune", "--tiny", "llava", "--method", "magnitude", "-q", "--out", str(p)]) == 0
    common = ["--teacher-tiny", "llava", "--steps", "4", "--calib-batches", "2", "--batch", "2", "-q"]
    assert main(["restore", str(p), *common, "--out", str(tmp_path / "mem")]) == 0
    assert main(["restore", str(p), *common, "--teacher-offload", "--out", str(tmp_path / "disk")]) == 0
    (mem, info), (disk, _) = load_model(str(tmp_path / "mem"), None), load_model(str(tmp_path / "disk"), None)
    assert info["restore"]["method"] == "blocks" and info["restore"]["block_error_after"] < info["restore"]["block_error_before"]
    want, got = mem.state_dict(), disk.state_dict()
    assert set(got) == set(want)
    for k, t in want.items():
        torch.testing.assert_close(got[k], t, rtol=1e-5, atol=1e-6, msg=k)

"""peft interop: a LoraConfig gives SparseLoRA on pruned layers, save/load round trip,
merge_and_unload keeps every pruned layer exactly 2:4 with its mask."""
import copy

import pytest
import torch
import torch.nn as nn

import peft  # a dependency of sparselora: never skipped
from peft import LoraConfig, PeftModel  # noqa: E402

from helpers import assert_close  # noqa: E402
from sparselora.format import SparsityError, check_nm, nm_mask  # noqa: E402
from sparselora.lora import use_triton_on_cpu  # noqa: E402
from sparselora.peft_interop import SparseLoraLinear, get_sparse_lora_model, load_sparse_lora  # noqa: E402


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 16)
        self.v = nn.Linear(16, 16)
        self.head = nn.Linear(16, 8)  # dense: ordinary LoRA

    def forward(self, x):
        return self.head(torch.relu(self.v(torch.relu(self.q(x)))))


def _pruned(buffer_on_v=True):
    m = Tiny()
    with torch.no_grad():
        for name in ("q", "v"):
            lin = getattr(m, name)
            mask = nm_mask(lin.weight.abs())
            lin.weight.mul_(mask)
            if name == "q" or buffer_on_v:
                lin.register_buffer("sparse_mask", mask, persistent=False)
    return m


def _random_adapters(pm):
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()


def _expected(base, pm, x, name_of):
    """float64 forward of the SparseLoRA semantics: masked update on q/v, plain update on head."""
    h = x.double()
    for name, act in (("q", True), ("v", True), ("head", False)):
        lin = getattr(base, name)
        layer = name_of(name)
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        upd = (b @ a) * layer.scaling["default"]
        if name != "head":
            upd = upd * (lin.weight != 0 if not hasattr(lin, "sparse_mask") else lin.sparse_mask)
        h = h @ (lin.weight.double() + upd).t() + lin.bias.double()
        if act:
            h = torch.relu(h)
    return h


def test_lora_config_gives_sparse_lora_and_round_trips(seed, tmp_path):
    base = _pruned(buffer_on_v=False)  # v: mask derived from the weight's nonzeros
    masks = {n: (getattr(base, n).weight != 0).clone() for n in ("q", "v")}
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "head"])
    pm = get_sparse_lora_model(copy.deepcopy(base), cfg)
    inner = pm.base_model.model
    assert all(isinstance(getattr(inner, n), SparseLoraLinear) for n in ("q", "v", "head"))
    _random_adapters(pm)
    pm.eval()
    x = torch.randn(5, 32)
    y = pm(x).detach()
    assert_close(y, _expected(base, pm, x, lambda n: getattr(inner, n)), "peft forward")
    # the masked semantics differ from plain LoRA on pruned layers (the test would notice a fallback)
    plain = peft.get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "head"]))
    plain.load_state_dict(pm.state_dict())
    assert (plain(x) - y).abs().max() > 1e-3

    pm.save_pretrained(tmp_path)
    loaded = load_sparse_lora(copy.deepcopy(base), tmp_path)
    loaded.eval()
    assert isinstance(loaded, PeftModel) and isinstance(loaded.base_model.model.q, SparseLoraLinear)
    assert torch.equal(loaded(x), y)

    merged = loaded.merge_and_unload()
    for n in ("q", "v"):
        lin = getattr(merged, n)
        assert type(lin) is nn.Linear
        check_nm(lin.weight)
        assert torch.equal(lin.sparse_mask, masks[n]), f"{n}: mask changed"
        assert not ((lin.weight != 0) & ~masks[n]).any()
    assert_close(merged(x).detach(), y.double(), "merged")


def test_peft_training_step_with_dropout_through_triton_kernels(seed):
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["q", "v"], lora_dropout=0.25)
    pm = get_sparse_lora_model(_pruned(), cfg)
    _random_adapters(pm)
    pm.train()
    x = torch.randn(4, 32)
    with use_triton_on_cpu():
        torch.manual_seed(0)
        loss_t = pm(x).pow(2).mean()
        loss_t.backward()
    grads_t = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad()
    torch.manual_seed(0)
    loss_r = pm(x).pow(2).mean()
    loss_r.backward()
    assert set(grads_t) == {n for n, p in pm.named_parameters() if "lora_" in n}
    for n, p in pm.named_parameters():
        if n in grads_t:
            assert_close(grads_t[n], p.grad.double(), n)


def test_peft_bad_inputs():
    base = _pruned()
    base.q.sparse_mask[0, :4] = True  # declared mask is not 2:4
    pm = get_sparse_lora_model(base, LoraConfig(r=2, target_modules=["q"]))
    with pytest.raises(SparsityError, match="not 2:4"):
        pm(torch.randn(1, 32))
    with pytest.raises(ValueError, match="use_dora"):
        get_sparse_lora_model(_pruned(), LoraConfig(r=2, target_modules=["q"], use_dora=True))

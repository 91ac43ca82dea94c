import pytest
import torch.nn as nn

from sparselora.families import FAMILIES, custom_family, get_family, linear_layers
from sparselora.tiny_models import BUILDERS, build


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_every_linear_is_classified_and_parts_exist(family):
    m = build(family)
    fam = get_family(m)
    names = [n for n, x in m.named_modules() if isinstance(x, nn.Linear)]
    parts = {n: fam.classify(n) for n in names}
    assert "other" not in parts.values(), [n for n, p in parts.items() if p == "other"]
    assert "vision" in parts.values() and "language" in parts.values()
    vis = linear_layers(m, ["vision"])
    lang = linear_layers(m, ["language"])
    assert vis and lang and not (set(vis) & set(lang))
    if family not in ("clip", "siglip"):
        assert "projector" in parts.values()


def test_qwen_merger_is_projector_not_vision():
    m = build("qwen2-vl")
    fam = get_family(m)
    assert fam.classify("model.visual.merger.mlp.0") == "projector"
    assert fam.classify("model.visual.blocks.0.mlp.fc1") == "vision"


def test_unknown_model_needs_prefixes():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(8, 8)
            self.dec = nn.Linear(8, 8)

    with pytest.raises(ValueError, match="unknown model family"):
        get_family(Toy())
    fam = custom_family(vision=["enc"], language=["dec"])
    assert list(linear_layers(Toy(), ["language"], family=fam)) == ["dec"]
    with pytest.raises(ValueError, match="at least one"):
        custom_family()


def test_skip_and_bad_part():
    m = build("llava")
    lang = linear_layers(m, ["language"], skip=["o_proj"])
    assert lang and not any(n.endswith("o_proj") for n in lang)
    with pytest.raises(ValueError, match="unknown parts"):
        linear_layers(m, ["text"])
    assert set(FAMILIES) >= {"llava", "blip-2", "qwen2-vl", "idefics3", "paligemma", "clip"}

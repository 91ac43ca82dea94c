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
    if family == "gemma3":
        # Gemma 3's projector is avg-pool + RMSNorm + a bare Parameter matmul: no Linear to classify,
        # but the module is there and belongs to the projector part
        assert "projector" not in parts.values()
        assert isinstance(m.model.multi_modal_projector.mm_input_projection_weight, nn.Parameter)
        assert fam.classify("model.multi_modal_projector") == "projector"
    elif family not in ("clip", "siglip"):
        assert "projector" in parts.values()


def test_qwen_merger_is_projector_not_vision():
    m = build("qwen2-vl")
    fam = get_family(m)
    assert fam.classify("model.visual.merger.mlp.0") == "projector"
    assert fam.classify("model.visual.blocks.0.mlp.fc1") == "vision"


# tiny model -> (family it resolves to, {real Linear module name: part}); names are checked to exist
NEW_FAMILIES = {
    "instructblip": ("blip-2", {"vision_model.encoder.layers.0.self_attn.qkv": "vision",
                                "qformer.encoder.layer.0.crossattention.attention.query": "projector",
                                "qformer.encoder.layer.1.intermediate_query.dense": "projector",
                                "language_projection": "projector",
                                "language_model.model.decoder.layers.1.fc2": "language",
                                "language_model.lm_head": "head"}),
    "qwen2.5-vl": ("qwen2-vl", {"model.visual.blocks.0.attn.qkv": "vision", "model.visual.blocks.1.mlp.gate_proj": "vision",
                                "model.visual.merger.mlp.0": "projector", "model.visual.merger.mlp.2": "projector",
                                "model.language_model.layers.0.self_attn.q_proj": "language", "lm_head": "head"}),
    "smolvlm": ("idefics3", {"model.vision_model.encoder.layers.0.mlp.fc1": "vision",
                             "model.connector.modality_projection.proj": "projector",
                             "model.text_model.layers.1.mlp.down_proj": "language", "lm_head": "head"}),
    "gemma3": ("gemma3", {"model.vision_tower.encoder.layers.0.self_attn.out_proj": "vision",
                          "model.language_model.layers.0.mlp.up_proj": "language", "lm_head": "head"}),
}


@pytest.mark.parametrize("family", sorted(NEW_FAMILIES))
def test_new_families_resolve_and_classify(family):
    m = build(family)
    fam_name, expect = NEW_FAMILIES[family]
    assert get_family(m).name == fam_name
    fam = get_family(m)
    for name, part in expect.items():
        assert isinstance(m.get_submodule(name), nn.Linear), name
        assert fam.classify(name) == part, (name, fam.classify(name), part)
    # every projector Linear is in the projector part, not swallowed by the vision prefix
    proj = linear_layers(m, ["projector"])
    assert not set(proj) & set(linear_layers(m, ["vision", "language"]))


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

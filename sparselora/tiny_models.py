"""Tiny random-initialised VLMs built from transformers configs (no download).

Used by the tests, the demo and the examples: every family of :mod:`sparselora.families`
has a builder here (hidden size 64, 2 layers, 32x32 images). Dimensions are multiples of
64 so that every Linear can take a 2:4 pattern and the GPU kernels' alignment, except the
language models' grouped-query k/v projections (2 KV heads x head_dim 16 = 32 outputs, still
a multiple of 4 and 32). Builder keys (``BUILDERS``) are tiny-model names; several map to one
family (instructblip -> blip-2, qwen2.5-vl -> qwen2-vl, smolvlm -> idefics3).
"""
from __future__ import annotations

from typing import Callable

import torch

_TEXT = dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               image_size=32, patch_size=8)


def _llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**_VISION, projection_dim=64), text_config=LlamaConfig(**_TEXT),
                      image_token_index=255, vision_feature_layer=-1, image_seq_length=16)
    return LlavaForConditionalGeneration(cfg)


def _blip2():
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(**_VISION),
        qformer_config=Blip2QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, encoder_hidden_size=64, vocab_size=256),
        text_config=OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256),
        num_query_tokens=8, image_token_index=255,
    )
    return Blip2ForConditionalGeneration(cfg)


def _clip():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
                     vision_config=dict(_VISION), projection_dim=64)
    return CLIPModel(cfg)


def _siglip():
    from transformers import SiglipConfig, SiglipModel

    cfg = SiglipConfig(text_config=dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
                       vision_config=dict(_VISION))
    return SiglipModel(cfg)


def _qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(**_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
    )
    return Qwen2VLForConditionalGeneration(cfg)


def _idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    cfg = Idefics3Config(vision_config=dict(_VISION), text_config=dict(model_type="llama", **_TEXT), image_token_id=255, scale_factor=2)
    return Idefics3ForConditionalGeneration(cfg)


def _paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    cfg = PaliGemmaConfig(vision_config=dict(model_type="siglip_vision_model", **_VISION, projection_dim=64),
                          text_config=dict(model_type="gemma", **_TEXT, head_dim=16), image_token_index=255, projection_dim=64)
    return PaliGemmaForConditionalGeneration(cfg)


def _instructblip():
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    cfg = InstructBlipConfig(
        vision_config=dict(_VISION),
        # the Q-Former reads the instruction too (qformer_input_ids): it needs its own vocabulary
        qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, encoder_hidden_size=64,
                            vocab_size=256, max_position_embeddings=64),
        text_config=dict(model_type="opt", vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        num_query_tokens=8, image_token_index=255,
    )
    return InstructBlipForConditionalGeneration(cfg)


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(**_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        # window_size 16 px = one merged 2x2-patch group per window, so block 0 runs windowed attention
        # and block 1 (fullatt_block_indexes) full attention: both code paths of the real model
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16, fullatt_block_indexes=[1]),
        image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg)


def _smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    cfg = SmolVLMConfig(vision_config=dict(_VISION), text_config=dict(model_type="llama", **_TEXT), image_token_id=255, scale_factor=2)
    return SmolVLMForConditionalGeneration(cfg)


def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    # real Gemma 3 checkpoints have no SigLIP pooling head (vision_use_head=False); the projector
    # average-pools the 4x4 patch grid to mm_tokens_per_image=4 tokens and projects them with a
    # bare Parameter (no nn.Linear), so the projector part has no Linear layers.
    cfg = Gemma3Config(
        vision_config=dict(model_type="siglip_vision_model", **_VISION, vision_use_head=False),
        text_config=dict(model_type="gemma3_text", **_TEXT, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
        mm_tokens_per_image=4, boi_token_index=252, eoi_token_index=253, image_token_index=255,
    )
    return Gemma3ForConditionalGeneration(cfg)


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "llava": _llava,
    "blip-2": _blip2,
    "clip": _clip,
    "siglip": _siglip,
    "qwen2-vl": _qwen2_vl,
    "idefics3": _idefics3,
    "paligemma": _paligemma,
    "instructblip": _instructblip,
    "qwen2.5-vl": _qwen2_5_vl,
    "smolvlm": _smolvlm,
    "gemma3": _gemma3,
}


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    if family not in BUILDERS:
        raise KeyError(f"no tiny builder for {family!r}; have {sorted(BUILDERS)}")
    torch.manual_seed(seed)
    return BUILDERS[family]().to(dtype).eval()


def _ids(n_image: int, image_token: int, text: int, batch: int, g: torch.Generator) -> torch.Tensor:
    txt = torch.randint(3, 240, (batch, text), generator=g)
    img = torch.full((batch, n_image), image_token)
    return torch.cat([txt[:, :1], img, txt[:, 1:]], dim=1)


def example_inputs(family: str, model: torch.nn.Module, batch: int = 2, text: int = 8, seed: int = 0) -> dict:
    """Random but valid forward() kwargs (image + prompt) for a model built by :func:`build`."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    dtype = next(model.parameters()).dtype
    px = torch.randn(batch, 3, 32, 32, generator=g).to(dtype)
    if family in ("clip", "siglip"):
        return {"input_ids": torch.randint(3, 240, (batch, text), generator=g), "pixel_values": px}
    if family == "llava":
        return {"input_ids": _ids(16, c.image_token_id, text, batch, g), "pixel_values": px}
    if family == "paligemma":
        return {"input_ids": _ids(16, c.image_token_id, text, batch, g), "pixel_values": px}
    if family == "blip-2":
        return {"input_ids": _ids(c.num_query_tokens, c.image_token_id, text, batch, g), "pixel_values": px}
    if family == "instructblip":
        ids = _ids(c.num_query_tokens, c.image_token_id, text, batch, g)
        # the instruction as the Q-Former sees it (its own tokenizer in the real model)
        return {"input_ids": ids, "pixel_values": px, "qformer_input_ids": torch.randint(3, 240, (batch, text), generator=g)}
    if family == "gemma3":
        ids = _ids(c.mm_tokens_per_image, c.image_token_id, text, batch, g)
        # token_type_ids mark image tokens (as Gemma3Processor does): they attend bidirectionally
        return {"input_ids": ids, "pixel_values": px, "token_type_ids": (ids == c.image_token_id).long()}
    if family in ("idefics3", "smolvlm"):
        return {"input_ids": _ids(4, c.image_token_id, text, batch, g), "pixel_values": px.unsqueeze(1)}
    if family in ("qwen2-vl", "qwen2.5-vl"):
        grid = torch.tensor([[1, 4, 4]] * batch)  # t, h, w patches per image
        patches = torch.randn(batch * 16, 3 * 2 * 8 * 8, generator=g).to(dtype)
        ids = _ids(4, c.image_token_id, text, batch, g)
        return {"input_ids": ids, "pixel_values": patches, "image_grid_thw": grid,
                "mm_token_type_ids": (ids == c.image_token_id).long()}
    raise KeyError(family)


# words of the tiny tokenizer: the bundled calibration prompts' words and a few common ones, so that
# rendered prompts are mostly real tokens (anything else is <unk>)
_WORDS = ("the a an and or of to in on at is are was what how this that image picture photo describe detail main subject "
          "doing list objects you can see where they colors dominate lighting write short caption for there any text if so "
          "does it say might have happened just before taken background mood conveys many distinct explain counted could be "
          "used presentation questions would curious child ask about compare left half with right user assistant system").split()
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_processor(family: str):
    """A processor for a tiny model, built offline: a word-level tokenizer over 255 ids (the
    tiny vocabulary; ``<image>`` is id 255, the config's image token), the vision tower's
    32x32 image preprocessing and a chat template. LLaVA only (other tiny models have none)."""
    if family != "llava":
        raise KeyError(f"no tiny processor for {family!r} (only llava has one)")
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    import transformers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    # the PIL image processor (the default one needs torchvision)
    image_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special)}
    for w in _WORDS + list(".,?!:;'\"-0123456789"):
        vocab.setdefault(w, len(vocab))
    assert len(vocab) < 255, len(vocab)
    vocab["<image>"] = 255
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Split(Regex(r"<image>|\w+|[^\w\s]"), behavior="isolated")])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = image_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=_TINY_CHAT_TEMPLATE, image_token="<image>")

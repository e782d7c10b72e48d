"""Build a LLaVA-OneVision model + processor from a recipe, three ways.

    from model.builder import build_model_and_processor
    model, processor = build_model_and_processor(load_recipe("recipes/tiny.yaml"))    # (c) tiny, offline
    # (a) compose: vision_tower + llm sources (hub id, local path or s3:// prefix), fresh mlp2x_gelu projector
    # (b) continue: model.init_from (or init_from=...) names an existing LLaVA-OneVision HF folder

All three give transformers' `LlavaOnevisionForConditionalGeneration` and `LlavaOnevisionProcessor`, so
stock tools (lmms-eval's llava_hf, KServe's HF runtime) load what we save. `configure_stage` writes a
stage's AnyRes settings into model config and processor alike: they must agree on token counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from model.chat import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IMAGE_TOKEN, SPECIAL_TOKENS, VIDEO_TOKEN
from onevision.storage import resolve_source
from onevision.recipe import Recipe, StageSpec

SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]  # SigLIP normalises to [-1, 1]


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process (no hub), with ChatML and <image>/<video> special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   chat_template=CHAT_TEMPLATE, model_max_length=32768)


def tiny_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the shapes world's vocabulary plus chat scaffolding."""
    from model import shapes_world
    from model.chat import DEFAULT_SYSTEM, OPTION_LETTER, SHORT_ANSWER

    return [*shapes_world.corpus_texts(), DEFAULT_SYSTEM, SHORT_ANSWER, OPTION_LETTER, "system\n", "user\n",
            "assistant\n"] * 4


def make_processor(tokenizer: Any, recipe: Recipe) -> LlavaOnevisionProcessor:
    size = {"height": recipe.model.image_size, "width": recipe.model.image_size}
    image_processor = LlavaOnevisionImageProcessor(size=size, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
                                                   image_grid_pinpoints=[[recipe.model.image_size] * 2])
    video_processor = LlavaOnevisionVideoProcessor(size=size, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=video_processor, num_image_tokens=recipe.model.tokens_per_tile,
                                   vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                                   vision_aspect_ratio="anyres_max_9")


def _ov_config(recipe: Recipe, vision: SiglipVisionConfig, text: Qwen2Config, tokenizer: Any) -> LlavaOnevisionConfig:
    vision.vision_use_head = False  # OV uses patch features, not SigLIP's pooled head
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_layer=recipe.model.vision_feature_layer, vision_feature_select_strategy="full",
        projector_hidden_act="gelu",  # mlp2x_gelu: Linear -> GELU -> Linear
        image_grid_pinpoints=[[recipe.model.image_size] * 2], tie_word_embeddings=False,
    )


def build_tiny(recipe: Recipe, seed: int | None = None) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """(c) Random SigLIP + Qwen2 from config and an in-process tokenizer: fully offline, seconds on a CPU."""
    sizes = recipe.model.tiny
    if sizes is None:
        raise ValueError("recipe.model.tiny is not set")
    tokenizer = train_tiny_tokenizer(tiny_corpus(), sizes.vocab_size)
    vision = SiglipVisionConfig(hidden_size=sizes.vision_hidden_size, intermediate_size=4 * sizes.vision_hidden_size,
                                num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                                image_size=recipe.model.image_size, patch_size=recipe.model.patch_size)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=sizes.text_hidden_size,
                       intermediate_size=4 * sizes.text_hidden_size, num_hidden_layers=sizes.text_layers,
                       num_attention_heads=sizes.text_heads, num_key_value_heads=sizes.text_kv_heads,
                       max_position_embeddings=8192, initializer_range=sizes.text_initializer_range,
                       tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(recipe.training.seed if seed is None else seed)
    # _from_config, not the constructor: under ZeRO-3 it builds the model partitioned (zero.Init)
    model = LlavaOnevisionForConditionalGeneration._from_config(_ov_config(recipe, vision, text, tokenizer))
    return model, make_processor(tokenizer, recipe)


def compose_pretrained(recipe: Recipe, dtype: torch.dtype = torch.float32) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """(a) A pretrained SigLIP + Qwen2 LLM, a fresh mlp2x_gelu projector, <image>/<video> added."""
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    vision_src, llm_src = resolve_source(recipe.model.vision_tower), resolve_source(recipe.model.llm)
    vision = SiglipVisionModel.from_pretrained(vision_src, dtype=dtype)
    llm = AutoModelForCausalLM.from_pretrained(llm_src, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(llm_src)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = ENDOFTEXT if ENDOFTEXT in tokenizer.get_vocab() else tokenizer.eos_token
    model = LlavaOnevisionForConditionalGeneration(_ov_config(recipe, vision.config, llm.config, tokenizer)).to(dtype)
    missing, unexpected = model.model.vision_tower.load_state_dict(vision.state_dict(), strict=False)
    if missing:
        raise ValueError(f"vision tower {vision_src}: weights missing for {missing[:5]}")
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    model.resize_token_embeddings(len(tokenizer))
    return model, make_processor(tokenizer, recipe)


def load_pretrained(source: str, dtype: torch.dtype = torch.float32) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """(b) An existing LLaVA-OneVision HF folder (ours, or a llava-hf/*-ov-hf release)."""
    path = resolve_source(source)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype)
    processor = LlavaOnevisionProcessor.from_pretrained(path)
    return model, processor


def build_model_and_processor(recipe: Recipe, init_from: str | None = None,
                              dtype: torch.dtype = torch.float32) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """The model a stage starts from: `init_from` (previous stage), else the recipe's source."""
    source = init_from or recipe.model.init_from
    if source:
        return load_pretrained(source, dtype)
    if recipe.model.vision_tower == "tiny":
        return build_tiny(recipe)
    return compose_pretrained(recipe, dtype)


def configure_stage(model: LlavaOnevisionForConditionalGeneration, processor: LlavaOnevisionProcessor,
                    stage: StageSpec, tile_size: int) -> None:
    """Write the stage's AnyRes grid and max-tiles into model config and processor, identically.

    `square` (Stage-1) keeps a 1x1 grid; its single images are fed base-tile only (see model.processing).
    """
    pinpoints = stage.grid_pinpoints_pixels(tile_size)
    aspect = stage.image_aspect_ratio
    if aspect == "anyres":  # plain anyres: as many tiles as the largest pinpoint has
        aspect = f"anyres_max_{max(h * w for h, w in pinpoints) // tile_size ** 2}"
    elif aspect == "square":
        aspect = "anyres_max_1"
    model.config.image_grid_pinpoints = pinpoints
    model.config.vision_aspect_ratio = aspect
    processor.image_processor.image_grid_pinpoints = pinpoints
    processor.vision_aspect_ratio = aspect

"""Building the model three ways; save -> reload offline is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from model.batching import Collator
from model.builder import build_model_and_processor, build_tiny, load_pretrained, train_tiny_tokenizer
from model.processing import SampleProcessor
from onevision.recipe import parse_recipe


def test_tiny_model_matches_the_recipe(tiny_recipe) -> None:
    model, processor = build_tiny(tiny_recipe)
    assert model.config.vision_config.hidden_size == tiny_recipe.model.tiny.vision_hidden_size
    assert model.config.text_config.num_hidden_layers == tiny_recipe.model.tiny.text_layers
    assert processor.num_image_tokens == tiny_recipe.model.tokens_per_tile == 16
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert len(processor.tokenizer) == model.config.text_config.vocab_size <= tiny_recipe.model.tiny.vocab_size
    params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < params < 3e6, params
    again, _ = build_tiny(tiny_recipe)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_save_and_reload_offline_gives_identical_logits(tiny, tmp_path: Path, media_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    loaded, loaded_processor = load_pretrained(str(tmp_path / "ckpt"))
    assert loaded.config.image_grid_pinpoints == model.config.image_grid_pinpoints
    assert loaded.config.vision_aspect_ratio == model.config.vision_aspect_ratio
    assert loaded_processor.vision_aspect_ratio == processor.vision_aspect_ratio
    sample = {"id": "s", "image": "100x200.png",
              "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}
    batches = [Collator(p.tokenizer.pad_token_id)([SampleProcessor(p, "qwen_1_5", 4096, media_root=media_dir)(sample)])
               for p in (processor, loaded_processor)]
    assert torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, loaded(**batches[1]).logits)


def test_compose_from_pretrained_parts(tiny_recipe, tmp_path: Path, media_dir: Path) -> None:
    """Path (a) with local folders standing in for google/siglip-* and Qwen/Qwen2-*-Instruct."""
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=56, patch_size=14))
    tokenizer = train_tiny_tokenizer(["hello world, what colour is it?"] * 50, 300)
    tokenizer.add_special_tokens({"additional_special_tokens": []})
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    vision.save_pretrained(tmp_path / "siglip")
    llm.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    doc = tiny_recipe.model_dump(mode="json")
    doc["model"].update(vision_tower=str(tmp_path / "siglip"), llm=str(tmp_path / "qwen"), tiny=None)
    model, processor = build_model_and_processor(parse_recipe(doc))
    state = model.model.vision_tower.state_dict()
    assert all(torch.equal(state[k], v) for k, v in vision.state_dict().items() if k in state)
    assert torch.equal(model.lm_head.weight[: llm.config.vocab_size], llm.lm_head.weight)
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)  # resized for <image>/<video>
    assert processor.tokenizer.convert_tokens_to_ids("<video>") == model.config.video_token_id
    sample = {"id": "c", "image": "90x60.png",
              "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}
    batch = Collator(processor.tokenizer.pad_token_id)([SampleProcessor(processor, "qwen_1_5", 4096, media_root=media_dir)(sample)])
    assert torch.isfinite(model(**batch).loss)

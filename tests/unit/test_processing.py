"""Processing LLaVA samples into model inputs, checked against what the tiny model computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.batching import Collator
from model.builder import configure_stage
from model.processing import IGNORE_INDEX, SampleError, SampleProcessor
from tests.unit.conftest import SIZES


def ask(ph: str = "<image>\n", q: str = "What colour is the shape?", a: str = "red") -> list[dict]:
    return [{"from": "human", "value": f"{ph}{q}"}, {"from": "gpt", "value": a}]


def _features(model, batch) -> tuple[int, int]:
    """(number of image features, number of video features) the model produces for a batch."""
    inner = model.model
    n_img = n_vid = 0
    if "pixel_values" in batch:
        out = inner.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                                       batch_num_images=batch["batch_num_images"],
                                       vision_aspect_ratio=model.config.vision_aspect_ratio)
        n_img = sum(f.shape[0] for f in out.pooler_output)
    if "pixel_values_videos" in batch:
        out = inner.get_video_features(pixel_values_videos=batch["pixel_values_videos"])
        n_vid = out.pooler_output.shape[0] * out.pooler_output.shape[1]
    return n_img, n_vid


@pytest.mark.parametrize("stage", ["stage1_5", "stage2_si"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_single_image_tokens_equal_model_features(tiny, tiny_recipe, media_dir, stage, size) -> None:
    model, processor = tiny
    configure_stage(model, processor, getattr(tiny_recipe.stages, stage), tiny_recipe.model.image_size)
    sp = SampleProcessor(processor, "qwen_1_5", 4096, media_root=media_dir)
    item = sp({"id": "x", "image": f"{size[0]}x{size[1]}.png", "conversations": ask()})
    batch = Collator(processor.tokenizer.pad_token_id)([item])
    n_tokens = int((item.input_ids == processor.image_token_id).sum())
    with torch.no_grad():
        assert _features(model, batch) == (n_tokens, 0)
        assert torch.isfinite(model(**batch, use_cache=False).loss)


def test_anyres_budget_grows_with_resolution_and_is_capped(tiny, media_dir) -> None:
    model, processor = tiny
    sp = SampleProcessor(processor, "qwen_1_5", 4096, media_root=media_dir)
    count = lambda name: int((sp({"id": name, "image": name, "conversations": ask()}).input_ids  # noqa: E731
                              == processor.image_token_id).sum())
    tile = processor.num_image_tokens  # 16 for 56-px tiles of 14-px patches
    assert count("56x56.png") < count("168x168.png") <= tile * 10 + 4 * 3  # base + 9 tiles + newlines


def test_multi_image_video_text_and_mixed_batch(tiny, media_dir) -> None:
    model, processor = tiny
    sp = SampleProcessor(processor, "qwen_1_5", 4096, video_frames=4, media_root=media_dir)
    multi = sp({"id": "m", "image": ["56x56.png", "100x200.png", "30x1000.png"],
                "conversations": ask("<image>\n<image>\n<image>\n", "Which is red?", "all")})
    video = sp({"id": "v", "video": "clip.mp4", "conversations": ask("<video>\n", "Where does it move?", "right")})
    text = sp({"id": "t", "conversations": ask("", "Say hi.", "hi")})
    single = sp({"id": "s", "image": "90x60.png", "conversations": ask()})
    assert [i.modality for i in (multi, video, text, single)] == ["multi_image", "video", "text", "image"]
    tile = processor.num_image_tokens
    assert int((multi.input_ids == processor.image_token_id).sum()) == 3 * (tile + 1)  # base tile + newline each
    assert video.pixel_values_videos[0].shape[0] == 4  # frames sampled to the stage's cap
    assert int((video.input_ids == processor.video_token_id).sum()) == 4 * (2 * 2) + 1  # 4x4 grid pooled to 2x2
    for items in ([multi], [video], [multi, video, text, single]):
        batch = Collator(processor.tokenizer.pad_token_id)(items)
        n_img, n_vid = _features(model, batch)
        assert n_img == int((batch["input_ids"] == processor.image_token_id).sum())
        assert n_vid == int((batch["input_ids"] == processor.video_token_id).sum())


def test_square_stage_feeds_base_tile_only(tiny, tiny_recipe, media_dir) -> None:
    model, processor = tiny
    configure_stage(model, processor, tiny_recipe.stages.stage1, tiny_recipe.model.image_size)
    sp = SampleProcessor(processor, "plain", 512, square=True, media_root=media_dir)
    for names in (["100x200.png"], ["100x200.png", "1000x30.png", "56x56.png"]):
        items = [sp({"id": n, "image": n, "conversations": ask("<image>", "", "a red square")}) for n in names]
        assert all(int((i.input_ids == processor.image_token_id).sum()) == processor.num_image_tokens + 1 for i in items)
        batch = Collator(processor.tokenizer.pad_token_id, square=True)(items)
        assert batch["pixel_values"].shape[0] == len(names)  # one (base) tile per image
        with torch.no_grad():
            assert _features(model, batch)[0] == int((batch["input_ids"] == processor.image_token_id).sum())


def test_forward_backward_every_modality(tiny, media_dir) -> None:
    model, processor = tiny
    model.train()
    sp = SampleProcessor(processor, "qwen_1_5", 4096, video_frames=4, media_root=media_dir)
    samples = {
        "image": {"id": "i", "image": "100x200.png", "conversations": ask()},
        "multi_image": {"id": "m", "image": ["56x56.png", "90x60.png"], "conversations": ask("<image><image>\n")},
        "video": {"id": "v", "video": "clip.mp4", "conversations": ask("<video>\n")},
        "text": {"id": "t", "conversations": ask("", "Say red.")},
    }
    for modality, sample in samples.items():
        model.zero_grad()
        loss = model(**Collator(processor.tokenizer.pad_token_id)([sp(sample)]), use_cache=False).loss
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert torch.isfinite(loss), modality
        assert any("language_model" in n and g.abs().sum() > 0 for n, g in grads.items()), modality
        has_visual = modality != "text"
        assert any("multi_modal_projector" in n and g.abs().sum() > 0 for n, g in grads.items()) == has_visual
        assert any("vision_tower" in n and g.abs().sum() > 0 for n, g in grads.items()) == has_visual


def test_labels_cover_only_assistant_replies(tiny) -> None:
    _, processor = tiny
    tok = processor.tokenizer
    sp = SampleProcessor(processor, "qwen_1_5", 4096)
    conv = [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And blue?"}, {"from": "gpt", "value": "blue"}]
    item = sp({"id": "two-turns", "conversations": conv})
    trained = tok.decode(item.input_ids[item.labels != IGNORE_INDEX])
    assert trained == "red<|im_end|>blue<|im_end|>"
    assert "Say red." in tok.decode(item.input_ids) and "system" in tok.decode(item.input_ids)
    assert torch.equal(item.labels[item.labels != IGNORE_INDEX], item.input_ids[item.labels != IGNORE_INDEX])
    plain = SampleProcessor(processor, "plain", 4096)({"id": "p", "conversations": ask("", "ignored", "a cap")})
    assert tok.decode(plain.input_ids[plain.labels != IGNORE_INDEX]) == "a cap\n"


def test_truncation_never_cuts_visual_tokens(tiny, media_dir) -> None:
    _, processor = tiny
    long_answer = " ".join(["red"] * 400)
    sp = SampleProcessor(processor, "qwen_1_5", 200, media_root=media_dir)
    item = sp({"id": "long", "image": "56x56.png", "conversations": ask(a=long_answer)})
    assert item.truncated and len(item) == 200 and (item.labels != IGNORE_INDEX).any()
    tight = SampleProcessor(processor, "qwen_1_5", 40, media_root=media_dir)
    with pytest.raises(SampleError, match="too long.*visual tokens end at") as err:
        tight({"id": "big-image", "image": "168x168.png", "conversations": ask()})
    assert err.value.sample_id == "big-image"


MALFORMED = [
    ({"image": "missing.png", "conversations": ask()}, "missing.png"),
    ({"image": "56x56.png", "conversations": ask("")}, "0 <image> placeholder(s) but 1 image"),
    ({"conversations": ask("<image>\n<image>\n")}, "2 <image> placeholder(s) but 0 image"),
    ({"conversations": []}, "empty conversation"),
    ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]}, "alternate"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "alternate"),
    ({"conversations": [{"from": "robot", "value": "a"}]}, "unknown role"),
    ({"image": "corrupt.png", "conversations": ask()}, "not a decodable image"),
    ({"video": "clip.mp4", "conversations": ask("<video>\n")}, "no video_frames"),
]


@pytest.mark.parametrize("sample,reason", MALFORMED, ids=[m[1][:30] for m in MALFORMED])
def test_malformed_samples_name_the_sample(tiny, media_dir: Path, sample: dict, reason: str) -> None:
    _, processor = tiny
    (media_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    sp = SampleProcessor(processor, "qwen_1_5", 4096, media_root=media_dir)
    with pytest.raises(SampleError) as err:
        sp({"id": "bad-42", **sample})
    assert err.value.sample_id == "bad-42" and "bad-42" in str(err.value)
    assert reason in str(err.value), str(err.value)


def test_llava_json_record_round_trip(tiny, media_dir: Path) -> None:
    """The on-disk LLaVA JSON format (as in LLaVA-OneVision-Data) goes straight in."""
    _, processor = tiny
    record = json.loads(json.dumps({"id": 7, "image": "56x56.png", "conversations": ask()}))
    item = SampleProcessor(processor, "qwen_1_5", 4096, media_root=media_dir)(record)
    assert item.id == "7" and item.modality == "image"


def test_pixel_tensors_equal_the_stock_image_processor_call(tiny, tiny_recipe, media_dir) -> None:
    """SampleProcessor skips the stock call's padding to a common patch count and its batch stacking (two
    copies of every patch); the tensors must stay those of `image_processor(images=[...], return_tensors="pt")`."""
    from PIL import Image

    model, processor = tiny
    configure_stage(model, processor, tiny_recipe.stages.stage2_ov, tiny_recipe.model.image_size)
    sp = SampleProcessor(processor, "qwen_1_5", 4096, media_root=media_dir)
    for names in (["168x168.png"], ["100x200.png"], ["56x56.png", "100x200.png", "30x1000.png"]):
        ph = "<image>\n" * len(names)
        ours = sp({"id": "x", "image": names if len(names) > 1 else names[0], "conversations": ask(ph)})
        images = [Image.open(media_dir / n).convert("RGB") for n in names]
        stock = processor.image_processor(images=[images], return_tensors="pt")
        assert [tuple(s) for s in stock["image_sizes"].tolist()] == [tuple(s) for s in ours.image_sizes]
        for i, tensor in enumerate(ours.pixel_values):
            expected = stock["pixel_values"][i, :1] if len(names) > 1 else stock["pixel_values"][i]
            assert tensor.shape == expected.shape and torch.equal(tensor, expected), (names, i)
    assert ours.pixel_values[0].shape[0] == 1 and sp(
        {"id": "y", "image": "168x168.png", "conversations": ask()}).pixel_values[0].shape[0] > 1  # AnyRes patches

"""Padding-free packing gives the same per-token loss as padding, through the trainer's own collators.

One batch of the OneVision-shaped mix (text-only, a single AnyRes image, several images, a video) goes
through `make_trainer`'s collator with `training.packing` off (rows padded to the longest) and on (one
padding-free row), and through the same tiny model in fp32: every label token's loss agrees to 1e-5,
with attention per sample by sdpa per sample (our varlen path) and by transformers' own block-diagonal
mask from the restarting position ids.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from model import shapes_world
from model.batching import VARLEN_SDPA, Collator, PackedCollator
from model.builder import build_model_and_processor, configure_stage
from model.processing import IGNORE_INDEX, SampleProcessor
from model.train import make_args, make_trainer
from onevision.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def one_process():
    """A world of one for TrainingArguments (its CPU gloo backend starts a process group); ended after."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(port)).items():
            mp.setenv(key, value)
        yield
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_process):
    tmp = tmp_path_factory.mktemp("packing")
    recipes = {}
    for packing in (False, True):
        path = tmp / f"recipe-{packing}.yaml"
        path.write_text(yaml.safe_dump({"extends": str(ROOT / "recipes/tiny.yaml"),
                                        "training": {"zero_stage": 0, "packing": packing}}))
        recipes[packing] = load_recipe(path)
    recipe = recipes[False]
    stage = recipe.stages.stage2_ov
    model, processor = build_model_and_processor(recipe)
    configure_stage(model, processor, stage, recipe.model.image_size)
    model.config.use_cache = False
    world = tmp / "world"
    records = json.loads(shapes_world.generate_ov_mix(world, 20, seed=3, tile=56).read_text())
    sp = SampleProcessor(processor, "qwen_1_5", stage.model_max_length, video_frames=stage.video_frames,
                         media_root=world)
    items = [sp(r) for r in records]
    picked = []
    for modality in ("text", "image", "multi_image", "video", "image", "multi_image"):
        picked.append(next(i for i in items if i.modality == modality and i not in picked))
    return recipes, stage, model, processor, picked, tmp


def collator_of(recipe, stage, model, processor, tmp) -> object:
    args = make_args(recipe, stage, "stage2_ov", tmp / f"out-{recipe.training.packing}")
    return make_trainer(recipe, stage, "stage2_ov", args, model, processor, [], None, []).data_collator


def token_losses(model, batch) -> torch.Tensor:
    """Per-token cross-entropy of every label token, in row order (the model's own shift)."""
    logits = model(**batch, use_cache=False).logits.float()
    labels = batch["labels"]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                               ignore_index=IGNORE_INDEX, reduction="none")
    return losses[labels[:, 1:].flatten() != IGNORE_INDEX]


def test_packed_equals_padded_per_token(setup):
    recipes, stage, model, processor, items, tmp = setup
    assert {i.modality for i in items} == {"text", "image", "multi_image", "video"}
    assert len({len(i) for i in items}) > 3  # lengths differ: the padded batch has padding to ignore
    padded_collate = collator_of(recipes[False], stage, model, processor, tmp)
    assert isinstance(padded_collate, Collator)
    assert model.config.text_config._attn_implementation == "sdpa"
    # packing on: make_trainer switches the language model to sdpa per sample and asks for the bounds
    packed_collate = collator_of(recipes[True], stage, model, processor, tmp)
    assert isinstance(packed_collate, PackedCollator)
    assert model.config.text_config._attn_implementation == VARLEN_SDPA

    padded, packed = padded_collate(items), packed_collate(items)
    assert packed["input_ids"].shape == (1, sum(len(i) for i in items))  # one row, no padding at all
    assert "attention_mask" not in packed
    assert padded["attention_mask"].sum() == packed["input_ids"].numel()
    assert packed["cu_seq_lens_q"].tolist() == [0, *torch.tensor([len(i) for i in items]).cumsum(0).tolist()]
    starts = packed["cu_seq_lens_q"][:-1]
    assert (packed["position_ids"][0, starts] == 0).all()
    assert (packed["labels"][0, starts] == IGNORE_INDEX).all()  # no sample learns its neighbour's first token
    # the Trainer's num_items_in_batch counts labels[..., 1:]: the same label tokens both ways
    assert (padded["labels"][:, 1:] != IGNORE_INDEX).sum() == (packed["labels"][:, 1:] != IGNORE_INDEX).sum()

    from transformers import AttentionInterface

    from model.batching import varlen_sdpa_attention
    per_sample_calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):  # proves the varlen branch ran
        per_sample_calls.append(query.shape[0] == 1 and attention_mask is None)
        return varlen_sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(VARLEN_SDPA, spy)
    model.eval()
    with torch.no_grad():
        reference = token_losses(model, padded)
        assert per_sample_calls and not any(per_sample_calls)  # padded: transformers' sdpa with the mask
        per_sample_calls.clear()
        varlen = token_losses(model, packed)
        bare = {k: v for k, v in packed.items() if not k.startswith(("cu_seq", "max_len"))}
        from_positions = token_losses(model, bare)  # varlen bounds read from the restarting position ids
        assert per_sample_calls and all(per_sample_calls)
        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
        # transformers' own path: sdpa with the block-diagonal mask it derives from the position ids
        model.config.text_config._attn_implementation = "sdpa"
        for module in model.modules():
            if getattr(getattr(module, "config", None), "model_type", None) == "qwen2":
                module.config._attn_implementation = "sdpa"
        stock = token_losses(model, bare)
        loss_padded = model(**padded, use_cache=False).loss
        loss_packed = model(**copy.copy(packed), use_cache=False).loss
    assert reference.numel() == varlen.numel() == stock.numel() > 0
    torch.testing.assert_close(varlen, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_positions, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stock, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)
    # and a sample attending across its neighbour would change its losses: the check can fail
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
    with torch.no_grad():
        leaked = token_losses(model, {k: v for k, v in leaky.items() if not k.startswith(("cu_seq", "max_len"))})
    assert not torch.allclose(leaked, reference, atol=1e-4)

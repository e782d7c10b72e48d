"""The memory plan (model/plan.py): the shipped recipes' models built on the meta device at their real
sizes, shapes checked through a meta forward, per-GPU memory from DeepSpeed's estimators, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.plan import (GIB, PlanError, activation_bytes, build_config, model_param_counts,
                            model_state_bytes, plan_recipe)
from onevision.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
SIZES = ("0.5b", "7b", "72b")


@pytest.fixture(scope="module")
def plans() -> dict:
    """Each shipped recipe planned once on its own cluster resources (meta device: ~2-5 s each)."""
    return {size: plan_recipe(load_recipe(ROOT / f"recipes/ov-{size}.yaml")) for size in SIZES}


@pytest.mark.parametrize("size", SIZES)
def test_shipped_recipes_plan_and_fit_their_own_cluster(plans: dict, size: str) -> None:
    plan = plans[size]
    assert [s.stage for s in plan.stages] == ["stage1", "stage1_5", "stage2_si", "stage2_ov"]
    assert plan.fits, plan.refusals()
    by = {s.stage: s for s in plan.stages}
    # The visual token counts the meta forward produced (and the processor agreed with), from LLaVA-OV's
    # rules written out: a 27x27-patch tile is 729 tokens; Stage-1 feeds the base tile + a newline.
    assert (by["stage1"].image_tiles, by["stage1"].image_tokens) == (1, 729 + 1)
    # anyres_max_4 on a 2x2 grid: base + 4 tiles; 54x54 features (not over 4 x 729: kept) + 54 newlines
    assert (by["stage1_5"].image_tiles, by["stage1_5"].image_tokens) == (5, 729 + 54 * 54 + 54)
    # anyres_max_9 on a 6x6 grid: base + 36 tiles; 162x162 features over 9 x 729 by 2x: 81x81 + 81 newlines
    assert (by["stage2_si"].image_tiles, by["stage2_si"].image_tokens) == (37, 729 + 81 * 81 + 81)
    # video: 32 frames pooled 2x2 to 14x14 = 196 tokens each, + 1 newline
    assert (by["stage2_ov"].video_frames, by["stage2_ov"].video_tokens) == (32, 32 * 196 + 1)
    assert by["stage2_ov"].seq_tokens == 729 + 81 * 81 + 81 + 1024  # the largest visual input + text
    assert by["stage1"].trainable == plan.counts["projector"]  # Stage-1 trains the projector only
    assert by["stage1"].detail["vision"] == 0 < by["stage2_si"].detail["vision"]  # a frozen tower keeps nothing
    assert all(s.trainable == plan.counts["total"] for s in plan.stages[1:])


def test_parameter_counts_match_published_sizes(plans: dict) -> None:
    """Published: Qwen2-7B(-Instruct) 7.62B and Qwen2-72B(-Instruct) 72.7B (the Hugging Face model pages'
    safetensors count, 7,615,616,512 and 72,706,203,648), SigLIP so400m ~0.4B ("shape-optimised 400M" ViT,
    Alabdulmohsin et al. 2023), LLaVA-OneVision-7B 8.03B (its checkpoints' count). Tolerances: 0.5% for the
    LLMs and the 7B total (our vocabulary is the tokenizer's 151,648, not the checkpoint's padded 152,064:
    -0.04%), 5% for the tower (27 layers, no pooling head: what model.builder loads)."""
    c7, c72, c05 = (plans[s].counts for s in ("7b", "72b", "0.5b"))
    assert c7["llm"] == pytest.approx(7.6156e9, rel=0.005)
    assert c72["llm"] == pytest.approx(72.706e9, rel=0.005)
    assert c7["total"] == pytest.approx(8.03e9, rel=0.005)
    assert c7["vision"] == c72["vision"] == c05["vision"] == pytest.approx(0.4e9, rel=0.05)
    # Qwen2-0.5B: 494,032,768 with its LM head tied to the embeddings, and the composed model keeps the tie
    # (transformers takes it from the text config, whatever _ov_config's top-level False says): one matrix
    assert c05["llm"] == pytest.approx(494.03e6, rel=0.005)
    assert c7["projector"] == 1152 * 3584 + 3584 + 3584 * 3584 + 3584 + 3584  # mlp2x_gelu + image_newline
    recipe = load_recipe(ROOT / "recipes/ov-7b.yaml")
    assert model_param_counts(recipe) == c7  # the function serving may reuse: the same counts


def test_states_use_deepspeeds_estimators_as_documented() -> None:
    """DeepSpeed's memory docs (docs/code-docs/source/memory.rst) print, for t5-3b (2851M params, 32M largest
    layer) on 1 node x 8 GPUs, ZeRO-3 offload none, zero_init=1: 6.09GB per GPU (GiB: it divides by 2**30).
    Our split (params, grads, optimizer) must add up to exactly that. (The same page's ZeRO-2 example,
    15.93GB, is the older 4 x params + 16 x params / GPUs; the installed estimator computes
    2 x params + 18 x params / GPUs, 11.28 GiB, and that is the one we follow.)"""
    z3 = model_state_bytes(3, int(2851e6), 0, int(32e6), 8, 1)
    assert (z3["params"] + z3["grads"] + z3["optimizer"]) / GIB == pytest.approx(6.09, abs=0.006)
    assert z3["deepspeed"] == pytest.approx(z3["params"] + z3["grads"] + z3["optimizer"], abs=1)
    z2 = model_state_bytes(2, int(2851e6), 0, 0, 8, 1)
    assert z2["deepspeed"] == pytest.approx(z2["params"] + z2["grads"] + z2["optimizer"], abs=1)
    assert z2["deepspeed"] / GIB == pytest.approx((2 * 2851e6 + 18 * 2851e6 / 8) / GIB)
    assert (4 * 2851e6 + 16 * 2851e6 / 8) / GIB == pytest.approx(15.93, abs=0.006)  # the docs' older formula
    frozen = model_state_bytes(3, int(2851e6), int(1e9), int(32e6), 8, 1)  # frozen: bf16 shards only
    assert frozen["params"] - z3["params"] == 2 * 1e9 / 8 and frozen["optimizer"] == z3["optimizer"]


def test_7b_model_states_match_the_zero_paper(plans: dict) -> None:
    """ZeRO (Rajbhandari et al., SC'20, arXiv 1910.02054), Figure 1: a 7.5B-parameter model trained with
    mixed-precision Adam on 64 GPUs needs 1.9GB per GPU of model states at Pos+g+p (ZeRO-3), counting
    (2 + 2 + 12) bytes per parameter / 64. Our ov-7b Stage-2 figure on 8 nodes x 8 GPUs, without the
    gathered largest layer, is DeepSpeed's 18 bytes per parameter / 64; in the paper's 16 bytes and
    scaled to 7.5B parameters it must give the paper's 1.9GB."""
    plan = plans["7b"]
    states = model_state_bytes(3, plan.counts["total"], 0, plan.largest_layer, 8, 8)  # Stage-2: all trains
    per_param_64 = (states["params"] + states["grads"] + states["optimizer"] - 4 * plan.largest_layer) \
        / plan.counts["total"]  # bytes per parameter per GPU
    assert per_param_64 * 64 == pytest.approx(18, rel=1e-6)
    assert per_param_64 * 16 / 18 * 7.5e9 / 1e9 == pytest.approx(1.9, rel=0.02)  # decimal GB, as the paper
    # the plan's own figure for the 7B Stage-2 on the recipe's 4 nodes x 8: 8.04B x 18 B / 32 + 4 x the
    # 543M-parameter embedding (the largest layer) = 8.2 GiB per GPU before activations
    own = next(s for s in plan.stages if s.stage == "stage2_si")
    assert (own.nodes, own.gpus_per_node) == (4, 8)
    assert (own.params + own.grads + own.optimizer) == pytest.approx(
        (18 * plan.counts["total"] / 32 + 4 * plan.largest_layer) / GIB)
    assert plan.largest_layer == 151648 * 3584


def test_gradient_checkpointing_and_an_unknown_model(plans: dict, tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "recipes/ov-0.5b.yaml")
    config, stage = build_config(recipe), plans["0.5b"].stages[2]
    shapes = {k: getattr(stage, k) for k in ("image_tiles", "video_frames", "seq_tokens")}
    on = activation_bytes(config, recipe.stages.stage2_si, shapes, 729, checkpointing=True)
    off = activation_bytes(config, recipe.stages.stage2_si, shapes, 729, checkpointing=False)
    assert on["llm"] == pytest.approx(stage.detail["llm"] * GIB)  # the recipe checkpoints
    # per LLM layer 34*s*h without checkpointing; 2*s*h kept per layer + one layer's 34*s*h with it
    assert off["llm"] / on["llm"] == pytest.approx(34 * 24 / (2 * 24 + 34))
    assert off["vision"] / on["vision"] == pytest.approx(34 * 27 / (2 * 27 + 34))
    assert off["logits"] == on["logits"] == 10 * stage.seq_tokens * 151648  # the logits are not checkpointed
    doc = recipe.model_dump(mode="json")
    doc["stages"] = {"stage1": doc["stages"]["stage1"]}  # one stage: the rest of the check is about sources
    doc["model"]["llm"] = "someorg/not-a-known-llm"
    with pytest.raises(PlanError, match="someorg/not-a-known-llm.*not a known model"):
        plan_recipe(parse_recipe(doc))
    folder = tmp_path / "qwen2-small"  # a local folder with a config.json is planned from it
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    doc["model"]["llm"] = str(folder)
    small = plan_recipe(parse_recipe(doc), 1, 80, 1)
    # Qwen2 by hand: q (biased), k and v (biased, 2 KV heads of 16), o; SwiGLU; 2 RMSNorms; vocabulary 1000
    # + <image>, <video>; embeddings, final norm and the untied LM head
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert small.counts["llm"] == 1002 * 64 + 2 * layer + 64 + 1002 * 64

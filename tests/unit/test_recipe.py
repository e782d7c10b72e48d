"""The recipe schema: every shipped recipe validates, broken ones name their offending field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from onevision_cli.main import main
from onevision.recipe import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture()
def tiny_doc() -> dict:
    return yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())


def test_the_four_presets_ship() -> None:
    assert {p.name for p in SHIPPED} >= {"tiny.yaml", "ov-0.5b.yaml", "ov-7b.yaml", "ov-72b.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.stages.enabled(), "a shipped recipe trains something"
    assert any(task.threshold is not None for task in recipe.evaluation.tasks), "shipped gates are gated"
    names = {task.name for task in recipe.evaluation.tasks}
    assert names <= known_lmms_eval_tasks(), names - known_lmms_eval_tasks()
    assert {p.task for p in recipe.evaluation.published} <= names  # comparisons only for evaluated tasks


def known_lmms_eval_tasks() -> set[str]:
    """Task names lmms-eval 0.7.3 ships, plus our offline ones (read from the YAMLs, no import)."""
    import re

    import lmms_eval

    roots = [Path(lmms_eval.__file__).parent / "tasks", ROOT / "components/evaluate/tasks"]
    found = set()
    for root in roots:
        for yaml_file in root.rglob("*.yaml"):
            found.update(re.findall(r"^(?:task|group): *[\"']?([\w.-]+)", yaml_file.read_text(errors="ignore"), re.M))
    return found


def test_published_recipe_values() -> None:
    """The values issue #2 names, as the presets encode them (paper Table 1, LLaVA-NeXT scripts)."""
    small, big = load_recipe(ROOT / "recipes/ov-0.5b.yaml"), load_recipe(ROOT / "recipes/ov-72b.yaml")
    s1, s15, si, ov = (spec for _, spec in small.stages.enabled())
    assert s1.trainable == ["projector"] and s1.lr == 1e-3 and s1.global_batch_size == 512
    for stage in (s15, si, ov):
        assert set(stage.trainable) == {"vision_tower", "projector", "language_model"}
        assert (stage.lr, stage.vision_tower_lr) == (1e-5, 2e-6)
        assert stage.epochs == 1 and stage.warmup_ratio == 0.03 and stage.lr_scheduler == "cosine"
    assert [s.max_visual_tokens for s in (s1, s15, si, ov)] == [729, 729 * 5, 729 * 10, 729 * 10]
    assert si.image_aspect_ratio == "anyres_max_9" and ov.video_frames == 32
    pinpoints = si.grid_pinpoints_pixels(small.model.image_size)
    assert len(pinpoints) == 36 and pinpoints[0] == [384, 384] and pinpoints[-1] == [2304, 2304]
    assert small.model.tokens_per_tile == 729
    assert small.training.zero_stage == 3 and small.training.precision == "bf16"
    assert small.training.gradient_checkpointing
    # 72B extends 7B extends 0.5B: batch 256 after Stage-1, Stage-1 stays 512, LLM replaced.
    assert big.model.llm == "Qwen/Qwen2-72B-Instruct"
    assert [s.global_batch_size for _, s in big.stages.enabled()] == [512, 256, 256, 256]
    assert big.cluster.resources("stage2_ov").nodes == 16 and big.cluster.resources("stage2_ov").gpus == 8
    assert big.stages.stage2_ov.vision_tower_lr == 2e-6  # inherited through two `extends`


def _set(doc: dict, dotted: str, value: object) -> dict:
    doc = copy.deepcopy(doc)
    *path, last = dotted.split(".")
    node = doc
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


BROKEN = [
    # (what is changed, value, field the error must name, words it must say)
    ("modle", {"llm": "x"}, "modle", "unknown field"),
    ("stages.stage3", {"lr": 1}, "stages.stage3", "unknown field"),
    ("stages.stage1.lr", -1e-3, "stages.stage1.lr", "greater than 0"),
    ("stages.stage2_si.trainable", [], "stages.stage2_si.trainable", "at least 1"),
    ("stages.stage1_5.data.0.sampling_strategy", "random:150%", "stages.stage1_5.data.0.sampling_strategy", "100%"),
    ("stages.stage1.trainable", ["projector", "vision"], "stages.stage1.trainable.1", "projector"),
    ("stages.stage2_si.grid_pinpoints", "(0x1),...,(3x3)", "stages.stage2_si.grid_pinpoints", "positive"),
    ("stages.stage1_5.vision_tower_lr", None, "stages.stage1_5", "vision_tower_lr is required"),
    ("stages.stage2_ov.image_aspect_ratio", "anyres_max_x", "stages.stage2_ov.image_aspect_ratio", "anyres_max_N"),
    ("stages.stage1.data.0.sampling_strategy", "sometimes", "stages.stage1.data.0.sampling_strategy", "first:N"),
    ("model.visiontower", "tiny", "model.visiontower", "unknown field"),
    ("cluster.steps", {"trian": {"gpus": 1}}, "cluster.steps", "trian"),
    ("deploy.0.canary_percent", 150, "deploy.0.canary_percent", "less than or equal to 100"),
    ("deploy.0.name", "Tiny_OV", "deploy.0.name", "pattern"),
    ("evaluation.tasks", [], "evaluation.tasks", "at least 1"),
]


@pytest.mark.parametrize("dotted,value,field,words", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_recipe_names_the_field(tiny_doc: dict, dotted: str, value: object, field: str, words: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe(_set(tiny_doc, dotted, value), "broken.yaml")
    message = str(err.value)
    assert message.startswith("broken.yaml: invalid recipe")
    assert any(line.strip().startswith(f"{field}:") for line in message.splitlines()), message
    assert words in message, message


def test_every_error_is_reported_at_once(tiny_doc: dict) -> None:
    doc = _set(_set(tiny_doc, "stages.stage1.lr", -1), "stages.stage2_si.trainable", [])
    with pytest.raises(RecipeError) as err:
        parse_recipe(doc)
    assert "stages.stage1.lr" in str(err.value) and "stages.stage2_si.trainable" in str(err.value)


def test_extends_deep_merges_and_detects_cycles(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {ROOT / 'recipes/tiny.yaml'}\nname: child\nstages:\n  stage1: {{lr: 0.01}}\n")
    recipe, base = load_recipe(child), load_recipe(ROOT / "recipes/tiny.yaml")
    assert recipe.stages.stage1.lr == 0.01
    assert recipe.stages.stage1.max_steps == base.stages.stage1.max_steps  # kept from the base
    assert recipe.hash() != base.hash()
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_unreadable_recipes_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_hash_is_stable_and_sensitive(tiny_doc: dict) -> None:
    assert parse_recipe(tiny_doc).hash() == parse_recipe(copy.deepcopy(tiny_doc)).hash()
    assert parse_recipe(_set(tiny_doc, "training.seed", 8)).hash() != parse_recipe(tiny_doc).hash()


def test_cli_validate_and_show(tmp_path: Path, tiny_doc: dict, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_set(tiny_doc, "stages.stage1.lr", -1)))
    assert main(["recipe", "validate", str(ROOT / "recipes/tiny.yaml")]) == 0
    assert main(["recipe", "validate", str(ROOT / "recipes/tiny.yaml"), str(bad)]) == 1
    out = capsys.readouterr()
    assert "ok" in out.out and "stages.stage1.lr" in out.err
    assert main(["recipe", "show", str(ROOT / "recipes/tiny.yaml")]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stages"]["stage1"]["warmup_ratio"] == 0.03  # a default, made explicit
    assert parse_recipe(shown).hash() == load_recipe(ROOT / "recipes/tiny.yaml").hash()

"""Recipe -> MLflow params and lineage tags, without a server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from onevision import tracking
from onevision.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_flatten_params_paths_and_values() -> None:
    flat = tracking.flatten_params({"a": {"b": [1, 2], "c": [{"d": "x"}], "n": None}, "e": True})
    assert flat == {"a.b": "[1, 2]", "a.c.0.d": "x", "e": "True"}


def test_long_values_are_truncated_to_mlflow_limit() -> None:
    flat = tracking.flatten_params({"long": "x" * 10000})
    assert len(flat["long"]) == tracking.MAX_PARAM_VALUE and flat["long"].endswith("...")


def test_recipe_params_cover_every_stage() -> None:
    flat = tracking.flatten_params(load_recipe(ROOT / "recipes/ov-7b.yaml").model_dump(mode="json"))
    assert flat["stages.stage1.lr"] == "0.001"
    assert flat["stages.stage2_ov.data.2.dataset_uri"] == "hf://datasets/lmms-lab/LLaVA-Video-178K"
    assert flat["stages.stage2_si.trainable"] == '["vision_tower", "projector", "language_model"]'
    assert all(len(k) <= 250 for k in flat)


def test_lineage_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    monkeypatch.setenv("ONEVISION_GIT_COMMIT", "abc123")
    tags = tracking.lineage_tags(recipe, "run-1", data_manifest_hash="f00")
    assert tags == {tracking.TAG_RECIPE_NAME: "tiny", tracking.TAG_RECIPE_HASH: recipe.hash(),
                    tracking.TAG_GIT_COMMIT: "abc123", tracking.TAG_PIPELINE_RUN: "run-1",
                    tracking.TAG_DATA_MANIFEST: "f00"}


def test_the_commit_is_known_wherever_it_can_be(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`unknown` only where neither ONEVISION_GIT_COMMIT (the image sets it from a build argument) nor a
    git checkout is there: a checkout without git, or an image built without the argument, fails here."""
    commit = re.compile(r"[0-9a-f]{40}")
    if os.environ.get("ONEVISION_GIT_COMMIT"):  # inside the project image
        assert commit.fullmatch(tracking.git_commit()), os.environ["ONEVISION_GIT_COMMIT"]
    monkeypatch.delenv("ONEVISION_GIT_COMMIT", raising=False)
    if (ROOT / ".git").exists():  # a checkout (a folder, or a file in a worktree): git must answer
        head = tracking.git_commit()
        assert commit.fullmatch(head), f"git_commit() is {head!r} in the checkout {ROOT}: is git installed?"
        assert tracking.git_commit(ROOT / "onevision") == head
        assert tracking.lineage_tags(load_recipe(ROOT / "recipes/tiny.yaml"), "r")[tracking.TAG_GIT_COMMIT] == head
    assert tracking.git_commit(tmp_path) == "unknown"  # neither: said so, not invented
    monkeypatch.setenv("ONEVISION_GIT_COMMIT", "0" * 40)
    assert tracking.git_commit(tmp_path) == "0" * 40  # the variable wins where git cannot see a checkout

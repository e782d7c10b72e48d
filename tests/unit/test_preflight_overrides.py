"""Preflight's recipe overrides: the pipeline parameters (strings from KFP) applied and revalidated."""

from __future__ import annotations

import pytest

from components.preflight.core import apply_overrides
from onevision.recipe import RecipeError
from pipelines.onevision import _overrides, parameter_defaults


def test_kfp_strings_become_typed_fields(tiny_recipe) -> None:
    # KFP hands dict members over as strings, integers as "3.0"
    out = apply_overrides(tiny_recipe, {"stage1.lr": "0.5", "stage2_si.global_batch_size": "3.0",
                                        "curation.workers": "2", "training.seed": 7})
    assert out.stages.stage1.lr == 0.5 and out.stages.stage2_si.global_batch_size == 3
    assert out.curation.workers == 2 and out.training.seed == 7
    assert out.hash() != tiny_recipe.hash() and tiny_recipe.stages.stage1.lr != 0.5  # the input is untouched


def test_zero_means_the_recipes_none(tiny_recipe) -> None:
    out = apply_overrides(tiny_recipe, {"stage2_si.max_steps": "0.0", "stage1.vision_tower_lr": 0})
    assert out.stages.stage2_si.max_steps is None and out.stages.stage1.vision_tower_lr is None
    with pytest.raises(RecipeError, match="vision_tower_lr is required"):  # stage2_si trains the tower
        apply_overrides(tiny_recipe, {"stage2_si.vision_tower_lr": "0.0"})


def test_the_pipelines_defaults_round_trip_to_the_same_recipe(tiny_recipe) -> None:
    """Running the compiled pipeline with its defaults must pin exactly the recipe it was compiled from."""
    defaults = {k: str(v) for k, v in parameter_defaults(tiny_recipe).items()}
    assert apply_overrides(tiny_recipe, _overrides(defaults, tiny_recipe)).hash() == tiny_recipe.hash()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"stage1.learning_rate": "1"}, "stage1.learning_rate.*no such recipe field"),
    ({"nope.lr": "1"}, "nope.lr.*no such recipe field"),
    ({"stage1.lr": "-1"}, "stages.stage1.lr"),
    ({"stage1.lr": "fast"}, "stage1.lr.*not a number"),
    ({"stage1.global_batch_size": "2.5"}, "global_batch_size"),
])
def test_bad_overrides_name_the_field(tiny_recipe, overrides: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        apply_overrides(tiny_recipe, overrides)

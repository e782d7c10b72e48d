"""The data recipe (components/curate/datarecipe.py): what its hash covers and what it leaves out, the
content-addressed prefix, and the JSON round trip the pipeline relies on."""

from __future__ import annotations

import json
import os
from pathlib import Path

from components.curate.datarecipe import DataRecipe
from onevision.recipe import parse_recipe


def _recipe(tiny_recipe, source: Path, **changes):
    doc = tiny_recipe.model_dump(mode="json")
    doc["stages"]["stage2_si"]["data"] = [{"json_path": str(source), "sampling_strategy": changes.pop("sampling", "all")}]
    for dotted, value in changes.items():
        node = doc
        *path, last = dotted.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return parse_recipe(doc)


def test_the_hash_follows_the_data_and_nothing_else(tmp_path: Path, tiny_recipe) -> None:
    source = tmp_path / "data.jsonl"
    source.write_text(json.dumps({"id": 1, "conversations": []}) + "\n")
    base = DataRecipe.of(_recipe(tiny_recipe, source), "stage2_si")
    root = "s3://onevision/curated"
    assert base.curated_uri(root) == f"{root}/tiny/stage2_si/{base.hash()[:16]}"
    same = [_recipe(tiny_recipe, source, **{"stages.stage2_si.lr": 0.5}),  # what training does, not the data
            _recipe(tiny_recipe, source, **{"curation.workers": 7}),
            _recipe(tiny_recipe, source, **{"stages.stage1.data": [{"dataset_uri": "synthetic://shapes/vqa"}]})]
    for recipe in same:
        assert DataRecipe.of(recipe, "stage2_si").hash() == base.hash()
    other = [_recipe(tiny_recipe, source, sampling="first:1"), _recipe(tiny_recipe, source, **{"training.seed": 9}),
             _recipe(tiny_recipe, source, **{"curation.min_image_side": 16}),
             _recipe(tiny_recipe, source, **{"stages.stage2_si.model_max_length": 4096})]
    hashes = {DataRecipe.of(recipe, "stage2_si").hash() for recipe in other}
    assert len(hashes) == len(other) and base.hash() not in hashes
    assert DataRecipe.of(_recipe(tiny_recipe, source), "stage2_ov").hash() != base.hash()

    source.write_text(json.dumps({"id": 2, "conversations": []}) + "\n")  # new records under the same name
    os.utime(source, ns=(1, 1))
    replaced = DataRecipe.of(_recipe(tiny_recipe, source), "stage2_si")
    assert replaced.hash() != base.hash() and replaced.sources[0][0]["mtime_ns"] == 1


def test_the_json_round_trip_keeps_the_hash(tmp_path: Path, tiny_recipe) -> None:
    doc = tiny_recipe.model_dump(mode="json")
    doc["stages"]["stage2_ov"]["data"] = [{"dataset_uri": "synthetic://shapes/video?n=4", "sampling_strategy": "end:2"},
                                          {"json_path": str(tmp_path / "absent.json"), "media_root": "s3://b/m.tar"}]
    data = DataRecipe.of(parse_recipe(doc), "stage2_ov", fingerprints=False)
    again = DataRecipe.from_json(data.to_json())
    assert again == data and again.hash() == data.hash()
    assert again.limits.video_frames == tiny_recipe.stages.stage2_ov.video_frames

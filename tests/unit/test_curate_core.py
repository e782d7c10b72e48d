"""Curation core (first cut): mixture sampling, record checks, quarantine that reconciles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from components.curate.core import CurationError, apply_sampling, check_record, curate_stage
from model.shards import ShardDataset
from onevision import storage
from onevision.recipe import parse_recipe


@pytest.mark.parametrize("strategy,expected", [
    ("all", list(range(10))), ("first:3", [0, 1, 2]), ("end:2", [8, 9]),
    ("first:30%", [0, 1, 2]), ("end:50%", [5, 6, 7, 8, 9]), ("first:20", list(range(10))),
])
def test_sampling_strategies(strategy: str, expected: list[int]) -> None:
    assert apply_sampling(list(range(10)), strategy, seed=0) == expected


def test_random_sampling_is_seeded() -> None:
    a = apply_sampling(list(range(100)), "random:10%", seed=1)
    assert len(a) == 10 and a == apply_sampling(list(range(100)), "random:10%", seed=1)
    assert a != apply_sampling(list(range(100)), "random:10%", seed=2)


def _corpus(root: Path) -> list[dict]:
    Image.new("RGB", (64, 48), (200, 20, 20)).save(root / "ok.png")
    (root / "truncated.png").write_bytes((root / "ok.png").read_bytes()[:40])
    (root / "empty.png").write_bytes(b"")
    q = lambda ph="<image>\n": [{"from": "human", "value": f"{ph}Colour?"}, {"from": "gpt", "value": "red"}]  # noqa: E731
    return [
        {"id": "good", "image": "ok.png", "conversations": q()},
        {"id": "good-text", "conversations": q("")},
        {"id": "truncated", "image": "truncated.png", "conversations": q()},
        {"id": "empty-file", "image": "empty.png", "conversations": q()},
        {"id": "missing", "image": "nope.png", "conversations": q()},
        {"id": "count", "image": "ok.png", "conversations": q("")},
        {"id": "one-sided", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "escape", "image": "../ok.png", "conversations": q()},
        {"id": "video-in-image-stage", "video": "v.mp4", "conversations": q("<video>\n")},
        "not a record",
    ]


def test_each_defect_is_rejected_with_its_reason(tmp_path: Path) -> None:
    reasons = {}
    for record in _corpus(tmp_path):
        media, reason = check_record(record, tmp_path, video_frames=None)
        reasons[record["id"] if isinstance(record, dict) else "bad"] = reason
    assert reasons["good"] is None and reasons["good-text"] is None
    assert "not a decodable image" in reasons["truncated"] and "not a decodable image" in reasons["empty-file"]
    assert "missing" in reasons["missing"]
    assert "placeholders for 1 image" in reasons["count"]
    assert "must end with an assistant turn" in reasons["one-sided"]
    assert "relative to the media root" in reasons["escape"]
    assert "without video_frames" in reasons["video-in-image-stage"]
    assert "'id'" in reasons["bad"]


def test_curation_reconciles_and_reads_back(tmp_path: Path, tiny_recipe) -> None:
    records = _corpus(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps(records))
    doc = tiny_recipe.model_dump(mode="json")
    doc["stages"]["stage2_si"]["data"] = [{"json_path": str(tmp_path / "data.json"), "sampling_strategy": "all"}]
    recipe = parse_recipe(doc)
    summary = curate_stage(recipe, "stage2_si", str(tmp_path / "out"), work_dir=str(tmp_path / "work"))
    assert summary["kept"] == 2 and summary["rejected"] == len(records) - 2
    assert summary["sources"][0]["sampled"] == summary["kept"] + summary["rejected"]
    quarantine = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert len(quarantine) == summary["rejected"] and all(q["reason"] for q in quarantine)
    assert storage.read_manifest(str(tmp_path / "out"))["metadata"] == {"kept": 2, "rejected": 8}
    shards = ShardDataset(sorted((tmp_path / "out").glob("*.tar")))
    assert sorted(shards.record(i)["id"] for i in range(len(shards))) == ["good", "good-text"]


def test_unreadable_sources_are_errors_not_rejects(tmp_path: Path) -> None:
    from components.curate.core import load_source
    from onevision.recipe import DataSource

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CurationError, match="not valid JSON"):
        load_source(DataSource(json_path=str(tmp_path / "bad.json")), tmp_path, 0)
    with pytest.raises(CurationError, match="only synthetic"):
        load_source(DataSource(dataset_uri="hf://datasets/x/y"), tmp_path, 0)

"""The evaluation gate, result checks and comparison table (pure functions; lmms-eval runs are in
tests/integration/test_evaluate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.evaluate.core import EvaluationError, check_results, comparison_table, gate, scores_of
from components.evaluate.lmms_model import build_record
from onevision.recipe import EvalTask, load_recipe

TASKS = [EvalTask(name="ai2d", metric="exact_match", threshold=0.5, max_regression=0.02),
         EvalTask(name="videomme", metric="videomme_perception_score")]


def results(ai2d: float = 0.6, video: float = 40.0, samples: int = 10) -> dict:
    return {"results": {"ai2d": {"exact_match,none": ai2d, "exact_match_stderr,none": 0.01},
                        "videomme": {"videomme_perception_score,none": video}},
            "n-samples": {"ai2d": {"effective": samples}, "videomme": {"effective": samples}}}


def test_gate_absolute_threshold_and_champion_regression() -> None:
    scores = scores_of(results(), TASKS)
    assert scores == {"ai2d/exact_match": 0.6, "videomme/videomme_perception_score": 40.0}
    assert gate(scores, TASKS, None) == {"passed": True, "reasons": [], "scores": scores, "champion": None}
    low = gate(scores_of(results(ai2d=0.4), TASKS), TASKS, None)
    assert not low["passed"] and low["reasons"] == ["ai2d/exact_match = 0.4 is below the threshold 0.5"]
    champion = {"ai2d/exact_match": 0.65}
    behind = gate(scores, TASKS, champion)
    assert not behind["passed"] and "more than 0.02 below the champion's 0.65" in behind["reasons"][0]
    assert gate(scores, TASKS, {"ai2d/exact_match": 0.61})["passed"]  # within the allowed regression
    assert gate(scores, TASKS, {"other/metric": 1.0})["passed"]  # champion without this metric: no bound


@pytest.mark.parametrize("broken,message", [
    (lambda r: r["results"].pop("videomme"), "task videomme: no results"),
    (lambda r: r["n-samples"]["ai2d"].update(effective=0), "task ai2d: evaluated on 0 samples"),
    (lambda r: r["results"]["ai2d"].pop("exact_match,none"), "task ai2d: metric 'exact_match' missing"),
    (lambda r: r["results"]["ai2d"].update({"exact_match,none": float("nan")}), "not a number"),
])
def test_results_that_cannot_be_trusted_fail_naming_the_task(broken, message: str) -> None:
    r = results()
    check_results(r, TASKS)
    broken(r)
    with pytest.raises(EvaluationError, match=message):
        check_results(r, TASKS)


def test_comparison_table_against_the_paper_and_the_champion() -> None:
    recipe = load_recipe("recipes/ov-0.5b.yaml")
    tasks = [t for t in recipe.evaluation.tasks if t.name in ("ai2d", "mme")]
    scores = {"ai2d/exact_match": 0.58, "mme/mme_perception_score": 1190.0}
    verdict = gate(scores, tasks, {"ai2d/exact_match": 0.6})
    table = comparison_table(recipe, "stage2_ov", scores, {"ai2d/exact_match": 0.6}, "3", verdict)
    assert "| ai2d | exact_match | 0.58 (58.0) | 57.1 | 0.6 | 0.55 |" in table  # paper in %, ours x100 beside
    assert "| mme | mme_perception_score | 1190 | 1238 | - | 1200 |" in table
    assert "champion (v3)" in table and "Gate: **failed**" in table and "arXiv 2408.03326" in table
    si = comparison_table(recipe, "stage2_si", scores, None, None, gate(scores, tasks, None))
    assert "| ai2d | exact_match | 0.58 (58.0) | 54.2 |" in si


def test_build_record_keeps_interleaved_placeholders_or_prepends_them() -> None:
    from PIL import Image

    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]
    record, media = build_record("t-0", "Image 1: <image>\nImage 2: <image>\nWhich?", images)
    assert record["conversations"][0]["value"] == "Image 1: <image>\nImage 2: <image>\nWhich?"
    assert record["image"] == ["img0.png", "img1.png"] and set(media) == {"img0.png", "img1.png"}
    record, _ = build_record("t-1", "What colour?", images[:1])
    assert record["conversations"][0]["value"] == "<image>\nWhat colour?"


def test_the_datasets_cache_comes_from_a_folder_or_a_published_mirror(tmp_path, monkeypatch) -> None:
    from components.evaluate.core import hf_cache_env
    from onevision import storage

    monkeypatch.delenv("ONEVISION_HF_CACHE_URI", raising=False)
    assert hf_cache_env(tmp_path) == {}
    monkeypatch.setenv("ONEVISION_HF_CACHE_URI", str(tmp_path / "absent"))
    with pytest.raises(EvaluationError, match="no such folder"):
        hf_cache_env(tmp_path)
    (tmp_path / "pvc").mkdir()
    monkeypatch.setenv("ONEVISION_HF_CACHE_URI", str(tmp_path / "pvc"))
    assert hf_cache_env(tmp_path) == {"HF_HOME": str(tmp_path / "pvc")}
    fetched = []
    monkeypatch.setattr(storage, "get_dir", lambda uri, local: fetched.append((uri, local)) or Path(local).mkdir())
    monkeypatch.setenv("ONEVISION_HF_CACHE_URI", "s3://mirror/hf")
    assert hf_cache_env(tmp_path) == {"HF_HOME": str(tmp_path / "hf_home")}
    assert hf_cache_env(tmp_path) and fetched == [("s3://mirror/hf", tmp_path / "hf_home")]  # fetched once

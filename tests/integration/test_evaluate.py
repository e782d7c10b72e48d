"""The evaluate step for real: lmms-eval (our plugin model, the offline shapes tasks) on a tiny model,
results and samples published, metrics in MLflow (the step's run and the stage's run), the champion
read from the real registry, and a broken task failing the step with its name."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.evaluate.core import EVAL_TAG_PREFIX, EvaluationError, run
from onevision import storage, tracking
from onevision.recipe import dump_recipe, load_recipe

LIMIT = 6


def test_offline_tasks_through_lmms_eval_gated_against_the_champion(local_stack, tmp_path: Path, tiny_model,
                                                                    small_eval_recipe) -> None:
    name = f"it-eval-{uuid.uuid4().hex[:6]}"
    recipe_path = small_eval_recipe(tmp_path, name, LIMIT)
    recipe = load_recipe(recipe_path)
    client = MlflowClient()
    client.create_registered_model(name)
    champion = client.create_model_version(name, source="s3://onevision/champion/hf",
                                           tags={f"{EVAL_TAG_PREFIX}shapes_color.exact_match": "0.9"})
    client.set_registered_model_alias(name, "champion", champion.version)
    parent = tracking.ensure_pipeline_run(recipe, f"it-eval-{uuid.uuid4().hex[:6]}")
    with tracking.step_run("stage2_ov", parent) as stage_run:
        stage_run_id = stage_run.info.run_id
    out = f"s3://onevision/{name}/evaluate/stage2_ov"

    report = run(str(recipe_path), "stage2_ov", str(tiny_model), out, mlflow_parent=parent,
                 work_dir=str(tmp_path / "work"))

    assert set(report["scores"]) == {f"{t.name}/exact_match" for t in recipe.evaluation.tasks}
    assert all(0 <= v <= 1 for v in report["scores"].values())
    gate = report["gate"]
    assert not gate["passed"] and report["champion_version"] == champion.version
    assert any("below the threshold 0.5" in r and "shapes_color" in r for r in gate["reasons"])
    assert any("below the champion's 0.9" in r for r in gate["reasons"])
    assert "| shapes_color | exact_match |" in report["comparison_markdown"]

    files = storage.read_manifest(out)["files"]
    assert {"results.json", "comparison.md", "gate.json", "lmms_eval.log",
            "samples_shapes_color.jsonl", "samples_shapes_video.jsonl", "gallery.html", "gallery.png"} <= set(files)
    results = json.loads(storage.read_bytes(f"{out}/results.json"))
    assert results["n-samples"]["shapes_video"]["effective"] == LIMIT
    samples = storage.read_bytes(f"{out}/samples_shapes_mc.jsonl").decode().splitlines()
    assert len(samples) == LIMIT and "filtered_resps" in json.loads(samples[0])

    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    evaluate = next(r for r in children if r.data.tags[tracking.TAG_STEP] == "evaluate_stage2_ov")
    assert evaluate.data.metrics["gate_passed"] == 0.0
    assert evaluate.data.metrics["shapes_color/exact_match"] == report["scores"]["shapes_color/exact_match"]
    assert {"results.json", "comparison.md", "gallery.html"} <= {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert "eval/shapes_mc/exact_match" in client.get_run(stage_run_id).data.metrics


def test_a_broken_task_fails_the_step_naming_it(tmp_path: Path, tiny_model) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken_task.yaml").write_text((Path("components/evaluate/tasks/shapes_color.yaml").read_text())
                                            .replace("task: shapes_color", "task: broken_task")
                                            .replace("shapes_data/shapes_color.jsonl", "missing/nowhere.jsonl")
                                            .replace("!function shapes_utils.", "!function shapes_utils_copy."))
    (tasks / "shapes_utils_copy.py").write_text(Path("components/evaluate/tasks/shapes_utils.py").read_text())
    doc = yaml.safe_load(dump_recipe(load_recipe("recipes/tiny.yaml")))
    doc["evaluation"]["tasks"] = [{"name": "shapes_color", "metric": "exact_match", "limit": 2},
                                  {"name": "broken_task", "metric": "exact_match", "limit": 2}]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(EvaluationError, match="broken_task"):
        run(str(tmp_path / "recipe.yaml"), "stage2_ov", str(tiny_model), str(tmp_path / "out"),
            work_dir=str(tmp_path / "work"), include_paths=[str(tasks)])
    assert not (tmp_path / "out" / storage.MANIFEST_NAME).exists()

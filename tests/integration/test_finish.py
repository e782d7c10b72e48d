"""The pipeline's parent MLflow run spans the pipeline run (components/finish), on the real local stack.

    .venv/bin/python -m pytest tests/integration/test_finish.py -q
"""

# No `from __future__ import annotations`: KFP reads the test pipeline's real annotation objects.
import json
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.finish.core import finish_pipeline_run
from onevision import storage, tracking
from onevision.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes/tiny.yaml")
RUNS = "s3://onevision/runs-finish-test"

pytestmark = pytest.mark.integration


def _stage_run(client: MlflowClient, parent: str, step: str, metrics: dict[str, float], seconds: float) -> None:
    """A step's nested run as the steps write them (tags onevision.step, mlflow.parentRunId), `seconds` long."""
    experiment = client.get_run(parent).info.experiment_id
    start = int(time.time() * 1000)
    run = client.create_run(experiment, start_time=start, run_name=step,
                            tags={"mlflow.parentRunId": parent, tracking.TAG_STEP: step})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FINISHED", end_time=start + int(seconds * 1000))


def _curated(run_uri: str, stage: str, kept: int, tmp_path: Path) -> None:
    """A published curated stage and the run's pinned data plan naming it (what preflight writes)."""
    data_uri = f"{RUNS}-curated/{stage}/{uuid.uuid4().hex[:8]}"
    folder = tmp_path / stage
    folder.mkdir()
    (folder / "shard-000000.tar").write_bytes(b"x")
    storage.publish_dir(folder, data_uri, metadata={"kept": kept, "stage": stage})
    plan_uri = storage.join(run_uri, "recipe", "data.json")
    plan = json.loads(storage.read_bytes(plan_uri)) if storage.exists(plan_uri) else {}
    plan[stage] = {"data_uri": data_uri, "data_recipe": "{}"}
    storage.write_bytes(plan_uri, json.dumps(plan).encode())


def test_the_parent_runs_until_the_end_and_carries_the_summary(local_stack: object, tmp_path: Path) -> None:
    recipe, run_id = load_recipe(RECIPE), f"finish-{uuid.uuid4().hex[:8]}"
    client = MlflowClient()
    parent = tracking.ensure_pipeline_run(recipe, run_id)
    assert client.get_run(parent).info.status == "RUNNING"  # no longer ended the moment preflight opens it
    run_uri = storage.join(RUNS, recipe.name, run_id)
    _curated(run_uri, "stage1", 118, tmp_path)
    _stage_run(client, parent, "preflight", {}, 2)
    _stage_run(client, parent, "stage1", {"train_loss": 3.1, "eval_loss_after": 2.7, "loss": 3.0}, 40)
    _stage_run(client, parent, "evaluate_stage1", {"shapes_color/exact_match": 0.9, "gate_passed": 1.0}, 5)

    done = finish_pipeline_run(RECIPE, RUNS, run_id, "SUCCEEDED")
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and done["status"] == "FINISHED"
    assert run.info.end_time >= run.info.start_time
    metrics = run.data.metrics
    assert metrics["records_kept/stage1"] == 118
    assert metrics["train_loss/stage1"] == pytest.approx(3.1) and metrics["heldout_loss/stage1"] == pytest.approx(2.7)
    assert metrics["eval/stage1/shapes_color/exact_match"] == pytest.approx(0.9)
    assert metrics["gate_passed/stage1"] == 1.0
    assert metrics["wall_s/stage1"] == pytest.approx(40, abs=0.01) and metrics["wall_s/preflight"] == pytest.approx(2)
    assert metrics["wall_s/pipeline"] == pytest.approx((run.info.end_time - run.info.start_time) / 1000, abs=0.01)
    assert "loss" not in metrics and "wall_s/curate" not in metrics  # only the summary, only what ran
    assert run.data.tags["onevision.pipeline_state"] == "SUCCEEDED"
    timeline = Path(client.download_artifacts(parent, "timeline.png", str(tmp_path)))
    assert timeline.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and timeline.stat().st_size > 5000

    # a resumed run (same run id) reopens the same parent; this time the DAG fails
    assert tracking.ensure_pipeline_run(recipe, run_id) == parent
    assert client.get_run(parent).info.status == "RUNNING"
    _stage_run(client, parent, "stage1_5", {"train_loss": 2.5}, 10)
    finish_pipeline_run(RECIPE, RUNS, run_id, "FAILED")
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.data.metrics["train_loss/stage1_5"] == pytest.approx(2.5)
    finish_pipeline_run(RECIPE, RUNS, run_id, "CANCELED")
    assert client.get_run(parent).info.status == "KILLED"


def test_no_parent_when_preflight_never_opened_one(local_stack: object) -> None:
    assert finish_pipeline_run(RECIPE, RUNS, f"never-{uuid.uuid4().hex[:8]}", "FAILED") == {}


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_the_exit_handler_under_kfp_local_ends_a_failed_run(local_stack: object, kfp_local: Path) -> None:
    from kfp import dsl

    from components.finish.component import finish_pipeline_run as finish_component

    @dsl.component(base_image="python:3.11")
    def broken_step():  # noqa: ANN202 - KFP reads a None annotation as an artifact type
        raise RuntimeError("a step that fails")

    @dsl.pipeline(name="exit-handler-check")
    def flow(recipe_uri: str, runs_root: str, run_id: str):  # noqa: ANN202
        finish = finish_component(recipe_uri=recipe_uri, runs_root=runs_root, run_id=run_id,
                                  kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        with dsl.ExitHandler(finish):
            broken_step()

    recipe, run_id = load_recipe(RECIPE), f"finish-kfp-{uuid.uuid4().hex[:8]}"
    parent = tracking.ensure_pipeline_run(recipe, run_id)
    with pytest.raises(RuntimeError):
        flow(recipe_uri=RECIPE, runs_root=RUNS, run_id=run_id)
    run = MlflowClient().get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["onevision.pipeline_state"] == "FAILED"
    assert "wall_s/pipeline" in run.data.metrics

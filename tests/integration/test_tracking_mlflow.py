"""MLflow against the real local server: runs, nesting, lineage, artifacts landing in S3."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from onevision import storage, tracking
from onevision.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_parent_and_step_runs_with_params_metrics_and_artifact(local_stack: object, tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    parent = tracking.ensure_pipeline_run(recipe, "it-run-1")
    assert tracking.ensure_pipeline_run(recipe, "it-run-1") == parent  # a resumed pipeline finds it again
    assert tracking.ensure_pipeline_run(recipe, "it-run-2") != parent

    note = tmp_path / "data_card.md"
    note.write_text("# data card\n")
    with tracking.step_run("curate", parent, params={"records": 128}) as run:
        mlflow.log_metric("kept", 120)
        mlflow.log_metric("kept", 121, step=1)
        mlflow.log_artifact(str(note))
        step_id = run.info.run_id

    client = MlflowClient()
    step = client.get_run(step_id)
    assert step.info.status == "FINISHED"
    assert step.data.tags["mlflow.parentRunId"] == parent
    assert step.data.tags[tracking.TAG_RECIPE_HASH] == recipe.hash()
    assert step.data.tags[tracking.TAG_STEP] == "curate"
    assert step.data.params["records"] == "128" and step.data.metrics["kept"] == 121
    parent_run = client.get_run(parent)
    assert parent_run.data.params["stages.stage2_si.max_steps"] == str(recipe.stages.stage2_si.max_steps)
    assert parent_run.data.tags[tracking.TAG_PIPELINE_RUN] == "it-run-1"

    # The artifact went through the MLflow server into the stack's S3 bucket.
    uris = storage.list_uris("s3://mlflow/artifacts")
    landed = [u for u in uris if step_id in u and u.endswith("data_card.md")]
    assert landed and storage.read_bytes(landed[0]) == b"# data card\n"


def test_failing_step_is_marked_failed(local_stack: object) -> None:
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    parent = tracking.ensure_pipeline_run(recipe, "it-run-fail")
    run_id = None
    try:
        with tracking.step_run("stage1", parent) as run:
            run_id = run.info.run_id
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert MlflowClient().get_run(run_id).info.status == "FAILED"

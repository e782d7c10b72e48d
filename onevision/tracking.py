"""MLflow helpers: one parent run per pipeline run, a nested run per step, recipe params, lineage tags.

    eval "$(onevision stack env)"        # MLFLOW_TRACKING_URI and the S3 settings of the local stack
    from onevision import tracking
    parent = tracking.ensure_pipeline_run(recipe, pipeline_run_id="local-20261129-1")
    with tracking.step_run("curate", parent, params={"records": 128}) as run:
        mlflow.log_metric("kept", 120)

Every pipeline step runs in its own process (a KFP pod), so the parent run is found again by its
`onevision.pipeline_run_id` tag rather than passed around as a live object; `ensure_pipeline_run` is
idempotent, and a resumed pipeline run logs into the same parent.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onevision.recipe import Recipe

TAG_PIPELINE_RUN = "onevision.pipeline_run_id"
TAG_RECIPE_HASH = "onevision.recipe_hash"
TAG_RECIPE_NAME = "onevision.recipe"
TAG_GIT_COMMIT = "onevision.git_commit"
TAG_DATA_MANIFEST = "onevision.data_manifest_hash"
TAG_STEP = "onevision.step"
MAX_PARAM_VALUE = 6000  # MLflow's limit on one param value


def flatten_params(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": [1, {"c": 2}]}} -> {"a.b.0": "1", "a.b.1.c": "2"}; None values are dropped."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        if tree is not None:
            value = json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)
            out[prefix] = value if len(value) <= MAX_PARAM_VALUE else value[: MAX_PARAM_VALUE - 3] + "..."
        return out
    for key, value in items:
        out.update(flatten_params(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str:
    """The commit the code runs from: ONEVISION_GIT_COMMIT (set in the image build) or `git rev-parse`."""
    if commit := os.environ.get("ONEVISION_GIT_COMMIT"):
        return commit
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                              capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lineage_tags(recipe: Recipe, pipeline_run_id: str, data_manifest_hash: str | None = None) -> dict[str, str]:
    """The tags that tie a run or model version back to its recipe, code, data and pipeline run."""
    tags = {
        TAG_RECIPE_NAME: recipe.name,
        TAG_RECIPE_HASH: recipe.hash(),
        TAG_GIT_COMMIT: git_commit(),
        TAG_PIPELINE_RUN: pipeline_run_id,
    }
    if data_manifest_hash:
        tags[TAG_DATA_MANIFEST] = data_manifest_hash
    return tags


def experiment_name(recipe: Recipe) -> str:
    return os.environ.get("ONEVISION_MLFLOW_EXPERIMENT", f"onevision-{recipe.name}")


def ensure_pipeline_run(recipe: Recipe, pipeline_run_id: str) -> str:
    """Return the id of the parent MLflow run of this pipeline run, creating it (with params) once."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = mlflow.set_experiment(experiment_name(recipe))
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_run_id}' and tags.`{TAG_STEP}` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment.experiment_id, run_name=pipeline_run_id,
                            tags={**lineage_tags(recipe, pipeline_run_id), TAG_STEP: "pipeline"})
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_params(flatten_params(recipe.model_dump(mode="json")))
    return run.info.run_id


@contextmanager
def step_run(step: str, parent_run_id: str, params: dict[str, Any] | None = None,
             tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A nested MLflow run for one pipeline step, under the pipeline's parent run.

    The step run inherits the parent's lineage tags; a failure inside marks the run FAILED.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    parent = MlflowClient().get_run(parent_run_id)
    inherited = {k: v for k, v in parent.data.tags.items() if k.startswith("onevision.") and k != TAG_STEP}
    with mlflow.start_run(run_name=step, experiment_id=parent.info.experiment_id,
                          parent_run_id=parent_run_id, nested=True,
                          tags={**inherited, **(tags or {}), TAG_STEP: step}) as run:
        if params:
            mlflow.log_params(flatten_params(params))
        yield run

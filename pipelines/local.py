"""Run the flow locally on a recipe, on the embedded local stack (what `make run` does).

    onevision run recipes/tiny.yaml [--run-id local-...]

Today this is the foundation slice of the pipeline: validate the recipe, bring up the local stack,
open the pipeline's parent MLflow run (params + lineage tags), and publish the resolved recipe to S3
under the run's prefix with a manifest. Steps join here as their components land.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from onevision import stack, storage, tracking
from onevision.recipe import dump_recipe, load_recipe


def new_run_id() -> str:
    return time.strftime("local-%Y%m%d-%H%M%S", time.gmtime())


def run_local(recipe_path: str, state_dir: str | None = None, run_id: str | None = None) -> dict[str, str]:
    """Run what exists of the flow; returns the run's ids and URIs."""
    import mlflow

    recipe = load_recipe(recipe_path)
    info = stack.stack_up(state_dir)
    os.environ.update(info.env())
    run_id = run_id or new_run_id()
    run_uri = f"s3://{stack.DATA_BUCKET}/runs/{recipe.name}/{run_id}"

    parent = tracking.ensure_pipeline_run(recipe, run_id)
    with tracking.step_run("recipe", parent, params={"recipe_path": recipe_path}):
        with tempfile.TemporaryDirectory() as tmp:
            resolved = Path(tmp, "recipe.yaml")
            resolved.write_text(dump_recipe(recipe))
            storage.publish_dir(tmp, f"{run_uri}/recipe", metadata={"recipe_hash": recipe.hash()})
            mlflow.log_artifact(str(resolved))

    print(f"recipe     {recipe.name} (hash {recipe.hash()[:12]}), stages: "
          f"{', '.join(name for name, _ in recipe.stages.enabled())}")
    print(f"run        {run_id}  ->  {run_uri}")
    print(f"MLflow     {info.mlflow_uri}/#/experiments (parent run {parent})")
    return {"run_id": run_id, "run_uri": run_uri, "mlflow_parent_run": parent}

"""`onevision run` (what `make run` calls) on the tiny recipe, against the session's local stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from onevision import storage, tracking
from onevision.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_onevision_run_tiny(local_stack) -> None:
    cli = Path(sys.executable).parent / "onevision"
    done = subprocess.run([str(cli), "run", "recipes/tiny.yaml", "--state-dir", local_stack.state_dir,
                           "--run-id", "e2e-1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "s3://onevision/runs/tiny/e2e-1" in done.stdout

    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    prefix = "s3://onevision/runs/tiny/e2e-1/recipe"
    manifest = storage.read_manifest(prefix)
    assert manifest["metadata"]["recipe_hash"] == recipe.hash()
    published = parse_recipe(yaml.safe_load(storage.read_bytes(f"{prefix}/recipe.yaml")))
    assert published.hash() == recipe.hash()

    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("onevision-tiny").experiment_id],
        filter_string=f"tags.`{tracking.TAG_PIPELINE_RUN}` = 'e2e-1'")
    steps = {r.data.tags[tracking.TAG_STEP]: r for r in runs}
    assert set(steps) == {"pipeline", "recipe"}
    assert steps["recipe"].data.tags["mlflow.parentRunId"] == steps["pipeline"].info.run_id
    assert steps["recipe"].info.status == "FINISHED"

"""The curate KFP component, run by kfp.local (a subprocess, as a pod would) against the local stack.

    pytest tests/integration/test_curate_component.py -q

The component reads its recipe from S3 and publishes under a fresh S3 prefix, as in a cluster where pods
share no filesystem. The tiny recipe's Stage-1 world is cut to 60 records to keep the test short. The
compile test checks that the component runs on the project image and installs nothing at run time.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from onevision import storage, tracking
from onevision.recipe import dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
SMALL_WORLD = "synthetic://shapes/captions?n=60"


def small_recipe(tmp_path: Path) -> Path:
    """The tiny recipe, resolved, with Stage-1 data cut to a 60-record synthetic world."""
    doc = yaml.safe_load(dump_recipe(load_recipe(ROOT / "recipes/tiny.yaml")))
    doc["stages"]["stage1"]["data"] = [{"dataset_uri": SMALL_WORLD, "sampling_strategy": "all"}]
    path = tmp_path / "tiny-small.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert load_recipe(path).stages.stage1.data[0].dataset_uri == SMALL_WORLD  # still a valid recipe
    return path


# kfp.local warns that a non-Python base_image may lack dependencies; here the subprocess is this venv.
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_curate_component_runs_locally_on_s3(local_stack: object, kfp_local: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from components.curate.component import curate

    prefix = f"s3://onevision/tests/curate-component/{uuid.uuid4().hex[:12]}"
    recipe_path = small_recipe(tmp_path)
    recipe_uri = f"{prefix}/recipe.yaml"
    storage.put_file(recipe_path, recipe_uri)
    out_uri = f"{prefix}/stage1"
    parent = tracking.ensure_pipeline_run(load_recipe(recipe_path), pipeline_run_id=f"test-{prefix[-12:]}")

    task = curate(recipe_uri=recipe_uri, stage="stage1", out_uri=out_uri, workers=1, mlflow_parent=parent)

    # Parameters: only the URI, the lineage key and counts cross KFP.
    assert task.outputs["shards_uri"] == out_uri
    assert task.outputs["kept"] > 0
    assert task.outputs["manifest_sha256"] == storage.manifest_hash(out_uri)

    # The data shards are in S3, published (manifest last), not in the pipeline root.
    manifest = storage.read_manifest(out_uri)
    assert any(name.startswith("shard-") and name.endswith(".tar") for name in manifest["files"])
    assert not list(kfp_local.rglob("shard-*.tar"))

    card = task.outputs["data_card"]
    assert Path(card.path).is_file() and Path(card.path).read_text().strip()
    assert Path(card.path).is_relative_to(kfp_local)
    assert card.metadata["uri"] == out_uri
    assert card.metadata["manifest_sha256"] == task.outputs["manifest_sha256"]

    metrics = task.outputs["metrics"].metadata
    assert metrics["kept"] == task.outputs["kept"]
    assert {"duplicates", "rejected"} <= set(metrics)

    # The core logged into a nested run under the given parent.
    client = MlflowClient()
    experiment_id = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert children and all(run.info.status == "FINISHED" for run in children)


def test_curate_component_compiles_for_the_project_image(compiled_component) -> None:
    from components.curate.component import curate

    doc = compiled_component(curate)
    component = doc["components"]["comp-curate"]
    assert set(component["inputDefinitions"]["parameters"]) == {
        "recipe_uri", "stage", "out_uri", "workers", "mlflow_parent"}
    outputs = component["outputDefinitions"]
    assert set(outputs["parameters"]) == {"shards_uri", "manifest_sha256", "kept"}
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs["artifacts"].items()} == {
        "data_card": "system.Markdown", "metrics": "system.Metrics"}

"""The curate KFP component, run by kfp.local (a subprocess, as a pod would) against the local stack.

    pytest tests/integration/test_curate_component.py -q

The component takes a stage's data recipe (JSON) and its content-addressed S3 prefix, as preflight pins
them, and publishes there, as in a cluster where pods share no filesystem; a second call (another run
with the same data) reuses what is published. The tiny recipe's Stage-1 world is cut to 60 records to keep the test short. The
compile test checks that the component runs on the project image and installs nothing at run time.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from onevision import storage
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
def test_curate_component_runs_locally_on_s3_and_a_second_run_reuses_it(local_stack: object, kfp_local: Path,
                                                                        tmp_path: Path) -> None:
    from components.curate.component import curate
    from components.curate.datarecipe import DataRecipe

    root = f"s3://onevision/tests/curate-component/{uuid.uuid4().hex[:12]}"
    data = DataRecipe.of(load_recipe(small_recipe(tmp_path)), "stage1")
    out_uri = data.curated_uri(root)  # what preflight pins for every run with this data recipe

    task = curate(data_recipe=data.to_json(), out_uri=out_uri, workers=1)

    # Parameters: only the URI, the lineage key and counts cross KFP.
    assert task.outputs["shards_uri"] == out_uri and out_uri.endswith(data.hash()[:16])
    assert task.outputs["kept"] > 0 and task.outputs["reused"] is False
    assert task.outputs["manifest_sha256"] == storage.manifest_hash(out_uri)

    # The data shards are in S3, published (manifest last), not in the pipeline root.
    manifest = storage.read_manifest(out_uri)
    assert any(name.startswith("shard-") and name.endswith(".tar") for name in manifest["files"])
    assert not list(kfp_local.rglob("shard-*.tar"))

    card = task.outputs["data_card"]
    assert Path(card.path).is_file() and Path(card.path).read_text().strip()
    assert Path(card.path).is_relative_to(kfp_local)
    assert card.metadata["uri"] == out_uri and card.metadata["data_recipe_hash"] == data.hash()
    assert card.metadata["manifest_sha256"] == task.outputs["manifest_sha256"]

    metrics = task.outputs["metrics"].metadata
    assert metrics["kept"] == task.outputs["kept"]
    assert {"duplicates", "rejected"} <= set(metrics)

    # Another pipeline run, same data recipe (another worker count too): the published stage is reused as it is
    again = curate(data_recipe=data.to_json(), out_uri=out_uri, workers=2)
    assert again.outputs["reused"] is True and again.outputs["kept"] == task.outputs["kept"]
    assert storage.read_manifest(out_uri)["created"] == manifest["created"]  # not republished


def test_curate_component_compiles_for_the_project_image(compiled_component) -> None:
    from components.curate.component import curate

    doc = compiled_component(curate)
    component = doc["components"]["comp-curate"]
    # nothing run-specific (run id, MLflow parent, pinned recipe URI): what makes KFP's cache hit across runs
    # (partition URIs are content-addressed too: <out_uri>-partitions/<p>-of-<n>)
    assert set(component["inputDefinitions"]["parameters"]) == {"data_recipe", "out_uri", "workers", "partition_uris"}
    outputs = component["outputDefinitions"]
    assert set(outputs["parameters"]) == {"shards_uri", "manifest_sha256", "kept", "reused"}
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs["artifacts"].items()} == {
        "data_card": "system.Markdown", "metrics": "system.Metrics"}


def test_curate_partition_component_compiles_for_the_project_image(compiled_component) -> None:
    from components.curate.component import curate_partition

    doc = compiled_component(curate_partition)
    component = doc["components"]["comp-curate-partition"]
    assert set(component["inputDefinitions"]["parameters"]) == {"data_recipe", "out_uri", "partition", "partitions",
                                                                 "workers"}
    assert set(component["outputDefinitions"]["parameters"]) == {"partition_uri", "records", "reused"}


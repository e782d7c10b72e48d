"""Preflight against the real local stack: a healthy stack passes and pins the recipe; each broken piece
is named (all of them at once), fast; a resumed run id must keep its recipe. Also the KFP component."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from components.preflight.core import PreflightError, run
from onevision import storage
from onevision.recipe import STAGE_NAMES
from tests.conftest import free_port_block

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes/tiny.yaml")


def test_a_healthy_stack_passes_and_pins_the_recipe(local_stack) -> None:
    run_id = f"pf-{uuid.uuid4().hex[:6]}"
    first = run(RECIPE, "s3://onevision/runs", run_id, {"stage1.lr": "0.002"})
    assert first["run_uri"] == f"s3://onevision/runs/tiny/{run_id}"
    pinned = storage.read_bytes(first["recipe_uri"]).decode()
    assert "lr: 0.002" in pinned
    again = run(RECIPE, "s3://onevision/runs", run_id, {"stage1.lr": "0.002"})  # a resumed run: same recipe
    assert again["mlflow_parent"] == first["mlflow_parent"]
    with pytest.raises(PreflightError, match="already exists with recipe hash"):
        run(RECIPE, "s3://onevision/runs", run_id, {"stage1.lr": "0.003"})
    assert not storage.list_uris("s3://onevision/runs/_preflight/")  # the probe object was removed


def test_each_stage_data_recipe_is_pinned_and_shared_by_runs_with_the_same_data(local_stack) -> None:
    from components.curate.datarecipe import DataRecipe

    first = run(RECIPE, "s3://onevision/runs", f"pf-{uuid.uuid4().hex[:6]}", {"stage1.lr": "0.002"})
    plan = first["data"]
    assert set(plan) == set(STAGE_NAMES)
    stage1 = DataRecipe.from_json(plan["stage1"]["data_recipe"])
    assert plan["stage1"]["data_uri"] == f"s3://onevision/curated/tiny/stage1/{stage1.hash()[:16]}"
    pinned = json.loads(storage.read_bytes(first["recipe_uri"].replace("recipe.yaml", "data.json")))
    assert pinned == plan
    # another run that changes training only: the same curated prefixes; a change to the data: a new one
    other_lr = run(RECIPE, "s3://onevision/runs", f"pf-{uuid.uuid4().hex[:6]}", {"stage1.lr": "0.005"})
    assert other_lr["data"] == plan
    other_seed = run(RECIPE, "s3://onevision/runs", f"pf-{uuid.uuid4().hex[:6]}", {"training.seed": "11"})
    assert all(other_seed["data"][s]["data_uri"] != plan[s]["data_uri"] for s in STAGE_NAMES)


def test_every_problem_is_named_at_once_and_fast(local_stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port_block(1)}")  # nothing listens
    started = time.monotonic()
    with pytest.raises(PreflightError) as err:
        run(RECIPE, "s3://no-such-bucket-pf/runs", "pf-broken")
    message = str(err.value)
    assert "bucket 'no-such-bucket-pf'" in message and "mlflow: MLflow tracking server http://127.0.0.1:" in message
    assert "is not reachable" in message
    assert time.monotonic() - started < 30


def test_missing_credentials_and_a_missing_input_are_named(local_stack, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    import yaml

    doc = yaml.safe_load(Path(RECIPE).read_text())
    prefix = f"s3://onevision/pf-{uuid.uuid4().hex[:6]}"
    storage.write_bytes(f"{prefix}/data.jsonl", b"")
    storage.write_bytes(f"{prefix}/media/a.png", b"x")
    storage.write_bytes(f"{prefix}/pq/readme.txt", b"no parquet here")
    doc["stages"]["stage1"]["data"] = [{"json_path": "s3://onevision/pf-missing/data.json", "media_root": None}]
    doc["stages"]["stage2_si"]["data"] = [
        {"json_path": f"{prefix}/data.jsonl", "media_root": f"{prefix}/media"},  # both exist: not named
        {"json_path": f"{prefix}/data.jsonl", "media_root": f"{prefix}/no-media"},
        {"json_path": f"{prefix}/data.jsonl", "media_root": f"{prefix}/media.tar"},
        {"dataset_uri": f"{prefix}/pq"}, {"json_path": "s3://no-such-bucket-pf/data.json"}]
    broken = tmp_path / "tiny.yaml"
    broken.write_text(yaml.safe_dump(doc))
    with pytest.raises(PreflightError) as err:
        run(str(broken), "s3://onevision/runs", "pf-input")
    data = [line.strip() for line in str(err.value).splitlines() if line.strip().startswith("data: ")]
    assert data == [  # one error, every missing input named with its stage and source
        "data: stage1 source 1 (s3://onevision/pf-missing/data.json): json_path s3://onevision/pf-missing/data.json "
        "does not exist",
        f"data: stage2_si source 2 ({prefix}/data.jsonl): media_root {prefix}/no-media does not exist (a media "
        "folder, or an S3 prefix with objects under it)",
        f"data: stage2_si source 3 ({prefix}/data.jsonl): media_root {prefix}/media.tar does not exist",
        f"data: stage2_si source 4 ({prefix}/pq): dataset_uri {prefix}/pq holds no .parquet files",
        "data: stage2_si source 5 (s3://no-such-bucket-pf/data.json): json_path s3://no-such-bucket-pf/data.json "
        "does not exist"]
    assert not storage.list_uris("s3://onevision/runs/tiny/pf-input/")  # nothing was pinned
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(PreflightError, match="AWS_SECRET_ACCESS_KEY is not set"):
        run(RECIPE, "s3://onevision/runs", "pf-creds")


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_the_component_under_kfp_local(local_stack, kfp_local: Path, compiled_component) -> None:
    from components.preflight.component import preflight

    task = preflight(recipe_uri=RECIPE, runs_root="s3://onevision/runs", data_root="s3://onevision/curated-test",
                     run_id="", kfp_run_id="kfp-uuid-1", overrides={"training.seed": "5"})
    assert task.outputs["run_id"] == "kfp-uuid-1"  # an empty run_id takes the KFP run's id
    assert task.outputs["run_uri"] == "s3://onevision/runs/tiny/kfp-uuid-1"
    assert "seed: 5" in storage.read_bytes(task.outputs["recipe_uri"]).decode()
    assert task.outputs["stage2_ov_data_uri"].startswith("s3://onevision/curated-test/tiny/stage2_ov/")
    assert '"stage":"stage2_ov"' in task.outputs["stage2_ov_data_recipe"]
    assert "comp-preflight" in compiled_component(preflight)["components"]

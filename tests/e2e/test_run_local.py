"""`onevision run recipes/tiny.yaml` (what `make run` calls), once, against the session's local stack.

It curates, trains the four stages (each `python -m model.train` in its own process, as in a pod),
and evaluates with lmms-eval after Stage-2 SI and OV (offline shapes tasks). Checked here: what landed in
S3 and MLflow, that every stage lowered its held-out loss, and that the model learned: the gate passes,
colour short answers >= 80% after the four stages, near chance after Stage-1 alone (`pytest -s` prints
the scores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from onevision import storage, tracking
from onevision.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RUN = "e2e-1"
PREFIX = f"s3://onevision/runs/tiny/{RUN}"
STAGES = ("stage1", "stage1_5", "stage2_si", "stage2_ov")


def run_cli(local_stack) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "onevision"
    return subprocess.run([str(cli), "run", "recipes/tiny.yaml", "--state-dir", local_stack.state_dir,
                           "--run-id", RUN], cwd=ROOT, capture_output=True, text=True, timeout=3600)


@pytest.fixture(scope="module")
def flow(local_stack) -> subprocess.CompletedProcess:
    done = run_cli(local_stack)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    print(done.stdout)
    return done


def test_everything_landed_in_s3(flow) -> None:
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    assert storage.read_manifest(f"{PREFIX}/recipe")["metadata"]["recipe_hash"] == recipe.hash()
    for stage in STAGES:
        assert storage.read_manifest(f"{PREFIX}/curate/{stage}")["metadata"]["kept"] > 0
        hf = storage.read_manifest(f"{PREFIX}/{stage}/hf")
        assert {"config.json", "model.safetensors", "processor_config.json"} <= set(hf["files"])
        meta = hf["metadata"]
        assert meta["eval_loss_after"] < meta["eval_loss_before"], stage
        print(f"{stage}: held-out loss {meta['eval_loss_before']:.3f} -> {meta['eval_loss_after']:.3f}")


def test_mlflow_has_the_run_tree_and_training_metrics(flow) -> None:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("onevision-tiny")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{tracking.TAG_PIPELINE_RUN}` = '{RUN}'")
    by_step = {r.data.tags[tracking.TAG_STEP]: r for r in runs}
    expected = {"pipeline", "recipe", "evaluate_stage2_si", "evaluate_stage2_ov", *STAGES,
                *(f"curate_{s}" for s in STAGES)}
    assert expected <= set(by_step), sorted(by_step)
    parent = by_step["pipeline"].info.run_id
    for stage in STAGES:
        run = by_step[stage]
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["onevision.checkpoint_uri"] == f"{PREFIX}/{stage}/hf"
        assert run.data.params["stage.lr"] == str(getattr(load_recipe(ROOT / "recipes/tiny.yaml").stages, stage).lr)
        history = client.get_metric_history(run.info.run_id, "loss")
        assert len(history) == getattr(load_recipe(ROOT / "recipes/tiny.yaml").stages, stage).max_steps
        for key in ("grad_norm", "samples_per_s", "tokens_per_s", "mfu", "peak_memory_gb", "lr_rest"):
            assert key in run.data.metrics, (stage, key)
        assert 0 < run.data.metrics["mfu"] < 1
    assert "lr_vision_tower" in by_step["stage2_si"].data.metrics
    assert "lr_vision_tower" not in by_step["stage1"].data.metrics


def test_the_model_learned(flow) -> None:
    """Scores through lmms-eval (offline shapes tasks) after Stage-2 SI and OV; Stage-1 alone for contrast."""
    from components.curate.core import synthetic_world
    from model.builder import load_pretrained
    from model.generation import score_by_task

    evaluated = {stage: storage.read_manifest(f"{PREFIX}/evaluate/{stage}")["metadata"] for stage in ("stage2_si", "stage2_ov")}
    results = json.loads(storage.read_bytes(f"{PREFIX}/evaluate/stage2_ov/results.json"))
    assert results["n-samples"]["shapes_color"]["effective"] == 64
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    import tempfile

    world, _ = synthetic_world("synthetic://shapes/captions", Path(tempfile.mkdtemp()), recipe.training.seed)
    records = json.loads((world / "eval_color.json").read_text())
    model, processor = load_pretrained(f"{PREFIX}/stage1/hf")
    stage1 = score_by_task(model, processor, records, world)["color"]
    print("\nlmms-eval exact match (after stage2_si | after stage2_ov)")
    for key in evaluated["stage2_ov"]:
        if "/" in key:
            print(f"  {key:32s} {evaluated['stage2_si'][key]:.2f} | {evaluated['stage2_ov'][key]:.2f}")
    print(f"  colour after stage1 alone: {stage1['accuracy']:.2f} (chance {stage1['chance']:.2f})")
    assert evaluated["stage2_si"]["gate_passed"] and evaluated["stage2_ov"]["gate_passed"]
    assert evaluated["stage2_ov"]["shapes_color/exact_match"] >= 0.8
    assert stage1["accuracy"] <= stage1["chance"] + 0.15


def test_rerunning_the_same_run_id_resumes_without_retraining(flow, local_stack) -> None:
    started = time.monotonic()
    again = run_cli(local_stack)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "curate " not in again.stdout  # every step found its published output
    assert time.monotonic() - started < 300

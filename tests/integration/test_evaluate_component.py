"""The evaluate KFP component, run by kfp.local (a subprocess, as a pod would) against the local stack.

    pytest tests/integration/test_evaluate_component.py -q

The component reads its recipe and a model from S3 and publishes under a fresh S3 prefix, as in a cluster
where pods share no filesystem. The model is the tiny recipe's, randomly initialised: it scores ~0, below
the gate, which is an output (passed=False), not a failure. The tiny recipe's tasks are cut to 8 samples
each to keep the run to about a minute. The compile tests check that the component runs on the project
image, installs nothing at run time, and that a pipeline can branch on its `passed` output.

No `from __future__ import annotations` here: the branch test defines a component and a pipeline, and KFP
reads their real annotation objects (string annotations fail with "Artifacts must have both a schema_title").
"""

import json
import uuid
from pathlib import Path

import pytest
import yaml

from components import PROJECT_IMAGE
from onevision import storage, tracking
from onevision.recipe import dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 8


def small_recipe(tmp_path: Path) -> Path:
    """The tiny recipe, resolved, with every evaluation task (same names and gates) cut to LIMIT samples."""
    doc = yaml.safe_load(dump_recipe(load_recipe(ROOT / "recipes/tiny.yaml")))
    for task in doc["evaluation"]["tasks"]:
        task["limit"] = LIMIT
    path = tmp_path / "tiny-small-eval.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert {t.limit for t in load_recipe(path).evaluation.tasks} == {LIMIT}  # still a valid recipe
    return path


def random_model(recipe_path: Path, tmp_path: Path, uri: str) -> str:
    """The tiny recipe's model, randomly initialised, published as an HF folder under uri."""
    from model.builder import build_tiny

    model, processor = build_tiny(load_recipe(recipe_path))
    folder = tmp_path / "random-model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    storage.publish_dir(folder, uri)
    return uri


# kfp.local warns that a non-Python base_image may lack dependencies; here the subprocess is this venv.
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_evaluate_component_gates_a_random_model_on_s3(local_stack: object, kfp_local: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from components.evaluate.component import evaluate

    monkeypatch.setenv("ONEVISION_CACHE", str(tmp_path / "cache"))  # the S3 model's download cache
    prefix = f"s3://onevision/tests/evaluate-component/{uuid.uuid4().hex[:12]}"
    recipe_path = small_recipe(tmp_path)
    recipe_uri = f"{prefix}/recipe.yaml"
    storage.put_file(recipe_path, recipe_uri)
    model_uri = random_model(recipe_path, tmp_path, f"{prefix}/model")
    out_uri = f"{prefix}/evaluate/stage2_ov"
    parent = tracking.ensure_pipeline_run(load_recipe(recipe_path), pipeline_run_id=f"test-{prefix[-12:]}")
    tasks = load_recipe(recipe_path).evaluation.tasks

    task = evaluate(recipe_uri=recipe_uri, stage="stage2_ov", model_uri=model_uri, out_uri=out_uri,
                    mlflow_parent=parent)

    # The gate failed, and that is an output the DAG branches on, not a task failure.
    assert task.outputs["passed"] is False
    reasons = json.loads(task.outputs["reasons"])
    assert isinstance(reasons, list) and any("shapes_color" in r for r in reasons)
    assert task.outputs["results_uri"] == out_uri

    # The results are in S3, published (manifest last), not in the pipeline root.
    manifest = storage.read_manifest(out_uri)
    assert {"results.json", "comparison.md", "gate.json", "lmms_eval.log"} <= set(manifest["files"])
    assert {f"samples_{t.name}.jsonl" for t in tasks} <= set(manifest["files"])
    gate = json.loads(storage.read_bytes(f"{out_uri}/gate.json"))
    assert gate["passed"] is False and gate["reasons"] == reasons
    assert not list(kfp_local.rglob("results.json"))

    comparison = task.outputs["comparison"]
    text = Path(comparison.path).read_text()
    assert Path(comparison.path).is_relative_to(kfp_local)
    assert "shapes_color" in text and "Gate: **failed**" in text
    assert comparison.metadata == {"uri": out_uri, "stage": "stage2_ov", "model_uri": model_uri}

    metrics = task.outputs["metrics"].metadata
    assert set(metrics) == {f"{t.name}/{t.metric}" for t in tasks}  # one score per task
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["shapes_color/exact_match"] < 0.5  # below the tiny recipe's threshold

    # The core logged into a nested run under the given parent.
    client = MlflowClient()
    experiment_id = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert children and all(run.info.status == "FINISHED" for run in children)
    assert any("shapes_color/exact_match" in run.data.metrics for run in children)



@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_untrustworthy_scores_fail_the_task(local_stack: object, kfp_local: Path, tmp_path: Path,
                                            capfd: pytest.CaptureFixture) -> None:
    """An EvaluationError (here: a task lmms-eval does not know) fails the task; nothing is published.

    lmms-eval rejects the task before it loads the model, so no model is built: any unknown task or unloadable
    model ends in the same EvaluationError."""
    from components.evaluate.component import evaluate

    prefix = f"s3://onevision/tests/evaluate-component/{uuid.uuid4().hex[:12]}"
    recipe_path = small_recipe(tmp_path)
    model_uri = str(tmp_path / "no-model")
    doc = yaml.safe_load(recipe_path.read_text())
    doc["evaluation"]["tasks"] = [{"name": "no_such_task", "metric": "exact_match", "limit": 1}]
    recipe_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    recipe_uri = f"{prefix}/recipe.yaml"
    storage.put_file(recipe_path, recipe_uri)
    out_uri = f"{prefix}/evaluate/stage2_ov"

    with pytest.raises(RuntimeError, match="FAILURE"):
        evaluate(recipe_uri=recipe_uri, stage="stage2_ov", model_uri=model_uri, out_uri=out_uri, mlflow_parent="")
    captured = capfd.readouterr()  # kfp.local streams the task's output
    assert "EvaluationError" in captured.out + captured.err  # the core's error, not another one
    assert not storage.exists(storage.join(out_uri, storage.MANIFEST_NAME))

def test_evaluate_component_compiles_for_the_project_image(compiled_component) -> None:
    from components.evaluate.component import evaluate

    doc = compiled_component(evaluate)
    component = doc["components"]["comp-evaluate"]
    assert set(component["inputDefinitions"]["parameters"]) == {
        "recipe_uri", "stage", "model_uri", "out_uri", "mlflow_parent"}
    outputs = component["outputDefinitions"]
    assert {k: v["parameterType"] for k, v in outputs["parameters"].items()} == {
        "passed": "BOOLEAN", "reasons": "STRING", "results_uri": "STRING"}
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs["artifacts"].items()} == {
        "comparison": "system.Markdown", "metrics": "system.Metrics"}


def test_a_pipeline_can_branch_on_the_gate(tmp_path: Path) -> None:
    from google.protobuf import json_format
    from kfp import compiler, dsl
    from kfp.pipeline_spec import pipeline_spec_pb2

    from components.evaluate.component import evaluate

    @dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
    def promote(results_uri: str) -> str:
        return results_uri

    @dsl.pipeline(name="gate-branch")
    def flow(recipe_uri: str, model_uri: str, out_uri: str, mlflow_parent: str = "") -> None:
        ev = evaluate(recipe_uri=recipe_uri, stage="stage2_ov", model_uri=model_uri, out_uri=out_uri,
                      mlflow_parent=mlflow_parent)
        with dsl.If(ev.outputs["passed"] == True):  # a KFP condition, compiled, not evaluated here
            promote(results_uri=ev.outputs["results_uri"])

    path = tmp_path / "flow.yaml"
    compiler.Compiler().compile(flow, str(path))
    doc = yaml.safe_load(path.read_text())
    json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())
    conditions = [t["triggerPolicy"]["condition"] for c in doc["components"].values()
                  for t in c.get("dag", {}).get("tasks", {}).values() if "triggerPolicy" in t]
    conditions += [t["triggerPolicy"]["condition"] for t in doc["root"]["dag"]["tasks"].values()
                   if "triggerPolicy" in t]
    assert any("pipelinechannel--evaluate-passed" in c for c in conditions)

"""Run the flow locally on a recipe, on the embedded local stack (what `make run` does).

    onevision run recipes/tiny.yaml [--run-id local-...]      # ~8 minutes on 2 CPU cores for tiny

Steps, each a nested MLflow run under the pipeline's parent run, each reading and writing S3 URIs under
`s3://onevision/runs/<recipe>/<run id>/`:
  recipe    the resolved recipe, published
  curate    per stage: the mixture sampled, validated, deduplicated and sharded; quarantine + data card
  stage*    per stage: `python -m model.train` in its own process, as a pipeline pod runs it; resumable
  evaluate  after the recipe's `evaluation.after_stages`: lmms-eval on the stage's checkpoint, gated
A run id that already exists resumes: finished steps are skipped, an interrupted stage continues.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from onevision import stack, storage, tracking
from onevision.recipe import Recipe, dump_recipe, load_recipe


def new_run_id() -> str:
    return time.strftime("local-%Y%m%d-%H%M%S", time.gmtime())


def _publish_recipe(recipe: Recipe, run_uri: str) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp, "recipe.yaml")
        resolved.write_text(dump_recipe(recipe))
        storage.publish_dir(tmp, f"{run_uri}/recipe", metadata={"recipe_hash": recipe.hash()})
        mlflow.log_artifact(str(resolved))


def _done(uri: str) -> dict[str, Any] | None:
    try:
        return storage.read_manifest(uri)["metadata"]
    except storage.ManifestMissingError:
        return None


def _train(recipe_path: str, stage: str, data: str, out: str, init: str | None, parent: str, work: Path) -> None:
    cmd = [sys.executable, "-m", "model.train", "--recipe", recipe_path, "--stage", stage, "--data", data,
           "--out", out, "--work-dir", str(work / stage), "--mlflow-parent", parent]
    if init:
        cmd += ["--init", init]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{stage}: training failed (exit {done.returncode}); rerun with the same --run-id to resume")


def _evaluate(recipe_path: str, stage: str, model_uri: str, out: str, parent: str, work: Path) -> dict[str, Any]:
    """lmms-eval on the stage's checkpoint (components/evaluate); a published result is not redone."""
    from components.evaluate.core import run as evaluate_run

    done = _done(out)
    if done is None:
        report = evaluate_run(str(Path(recipe_path).absolute()), stage, model_uri, out, mlflow_parent=parent,
                              work_dir=str(work / f"evaluate-{stage}"))
        done = _done(out)
        print(report["comparison_markdown"], flush=True)
    scores = {k: v for k, v in done.items() if "/" in k}
    print(f"evaluate   {stage}: gate {'passed' if done['gate_passed'] else 'FAILED'}  "
          + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)
    return {"gate_passed": done["gate_passed"], "scores": scores}


def run_local(recipe_path: str, state_dir: str | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Run the flow; returns the run's ids, URIs and the evaluations (gate, scores) per evaluated stage."""
    from components.curate.core import run as curate_run

    recipe = load_recipe(recipe_path)
    info = stack.stack_up(state_dir)
    os.environ.update(info.env())
    run_id = run_id or new_run_id()
    run_uri = f"s3://{stack.DATA_BUCKET}/runs/{recipe.name}/{run_id}"
    # scratch only: everything that must survive (and lets a rerun resume) is in S3
    work = Path(tempfile.mkdtemp(prefix=f"onevision-{recipe.name}-{run_id}-"))
    parent = tracking.ensure_pipeline_run(recipe, run_id)
    os.environ["ONEVISION_PIPELINE_RUN_ID"] = run_id
    print(f"run        {run_id}  ->  {run_uri}\nMLflow     {info.mlflow_uri} (parent run {parent})", flush=True)

    if _done(f"{run_uri}/recipe") is None:
        with tracking.step_run("recipe", parent, params={"recipe_path": recipe_path}):
            _publish_recipe(recipe, run_uri)
    init = None
    evaluations: dict[str, dict[str, Any]] = {}
    for name, _ in recipe.stages.enabled():
        data = f"{run_uri}/curate/{name}"
        if _done(data) is None:
            summary = curate_run(str(Path(recipe_path).absolute()), name, data, mlflow_parent=parent, work_dir=str(work / "curate"))
            totals = summary["totals"]
            print(f"curate     {name}: {totals['kept']} kept, {totals['duplicates']} duplicates, "
                  f"{totals['rejected']} rejected ({summary['records_per_s']:.0f} records/s)", flush=True)
        out = f"{run_uri}/{name}"
        if _done(f"{out}/hf") is None:
            _train(str(Path(recipe_path).absolute()), name, data, out, init, parent, work)
        print(f"train      {name}: {json.dumps(_done(f'{out}/hf'), default=str)}", flush=True)
        init = f"{out}/hf"
        if name in recipe.evaluation.after_stages:
            evaluations[name] = _evaluate(recipe_path, name, init, f"{run_uri}/evaluate/{name}", parent, work)

    return {"run_id": run_id, "run_uri": run_uri, "mlflow_parent_run": parent, "model_uri": init,
            "evaluations": evaluations}

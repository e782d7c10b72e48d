"""The evaluate step as a KFP v2 component: a thin wrapper over `components.evaluate.core.run`.

    from kfp import dsl
    from components.evaluate.component import evaluate

    @dsl.pipeline
    def flow(recipe_uri: str, model_uri: str, eval_uri: str, mlflow_parent: str = ""):
        ev = evaluate(recipe_uri=recipe_uri, stage="stage2_ov", model_uri=model_uri, out_uri=eval_uri,
                      mlflow_parent=mlflow_parent)
        with dsl.If(ev.outputs["passed"] == True):  # a KFP condition, compiled, not evaluated here
            ...                                      # register / deploy
        ev.outputs["reasons"]       # JSON list of the gate's reasons ("[]" when it passed)
        ev.outputs["results_uri"]   # s3://... prefix: results.json, comparison.md, gate.json, samples_*.jsonl
        ev.outputs["comparison"]    # Markdown artifact: ours vs the paper vs the champion, in the KFP UI
        ev.outputs["metrics"]       # Metrics artifact: one scalar per "<task>/<metric>"

Locally: `kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False))`, then call `evaluate(...)`.

A gate that fails is an output (`passed=False`, with `reasons`), not a task failure: the pipeline branches
on it. Scores that cannot be trusted (lmms-eval failed, a task missing or scored on 0 samples) raise the
core's EvaluationError, which fails the task. The results are published by the core under `out_uri`
(objects first, manifest last); only that URI, the verdict and the small comparison table cross KFP.
The metric names are the core's "<task>/<metric>" keys, as in MLflow: KFP v2 keeps a Metrics artifact's
scalars as free-form metadata keys and accepts the slash. `mlflow_parent=""` means no MLflow.

The function body imports what it needs itself (KFP ships only the function's source to the pod), and
installs nothing (`install_kfp_package=False`, no packages_to_install): the project image (PROJECT_IMAGE)
already holds the code, lmms-eval and kfp. No `from __future__ import annotations` here: KFP reads the
real annotation objects to build the component's interface.
"""

from typing import NamedTuple

from kfp import dsl

from components import PROJECT_IMAGE


# install_kfp_package=False: with only base_image, KFP still prepends `pip install kfp==<version>` to the
# command; the project image already has kfp (and everything else) installed.
@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def evaluate(
    recipe_uri: str,
    stage: str,
    model_uri: str,
    out_uri: str,
    mlflow_parent: str,
    comparison: dsl.Output[dsl.Markdown],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("Outputs", [("passed", bool), ("reasons", str), ("results_uri", str)]):
    """Evaluate the model trained through `stage` on the recipe's tasks, gate it, publish under out_uri."""
    import json
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from components.evaluate.core import run

    # EvaluationError propagates: untrustworthy scores fail the task; a failed gate does not.
    with tempfile.TemporaryDirectory(prefix="evaluate-") as scratch:  # the world, lmms-eval output: published
        report = run(recipe_uri, stage, model_uri, out_uri, mlflow_parent=mlflow_parent or None, work_dir=scratch)

    Path(comparison.path).parent.mkdir(parents=True, exist_ok=True)
    Path(comparison.path).write_text(report["comparison_markdown"], encoding="utf-8")
    comparison.metadata.update({"uri": report["uri"], "stage": stage, "model_uri": model_uri})
    for name, value in report["scores"].items():  # Metrics metadata holds only numbers (the UI's scalars)
        metrics.log_metric(name, float(value))

    outputs = namedtuple("Outputs", ["passed", "reasons", "results_uri"])
    return outputs(bool(report["gate"]["passed"]), json.dumps(list(report["gate"]["reasons"])), report["uri"])


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def stop_on_failed_gate(stage: str, reasons: str, results_uri: str):
    """The Else branch of the gate: fail the run, naming why, before anything is registered or deployed."""
    import json

    listed = "; ".join(json.loads(reasons)) or "no reason recorded"
    raise RuntimeError(f"evaluation gate failed after {stage}: {listed}. Nothing was registered or deployed; "
                       f"results: {results_uri}")

"""The pipeline's exit handler: end the parent MLflow run of a pipeline run with what the run produced.

    python -m components.finish.core --recipe recipes/tiny.yaml --run-id local-20261203-101500 --state SUCCEEDED

KFP runs it after every other task of the run, whatever happened to them (`dsl.ExitHandler` in
pipelines/onevision.py), and hands it the DAG's final state (`dsl.PipelineTaskFinalStatus`). It:
- puts the run's summary on the parent run: records kept per stage (the curated stages' manifests), train and
  held-out loss per stage and the evaluation scores and gate (the steps' nested runs), wall seconds per step
  (each nested run's start to end) and of the whole pipeline run;
- draws the timeline, one bar per step on the run's time axis, as the parent's artifact `timeline.png`;
- ends the parent at its real end time: FINISHED when the DAG succeeded, KILLED when it was cancelled,
  FAILED otherwise (a failed gate stops the DAG, so it is FAILED too).
The parent is opened by preflight (tracking.ensure_pipeline_run) and stays RUNNING until then; a resumed run
(the same run id) reopens the same parent, and this step ends it again with the summary of both attempts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from onevision import storage, tracking
from onevision.recipe import STAGE_NAMES, load_recipe
from onevision.cli_exit import run_command

# dsl.PipelineTaskFinalStatus.state -> MLflow run status (KFP says CANCELED; kfp.local and Vertex CANCELLED)
RUN_STATUS = {"SUCCEEDED": "FINISHED", "CANCELED": "KILLED", "CANCELLED": "KILLED"}


def curated_uris(run_uri: str) -> dict[str, str]:
    """{stage: its curated data's prefix}, as preflight pinned them for the run ({} before preflight)."""
    try:
        plan = json.loads(storage.read_bytes(storage.join(run_uri, "recipe", "data.json")))
    except storage.StorageNotFoundError:
        return {}
    return {stage: entry["data_uri"] for stage, entry in plan.items()}


def records_kept(run_uri: str) -> dict[str, int]:
    """{stage: records kept} of every curated stage of the run that was published."""
    kept = {}
    for stage, uri in curated_uris(run_uri).items():
        try:
            kept[stage] = int(storage.read_manifest(uri)["metadata"]["kept"])
        except (storage.ManifestMissingError, KeyError):
            continue
    return kept


def step_runs(client: Any, parent: Any) -> list[Any]:
    """The parent's nested runs (one per tracked step: preflight, the stages, the evaluations), oldest first."""
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def summary_metrics(steps: list[Any], kept: dict[str, int], started_ms: int, ended_ms: int) -> dict[str, float]:
    """The parent's metrics: records_kept/<stage>, train_loss/<stage>, heldout_loss/<stage>,
    eval/<stage>/<score>, gate_passed/<stage>, wall_s/<step>, wall_s/pipeline."""
    metrics: dict[str, float] = {f"records_kept/{stage}": float(n) for stage, n in kept.items()}
    for run in steps:
        step, values = run.data.tags.get(tracking.TAG_STEP, run.info.run_name), run.data.metrics
        if run.info.start_time is not None and run.info.end_time is not None:
            metrics[f"wall_s/{step}"] = metrics.get(f"wall_s/{step}", 0.0) + (run.info.end_time - run.info.start_time) / 1000
        if step in STAGE_NAMES:
            for name, key in (("train_loss", "train_loss"), ("heldout_loss", "eval_loss_after")):
                if key in values:
                    metrics[f"{name}/{step}"] = values[key]
        elif step.startswith("evaluate_"):
            stage = step.removeprefix("evaluate_")
            for key, value in values.items():
                metrics[f"gate_passed/{stage}" if key == "gate_passed" else f"eval/{stage}/{key}"] = value
    metrics["wall_s/pipeline"] = (ended_ms - started_ms) / 1000
    return metrics


def draw_timeline(steps: list[Any], started_ms: int, ended_ms: int, path: Path, title: str) -> Path:
    """One horizontal bar per step run on the pipeline run's time axis (seconds since it started)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"FINISHED": "tab:green", "FAILED": "tab:red", "KILLED": "tab:orange"}
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(len(steps), 1) + 1.4))
    for row, run in enumerate(steps):
        start = (run.info.start_time - started_ms) / 1000
        end = ((run.info.end_time or ended_ms) - started_ms) / 1000  # a step still RUNNING: to the run's end
        ax.barh(row, max(end - start, 0.5), left=start, color=colors.get(run.info.status, "tab:gray"))
        ax.text(end, row, f" {end - start:.0f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(steps)), [r.data.tags.get(tracking.TAG_STEP, r.info.run_name) for r in steps])
    ax.invert_yaxis()  # first step on top
    ax.set_xlim(0, max((ended_ms - started_ms) / 1000 * 1.12, 1))
    ax.set_xlabel("seconds since the pipeline run started")
    ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.2, right=0.97, bottom=0.6 / fig.get_figheight() + 0.05, top=1 - 0.5 / fig.get_figheight())
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finish_pipeline_run(recipe_uri: str, runs_root: str, run_id: str, state: str) -> dict[str, Any]:
    """End the pipeline run's parent MLflow run with its summary and timeline; returns what was logged
    ({} when there is no parent: preflight failed before opening it)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    recipe = load_recipe(recipe_uri)
    tracking.check_server()
    client = MlflowClient()
    parent = tracking.pipeline_parent(client, recipe, run_id)
    if parent is None:
        print(f"[finish] run {run_id}: no parent MLflow run (preflight did not get that far); nothing to end",
              flush=True)
        return {}
    ended_ms = int(time.time() * 1000)
    steps = step_runs(client, parent)
    metrics = summary_metrics(steps, records_kept(storage.join(runs_root, recipe.name, run_id)),
                              parent.info.start_time, ended_ms)
    rows = [Metric(key, value, ended_ms, 0) for key, value in sorted(metrics.items())]
    for i in range(0, len(rows), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(parent.info.run_id, metrics=rows[i:i + 1000])
    status = RUN_STATUS.get(state.upper(), "FAILED")
    with tempfile.TemporaryDirectory(prefix="finish-") as tmp:
        figure = draw_timeline(steps, parent.info.start_time, ended_ms, Path(tmp) / "timeline.png",
                               f"{recipe.name} run {run_id}: {state.lower()} in {metrics['wall_s/pipeline']:.0f} s")
        client.log_artifact(parent.info.run_id, str(figure))
    client.set_tag(parent.info.run_id, "onevision.pipeline_state", state)
    client.set_terminated(parent.info.run_id, status, end_time=ended_ms)
    print(f"[finish] run {run_id}: {state} -> MLflow parent {parent.info.run_id} {status} after "
          f"{metrics['wall_s/pipeline']:.0f} s ({len(steps)} step runs, {len(metrics)} metrics)", flush=True)
    return {"parent": parent.info.run_id, "status": status, "metrics": metrics, "steps": len(steps)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="the run's recipe (path or s3://)")
    parser.add_argument("--runs-root", default="s3://onevision/runs", help="prefix of the run outputs")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--state", default="SUCCEEDED", help="the DAG's final state: SUCCEEDED, FAILED, CANCELED")
    args = parser.parse_args(argv)
    try:
        finish_pipeline_run(args.recipe, args.runs_root, args.run_id, args.state)
    except (tracking.TrackingError, storage.StorageError) as err:
        print(f"finish: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(run_command("finish", main))

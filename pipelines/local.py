"""Run the pipeline DAG locally with kfp.local on the embedded stack (what `make run` does).

    onevision run --recipe recipes/tiny.yaml [--run-id local-...]     # ~10 minutes on 2 CPU cores for tiny

The same DAG as on a cluster (pipelines/onevision.py), executed by `kfp.local.SubprocessRunner`: each
task is a subprocess of this interpreter, in topological order; kfp-kubernetes placement, resources and
retries have no effect locally. Outputs go to `s3://onevision/runs/<recipe>/<run id>/` on the local stack,
curated data to `s3://onevision/curated/<recipe>/<stage>/<data recipe hash>/` (a second run with the same
data reuses it),
the MLflow run tree to the local MLflow, the deploy step's branch to a bare GitOps repository in the
stack's state folder. A run id that already exists resumes: each step finds its published output (or
the newest complete checkpoint) and skips (or continues); nothing finished is redone.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.finish.core import curated_uris
from onevision import stack, storage, tracking
from onevision.recipe import load_recipe
from pipelines.console import TaskConsole

RUNS_ROOT = f"s3://{stack.DATA_BUCKET}/runs"
DATA_ROOT = f"s3://{stack.DATA_BUCKET}/curated"  # content-addressed curated data, shared by runs


class PipelineFailed(RuntimeError):
    """The local DAG stopped; the message names the failed step and how to resume."""


def new_run_id() -> str:
    return time.strftime("local-%Y%m%d-%H%M%S", time.gmtime())


def local_gitops_repo(state_dir: Path) -> str:
    """A bare git repository standing in for the GitOps repo (the deploy step pushes a branch to it)."""
    repo = state_dir / "gitops.git"
    if not (repo / "HEAD").exists():
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(repo)], check=True)
    return str(repo)


def _metadata(uri: str) -> dict[str, Any] | None:
    try:
        return storage.read_manifest(uri)["metadata"]
    except storage.ManifestMissingError:
        return None


def run_summary(recipe_path: str, run_uri: str, run_id: str, mlflow_ui: str) -> dict[str, Any]:
    """What a run produced, read back from S3 and MLflow (so it also describes a resumed run)."""
    from mlflow.tracking import MlflowClient

    recipe = load_recipe(recipe_path)
    stages = {name: _metadata(f"{run_uri}/{name}/hf") for name, _ in recipe.stages.enabled()}
    curated = {name: _metadata(uri) for name, uri in curated_uris(run_uri).items()}
    evaluations = {name: _metadata(f"{run_uri}/evaluate/{name}") for name in recipe.evaluation.after_stages}
    client = MlflowClient()
    versions = [v for v in client.search_model_versions(f"name = '{recipe.registered_model_name}'", max_results=1000)
                if v.tags.get(tracking.TAG_PIPELINE_RUN) == run_id]
    # aliases are read from the version itself: the search API's entities may leave them out
    registered = {"name": versions[0].name, "version": versions[0].version,
                  "aliases": sorted(client.get_model_version(versions[0].name, versions[0].version).aliases)} \
        if versions else None
    parent = tracking.pipeline_parent(client, recipe, run_id)
    url = f"{mlflow_ui}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}" if parent else mlflow_ui
    return {"run_id": run_id, "run_uri": run_uri, "stages": stages, "curated": curated, "evaluations": evaluations,
            "registered": registered, "mlflow_url": url}


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\n== run {summary['run_id']}: outputs under {summary['run_uri']}")
    for name, meta in summary["stages"].items():
        kept = (summary["curated"].get(name) or {}).get("kept", "-")
        if meta:
            print(f"   {name:9s} {kept:>5} records  {meta.get('steps', '-'):>4} steps  train loss "
                  f"{meta.get('train_loss', float('nan')):.3f}  held-out loss {meta.get('eval_loss_before', float('nan')):.3f}"
                  f" -> {meta.get('eval_loss_after', float('nan')):.3f}")
        else:
            print(f"   {name:9s} not trained")
    for name, meta in summary["evaluations"].items():
        if meta:
            scores = "  ".join(f"{k} {v:.2f}" for k, v in meta.items() if "/" in k and isinstance(v, (int, float)))
            print(f"   evaluate {name}: gate {'passed' if meta.get('gate_passed') else 'FAILED'}  {scores}")
    reg = summary["registered"]
    print(f"   registered: {reg['name']} v{reg['version']} (aliases {', '.join(reg['aliases']) or 'none'})" if reg
          else "   registered: nothing (the gate did not pass, or the run stopped earlier)")
    print(f"   MLflow: {summary['mlflow_url']}", flush=True)
    if summary.get("logs"):
        print(f"   task logs: {summary['logs']} (and the MLflow run's logs/)", flush=True)
    print(flush=True)


def log_task_logs(recipe_path: str, run_id: str, logs: Path) -> str | None:
    """Attach the task logs to the pipeline run's parent MLflow run (under logs/); returns its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = tracking.pipeline_parent(client, load_recipe(recipe_path), run_id)
    if parent is None:
        return None
    client.log_artifacts(parent.info.run_id, str(logs), "logs")
    return parent.info.run_id


@contextlib.contextmanager
def kfp_local_session(pipeline_root: str | Path) -> Iterator[None]:
    """kfp.local for the pipelines and components called inside: the subprocess runner on this interpreter,
    outputs under `pipeline_root`; torn down afterwards.

    kfp.local indents a task's printed output by swapping `builtins.print` for the task's duration. The
    tasks of parallel branches (the curate fan-out) run in threads, and their swaps can interleave: the
    first task out puts the original back, the last one out puts back the first one's indenting print,
    which then stays installed (kfp 2.17). Every later print of this process would begin with spaces, to
    stdout even when it is printed to stderr. The print in place before the session is put back."""
    from kfp import local

    print_before = builtins.print
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    try:
        yield
    finally:
        local.config.LocalExecutionConfig.instance = None
        builtins.print = print_before


def run_local(recipe_path: str, state_dir: str | None = None, run_id: str | None = None,
              gitops_repo: str | None = None, params: dict[str, Any] | None = None,
              verbose: bool = False) -> dict[str, Any]:
    """Run the whole DAG on the local stack; returns the run summary. Raises PipelineFailed.
    The console shows a line per task (pipelines/console.py; `verbose`: the raw stream too); each task's
    full output goes to <state>/runs/<run id>/logs/ and to the parent MLflow run's artifacts."""
    from pipelines.onevision import build_pipeline

    recipe_path = str(Path(recipe_path).absolute())
    recipe = load_recipe(recipe_path)
    info = stack.stack_up(state_dir)
    os.environ.update(info.env())
    state = Path(state_dir) if state_dir else stack.default_state_dir()
    run_id = run_id or new_run_id()
    run_uri = storage.join(RUNS_ROOT, recipe.name, run_id)
    print(f"run        {run_id}  ->  {run_uri}\nMLflow     {info.mlflow_uri}", flush=True)

    pipeline = build_pipeline(recipe, recipe_path, RUNS_ROOT, DATA_ROOT)
    started = time.monotonic()
    logs = state / "runs" / run_id / "logs"
    try:
        with kfp_local_session(state / "kfp" / run_id), TaskConsole(logs, verbose=verbose):
            pipeline(run_id=run_id, gitops_repo=gitops_repo or local_gitops_repo(state), **(params or {}))
    except RuntimeError as err:
        gate = f"{run_uri}/evaluate/{recipe.evaluation.after_stages[-1]}/gate.json"
        reason = storage.read_bytes(gate).decode() if storage.exists(gate) else ""
        raise PipelineFailed(f"{str(err).splitlines()[0]}\n{('gate: ' + reason) if reason else ''}\n"
                             f"resume with: onevision run --recipe {recipe_path} --run-id {run_id}") from None
    finally:
        try:
            log_task_logs(recipe_path, run_id, logs)
        except Exception as err:  # noqa: BLE001 - the logs stay on disk; the run's outcome must not change
            print(f"task logs not attached to MLflow ({type(err).__name__}: {err}); they are in {logs}")
    summary = run_summary(recipe_path, run_uri, run_id, info.mlflow_uri)
    summary["wall_s"], summary["logs"] = time.monotonic() - started, str(logs)
    return summary

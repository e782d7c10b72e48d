"""MLflow helpers: one parent run per pipeline run, a nested run per step, recipe params, lineage tags.

    eval "$(onevision stack env)"        # MLFLOW_TRACKING_URI and the S3 settings of the local stack
    from onevision import tracking
    parent = tracking.ensure_pipeline_run(recipe, pipeline_run_id="local-20261129-1")
    with tracking.step_run("curate", parent, params={"records": 128}) as run:
        mlflow.log_metric("kept", 120)

Every pipeline step runs in its own process (a KFP pod), so the parent run is found again by its
`onevision.pipeline_run_id` tag rather than passed around as a live object; `ensure_pipeline_run` is
idempotent, and a resumed pipeline run logs into the same parent.

A step checks that the tracking server answers before it opens a run (`check_server`): MLflow's own
client retries an unreachable server for minutes (7 retries, backoff factor 2, 120 s timeouts), so
without the check a step whose server is down would hang, then fail after work it cannot record.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onevision.recipe import Recipe

TAG_PIPELINE_RUN = "onevision.pipeline_run_id"
TAG_RECIPE_HASH = "onevision.recipe_hash"
TAG_RECIPE_NAME = "onevision.recipe"
TAG_GIT_COMMIT = "onevision.git_commit"
TAG_DATA_MANIFEST = "onevision.data_manifest_hash"
TAG_STEP = "onevision.step"
TAG_WEIGHTS = "onevision.weights_uri"  # on a model version: the merged HF folder it stands for
MAX_PARAM_VALUE = 6000  # MLflow's limit on one param value


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be used; the message names its URI."""


def check_server(uri: str | None = None, timeout: float | None = None) -> None:
    """Fail within `timeout` seconds (ONEVISION_MLFLOW_CHECK_TIMEOUT, default 5) unless the tracking
    server answers its /health route. Non-HTTP tracking URIs (a local folder, sqlite) pass unchecked.

    A refused connection is tried again until the deadline (a server restarting for a moment passes);
    any HTTP answer below 500 counts as reachable (a 401/403 from an auth proxy is a live server).
    """
    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()  # what the client will use: env or mlflow.set_tracking_uri
    if not uri or not uri.startswith(("http://", "https://")):
        return
    budget = float(timeout if timeout is not None else os.environ.get("ONEVISION_MLFLOW_CHECK_TIMEOUT", "5"))
    deadline = time.monotonic() + budget
    url = f"{uri.rstrip('/')}/health"
    while True:
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=max(left, 0.1)):
                return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return
            cause: Exception = err
        except (OSError, ValueError) as err:  # refused, reset, timed out, bad URL
            cause = err
        if time.monotonic() + 0.5 >= deadline:
            raise TrackingError(
                f"MLflow tracking server {uri} is not reachable ({type(cause).__name__}: {cause}; "
                f"gave up after {budget:.0f}s): start it (`onevision stack up`) or fix MLFLOW_TRACKING_URI")
        time.sleep(0.5)


def flatten_params(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": [1, {"c": 2}]}} -> {"a.b.0": "1", "a.b.1.c": "2"}; None values are dropped."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        if tree is not None:
            value = json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)
            out[prefix] = value if len(value) <= MAX_PARAM_VALUE else value[: MAX_PARAM_VALUE - 3] + "..."
        return out
    for key, value in items:
        out.update(flatten_params(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str:
    """The commit the code runs from: ONEVISION_GIT_COMMIT (the project image sets it from its build argument,
    infra/images/Dockerfile: a pod has no .git) or `git rev-parse HEAD` in a checkout; else "unknown"."""
    if commit := os.environ.get("ONEVISION_GIT_COMMIT"):
        return commit
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                              capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lineage_tags(recipe: Recipe, pipeline_run_id: str, data_manifest_hash: str | None = None) -> dict[str, str]:
    """The tags that tie a run or model version back to its recipe, code, data and pipeline run."""
    tags = {
        TAG_RECIPE_NAME: recipe.name,
        TAG_RECIPE_HASH: recipe.hash(),
        TAG_GIT_COMMIT: git_commit(),
        TAG_PIPELINE_RUN: pipeline_run_id,
    }
    if data_manifest_hash:
        tags[TAG_DATA_MANIFEST] = data_manifest_hash
    return tags


def experiment_name(recipe: Recipe) -> str:
    return os.environ.get("ONEVISION_MLFLOW_EXPERIMENT", f"onevision-{recipe.name}")


def ensure_pipeline_run(recipe: Recipe, pipeline_run_id: str) -> str:
    """Return the id of the parent MLflow run of this pipeline run, creating it (with params) once.

    The parent stays RUNNING for the whole pipeline run: the pipeline's exit handler ends it
    (components/finish), FINISHED or FAILED. A resumed pipeline run finds it again and sets it RUNNING."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    check_server()
    client = MlflowClient()
    experiment = mlflow.set_experiment(experiment_name(recipe))
    found = find_pipeline_run(client, experiment.experiment_id, pipeline_run_id)
    if found is not None:
        if found.info.status != "RUNNING":
            client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    run = client.create_run(experiment.experiment_id, run_name=pipeline_run_id,
                            tags={**lineage_tags(recipe, pipeline_run_id), TAG_STEP: "pipeline"})
    params = [Param(k, v) for k, v in flatten_params(recipe.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def weights_uri(version: Any) -> str:
    """The HF folder (S3 prefix) of a registered model version: its `onevision.weights_uri` tag. The version's
    source is its MLflow pyfunc (components/register); a version registered before that has the folder as source."""
    return (version.tags or {}).get(TAG_WEIGHTS) or version.source


def pipeline_parent(client: Any, recipe: Recipe, pipeline_run_id: str) -> Any | None:
    """The parent run of a pipeline run of `recipe` (in its experiment), or None (no experiment or no run yet)."""
    experiment = client.get_experiment_by_name(experiment_name(recipe))
    return find_pipeline_run(client, experiment.experiment_id, pipeline_run_id) if experiment else None


def find_pipeline_run(client: Any, experiment_id: str, pipeline_run_id: str) -> Any | None:
    """The parent run of a pipeline run (tags onevision.pipeline_run_id and onevision.step=pipeline), or None."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_run_id}' and tags.`{TAG_STEP}` = 'pipeline'",
        max_results=1,
    )
    return found[0] if found else None


@contextmanager
def step_run(step: str, parent_run_id: str, params: dict[str, Any] | None = None,
             tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A nested MLflow run for one pipeline step, under the pipeline's parent run.

    The step run inherits the parent's lineage tags; a failure inside marks the run FAILED.
    Fails fast (TrackingError) if the tracking server does not answer, before the step does any work.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    check_server()
    parent = MlflowClient().get_run(parent_run_id)
    inherited = {k: v for k, v in parent.data.tags.items() if k.startswith("onevision.") and k != TAG_STEP}
    with mlflow.start_run(run_name=step, experiment_id=parent.info.experiment_id,
                          parent_run_id=parent_run_id, nested=True,
                          tags={**inherited, **(tags or {}), TAG_STEP: step}) as run:
        if params:
            mlflow.log_params(flatten_params(params))
        yield run


class RunWriter:
    """Writes one MLflow run from a background thread, so that a tracking outage never stalls or stops
    training: calls queue in order (create the run, params, one metrics row per step, the end) and are
    sent one by one; while the server does not answer, they wait (up to `max_rows` metric rows; beyond
    that the oldest rows are dropped and counted) and go out in order once it is back. One warning when it
    goes away, one when it is back; `close` waits for the queue a bounded time and says what it dropped.

        writer = RunWriter(uri)
        writer.call(lambda client: writer.set_run_id(client.create_run(experiment_id).info.run_id))
        writer.log_metrics({"loss": 2.3}, step=1)           # never blocks, never raises
        writer.close(timeout=120)                           # at the end of the stage
    """

    def __init__(self, uri: str, max_rows: int = 100_000, label: str = "[tracking]") -> None:
        import threading
        from collections import deque

        self.uri, self.max_rows, self.label = uri, max_rows, label
        self.run_id: str | None = None
        self.dropped_rows = 0
        self._queue: deque[tuple[str, Any]] = deque()  # (kind, fn(client)); kind "row" for metric rows
        self._rows = 0
        self._down_since: float | None = None
        self._closing = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._drain, name="mlflow-run-writer", daemon=True)
        self._thread.start()

    def set_run_id(self, run_id: str) -> None:
        self.run_id = run_id

    def call(self, fn: Any, kind: str = "call") -> None:
        """Queue `fn(client)`; it runs on the writer thread, after everything queued before it."""
        with self._wake:
            if kind == "row":
                if self._rows >= self.max_rows:  # drop the oldest row, never a call (the run's creation, its end)
                    oldest = next(i for i, (k, _) in enumerate(self._queue) if k == "row")
                    del self._queue[oldest]
                    self._rows -= 1
                    self.dropped_rows += 1
                self._rows += 1
            self._queue.append((kind, fn))
            self._wake.notify()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)  # when it happened, not when it reached the server
        rows = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        self.call(lambda client: client.log_batch(self.run_id, metrics=rows), kind="row")

    def _drain(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        backoff = 0.5
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                kind, fn = self._queue[0]
            try:
                fn(client)
            except Exception as err:  # noqa: BLE001 - any failure to reach the server: keep it queued, retry
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    print(f"{self.label} MLflow at {self.uri} is not answering ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160] if str(err) else ''}); training goes on, tracking "
                          "is queued and sent when it is back", flush=True)
                with self._wake:
                    self._wake.wait(backoff)  # close() wakes it for one more try
                backoff = min(backoff * 2, 10.0)
                continue
            with self._wake:
                if self._queue and self._queue[0][1] is fn:
                    self._queue.popleft()
                    self._rows -= kind == "row"
            if self._down_since is not None:
                print(f"{self.label} MLflow at {self.uri} answers again after "
                      f"{time.monotonic() - self._down_since:.0f}s; sending what was queued", flush=True)
                self._down_since = None
            backoff = 0.5

    def close(self, timeout: float) -> int:
        """Wait up to `timeout` s for the queue to go out; returns (and reports once) what was lost."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        with self._wake:
            left = len(self._queue)
            left_rows = self._rows
            self._queue.clear()
        lost = self.dropped_rows + left_rows
        if left or self.dropped_rows:
            print(f"{self.label} MLflow at {self.uri}: {lost} metric rows and {left - left_rows} other calls "
                  f"were not recorded ({self.dropped_rows} dropped over the queue's cap of {self.max_rows}, "
                  f"{left} still queued after waiting {timeout:.0f}s); training was not affected", flush=True)
        return lost + (left - left_rows)

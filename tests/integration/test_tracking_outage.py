"""MLflow going away in the middle of a stage does not stop training (issue 16, part 4).

A private MLflow server (the session's stack stays untouched) is SIGKILLed once the stage's run exists and
its first checkpoint is published, and started again on the same port and database after two more
checkpoints went out without it. The stage finishes, its run ends FINISHED with every step's metrics:
what was queued during the outage was sent when the server came back.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from components.curate.core import curate_stage
from model.checkpoints import latest_complete_checkpoint
from onevision import stack
from onevision.recipe import load_recipe
from tests.conftest import free_port_block
from tests.integration.test_faults import drain
from tests.integration.test_train import small_recipe, train

pytestmark = pytest.mark.integration
STEPS, SAVE_EVERY = 12, 3


def start_mlflow(state: Path, info: object, port: int):
    proc = stack._start_mlflow(state, info, port)  # the stack's own MLflow command, sqlite under `state`
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (state / "logs" / "mlflow.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    raise AssertionError("private MLflow not ready in 120 s")


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_training_outlives_an_mlflow_outage(tmp_path: Path, local_stack) -> None:
    from mlflow import MlflowClient

    recipe = small_recipe(tmp_path, steps=STEPS, save_every=SAVE_EVERY)
    curate_stage(load_recipe(recipe), "stage1", str(tmp_path / "data"), work_dir=str(tmp_path / "work"), workers=1)
    state, port = tmp_path / "mlflow", free_port_block(1)
    state.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow(state, local_stack, port)
    out = tmp_path / "stage1"
    proc = train(recipe, "stage1", tmp_path / "data", out, wait=False,
                 env={"MLFLOW_TRACKING_URI": uri, "ONEVISION_TRACKING_FLUSH_S": "180"})
    lines, reader = drain(proc)
    try:
        def at_least(step: int):
            return lambda: proc.poll() is not None or (latest_complete_checkpoint(str(out)) or (0,))[0] >= step

        wait_for(lambda: (out / "mlflow_run.json").exists() or proc.poll() is not None, 300, "the stage's run")
        wait_for(at_least(SAVE_EVERY), 300, "the first checkpoint")
        os.killpg(server.pid, signal.SIGKILL)  # the outage: no goodbye
        server.wait(timeout=30)
        down_at = (latest_complete_checkpoint(str(out)) or (0,))[0]
        wait_for(at_least(down_at + 2 * SAVE_EVERY), 300, "two checkpoints published during the outage")
        published_while_down = (latest_complete_checkpoint(str(out)) or (0,))[0]
        server = start_mlflow(state, local_stack, port)  # the same port and database
        code = proc.wait(timeout=600)
        reader.join(timeout=30)  # every line read
        log = "".join(lines)
        assert code == 0, log[-4000:]
        assert published_while_down >= down_at + 2 * SAVE_EVERY, "checkpoints kept publishing"
        assert log.count("is not answering") == 1 and log.count("answers again") == 1, log[-3000:]
        assert "were not recorded" not in log
        # the run, read back from the restarted server: every step's loss, the summary, FINISHED
        client = MlflowClient(uri)
        run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, STEPS + 1))
        summary = json.loads(Path(str(out) + "-summary.json").read_text())
        assert run.data.metrics["eval_loss_after"] == pytest.approx(summary["eval_loss_after"])
        assert run.data.tags["onevision.checkpoint_uri"] == str(out / "hf")
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=30)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)

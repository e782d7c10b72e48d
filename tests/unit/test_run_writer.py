"""tracking.RunWriter: MLflow calls from a background thread that never block or fail the caller; in order
when the store answers, kept (up to a cap) while it does not, and what could not be sent is counted."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from onevision.tracking import RunWriter


def test_everything_arrives_in_order(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a real MLflow store, no server needed
    writer = RunWriter(uri)
    writer.call(lambda client: writer.set_run_id(client.create_run(client.create_experiment("w")).info.run_id))
    for step in range(1, 21):
        writer.log_metrics({"loss": 10.0 / step}, step)
    writer.call(lambda client: client.set_terminated(writer.run_id, "FINISHED"))
    assert writer.close(timeout=60) == 0
    client = MlflowClient(uri)
    history = client.get_metric_history(writer.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 21))
    assert [m.value for m in history] == pytest.approx([10.0 / s for s in range(1, 21)])
    assert client.get_run(writer.run_id).info.status == "FINISHED"


def test_a_dead_server_never_blocks_the_caller_and_losses_are_counted(monkeypatch, capsys) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:  # a port nobody listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    writer = RunWriter(dead, max_rows=3)
    started = time.perf_counter()
    writer.call(lambda client: writer.set_run_id(client.create_run("0").info.run_id))
    for step in range(5):
        writer.log_metrics({"loss": 1.0}, step)
    assert time.perf_counter() - started < 0.5  # queued, not sent, by the caller
    assert writer.dropped_rows == 2  # over the cap, the oldest rows go (never the run's creation)
    assert writer.close(timeout=1.0) == 3 + 1 + 2  # 3 rows and 1 call still queued, 2 rows dropped
    out = capsys.readouterr().out
    assert out.count("is not answering") == 1 and dead in out
    assert "5 metric rows and 1 other calls were not recorded" in out

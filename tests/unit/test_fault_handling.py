"""Fault handling without services: the MLflow reachability check, S3 retries, local writes on a full disk.
(The same faults against real processes: tests/integration/test_faults.py.)"""

from __future__ import annotations

import errno
import http.server
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from onevision import storage, tracking


@pytest.fixture
def http_status() -> Iterator[list]:
    """A loopback HTTP server answering every GET with the status in holder[0]; yields [status, url]."""
    holder: list = [200, ""]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(holder[0])
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    holder[1] = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield holder
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("status", [200, 401, 403, 404])
def test_a_server_that_answers_is_reachable(http_status: list, status: int) -> None:
    http_status[0] = status  # an auth proxy's 401/403 is a live server
    tracking.check_server(http_status[1], timeout=2)


def test_a_server_that_fails_or_is_down_is_reported_in_seconds(http_status: list) -> None:
    http_status[0] = 503
    with pytest.raises(tracking.TrackingError, match=f"{http_status[1]} is not reachable"):
        tracking.check_server(http_status[1], timeout=1)
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=f"MLflow tracking server {dead} is not reachable"):
        tracking.check_server(dead, timeout=1.5)
    assert time.monotonic() - started < 3


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(tracking.TrackingError, match="timed out"):
            tracking.check_server(uri, timeout=1)
        assert time.monotonic() - started < 3


@pytest.mark.parametrize("uri", ["", "file:///tmp/mlruns", "/tmp/mlruns", "sqlite:///x.db"])
def test_non_http_tracking_uris_are_not_checked(uri: str) -> None:
    tracking.check_server(uri, timeout=0.1)


def test_transient_s3_errors_are_retried_with_a_warning_then_reported(monkeypatch, caplog) -> None:
    import urllib3

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("ONEVISION_S3_RETRIES", "3")
    monkeypatch.setenv("ONEVISION_S3_BACKOFF", "0.01")
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise urllib3.exceptions.ProtocolError("Connection aborted.")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="onevision.storage"):
        assert storage._with_retries("put s3://b/k", flaky) == "ok"
    assert [r.getMessage().split(";")[-1].strip() for r in caplog.records] == ["retry 1 of 3 in 0.0s",
                                                                             "retry 2 of 3 in 0.0s"]
    assert all(r.getMessage().startswith("put s3://b/k: ProtocolError") for r in caplog.records)

    def down() -> None:
        raise urllib3.exceptions.NewConnectionError(None, "Connection refused")

    with pytest.raises(storage.StorageError, match=r"put s3://b/k: S3 endpoint http://127.0.0.1:9 failed after 4 "):
        storage._with_retries("put s3://b/k", down)
    monkeypatch.delenv("ONEVISION_S3_RETRIES")
    monkeypatch.delenv("ONEVISION_S3_BACKOFF")
    slept = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    with pytest.raises(storage.StorageError):
        storage._with_retries("put s3://b/k", down)
    assert sum(slept) >= 30, "the default budget waits out a store's restart"


def test_a_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "shard.tar"
    src.write_bytes(b"x" * 100_000)
    out = tmp_path / "out"

    def full(inp, out_stream, length=0) -> None:
        out_stream.write(inp.read(1000))
        out_stream.flush()
        raise OSError(errno.ENOSPC, "No space left on device")  # write(2) names no file

    monkeypatch.setattr(storage.shutil, "copyfileobj", full)
    with pytest.raises(OSError) as err:
        storage.put_file(src, str(out / "shard.tar"))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(out / "shard.tar")
    assert list(out.iterdir()) == [], "no temporary .part file stays behind"

    class FullFile:  # what os.fdopen gives on a full volume: writes fail with ENOSPC
        def __init__(self, fd: int, mode: str) -> None:
            self.raw = real_fdopen(fd, mode)

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self) -> Self:
            return self

        def __exit__(self, *exc) -> None:
            self.raw.close()

    real_fdopen = storage.os.fdopen
    monkeypatch.setattr(storage.os, "fdopen", FullFile)
    with pytest.raises(OSError) as err:
        storage.write_bytes(str(out / "_MANIFEST.json"), b"{}")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(out / "_MANIFEST.json")
    assert list(out.iterdir()) == []

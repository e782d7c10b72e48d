"""`onevision serve`: a registry reference (models:/NAME@ALIAS) resolved through the real MLflow, served
by a real tritonserver started by the CLI on 127.0.0.1, answering like the in-process engine; SIGTERM
(or Ctrl-C, even before ready) leaves no tritonserver behind; a bad model or a taken port is one line.

    .venv/bin/python -m pytest tests/integration/test_serving_cli.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from mlflow.tracking import MlflowClient

from onevision import storage
from serving import triton_client
from serving.engine import Engine
from serving.requests import Limits, parse_chat_request
from serving.serve import resolve_model_uri
from tests.conftest import free_port_block


def test_serve_a_registered_champion_with_triton(local_stack, tmp_path: Path, tiny_recipe) -> None:
    from model.builder import build_tiny

    model, processor = build_tiny(tiny_recipe)
    model.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    name = f"it-serve-{uuid.uuid4().hex[:6]}"
    source = f"s3://onevision/{name}/hf"  # a version's source is the merged HF folder in S3, as registered
    storage.publish_dir(tmp_path / "hf", source)
    client = MlflowClient()
    client.create_registered_model(name)
    version = client.create_model_version(name, source=source)
    client.set_registered_model_alias(name, "champion", version.version)
    assert resolve_model_uri(f"models:/{name}@champion") == source
    assert resolve_model_uri(f"models:/{name}/{version.version}") == source

    port = free_port_block(3)
    server = subprocess.Popen([str(CLI), "serve", "--model", f"models:/{name}@champion", "--backend", "triton",
                              "--port", str(port), "--name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"127.0.0.1:{port}"
        triton_client.wait_ready(url, "tiny", timeout_s=180, alive=lambda: server.poll() is None)
        body = {"messages": [{"role": "user", "content": "What colour is it?"}], "max_tokens": 8}
        expected = Engine(model, processor).generate_batch([parse_chat_request(body, Limits())])[0].text
        assert triton_client.chat(url, body, model="tiny") == expected
        (triton,) = tritonservers_under(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)  # what kill, systemd and Kubernetes send
        out, _ = server.communicate(timeout=90)
    assert server.returncode == 0, out.decode()[-2000:]
    assert process_group(triton) == [], "tritonserver (or a stub of it) outlived the CLI"
    assert not answers(port)


def test_ctrl_c_before_ready_leaves_nothing_behind(tmp_path: Path, tiny_recipe) -> None:
    """SIGINT while tritonserver is still loading the model: the CLI stops it and exits cleanly."""
    from model.builder import build_tiny

    model, processor = build_tiny(tiny_recipe)
    model.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    port = free_port_block(3)
    server = subprocess.Popen([str(CLI), "serve", "--model", str(tmp_path / "hf"), "--backend", "triton",
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not tritonservers_under(server.pid):
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()[0].decode()[-2000:]
            time.sleep(0.1)
        (triton,) = tritonservers_under(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=90)
    assert server.returncode == 0 and b"Traceback" not in out, out.decode()[-2000:]
    assert process_group(triton) == [] and not answers(port)


def test_a_missing_model_folder_or_a_taken_port_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    done = subprocess.run([str(CLI), "serve", "--model", str(missing), "--port", str(free_port_block(1))],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and done.stdout == "", done
    assert done.stderr.strip().splitlines() == [
        f"serve: {missing}: no such folder; give an HF model folder (a path or s3:// prefix) or models:/NAME@ALIAS"]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    port = free_port_block(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 1))
        done = subprocess.run([str(CLI), "serve", "--model", str(tmp_path / "hf"), "--backend", "triton",
                               "--port", str(port)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done
    assert done.stderr.strip().splitlines() == [
        f"serve: port {port + 1} in use on 127.0.0.1; choose another --port (Triton takes it and the next two)"]


# ---- processes and ports, read from /proc and loopback ------------------------------------------------------
CLI = Path(sys.executable).parent / "onevision"


def _stat(pid: str) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name: state, ppid, pgrp, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tritonservers_under(parent: int) -> list[int]:
    """The tritonserver processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = _stat(entry.name) if entry.name.isdigit() else None
        if fields and int(fields[1]) == parent and fields[0] != "Z":
            try:
                argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if argv0.endswith(b"tritonserver"):
                found.append(int(entry.name))
    return found


def process_group(pgid: int) -> list[int]:
    """The live processes of a process group (tritonserver leads its own, with its Python-backend stubs)."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
            and (f := _stat(e.name)) and int(f[2]) == pgid and f[0] != "Z"]


def answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_registry_reference_without_mlflow_says_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([str(CLI), "serve", "--model", "models:/tiny@champion", "--port", str(free_port_block(1))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done
    expected = ('serve: models:/tiny@champion: a registry reference needs MLflow; set MLFLOW_TRACKING_URI to the '
                'tracking server (the local stack: eval "$(onevision stack env)"), or give the model\'s HF folder '
                '(a path or s3:// prefix) instead')
    assert done.stderr.strip().splitlines() == [expected], done.stderr
    assert list(tmp_path.iterdir()) == []  # no stray mlflow.db

"""`onevision serve`: a registry reference (models:/NAME@ALIAS) resolved through the real MLflow, served
by a real tritonserver started by the CLI on 127.0.0.1, answering like the in-process engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
    cli = Path(sys.executable).parent / "onevision"
    server = subprocess.Popen([str(cli), "serve", "--model", f"models:/{name}@champion", "--backend", "triton",
                              "--port", str(port), "--name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"127.0.0.1:{port}"
        triton_client.wait_ready(url, "tiny", timeout_s=180, alive=lambda: server.poll() is None)
        body = {"messages": [{"role": "user", "content": "What colour is it?"}], "max_tokens": 8}
        expected = Engine(model, processor).generate_batch([parse_chat_request(body, Limits())])[0].text
        assert triton_client.chat(url, body, model="tiny") == expected
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=60)
    assert server.returncode == 0, out.decode()[-2000:]


def test_a_registry_reference_without_mlflow_says_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cli = Path(sys.executable).parent / "onevision"
    done = subprocess.run([str(cli), "serve", "--model", "models:/tiny@champion", "--port", str(free_port_block(1))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done
    expected = ('serve: models:/tiny@champion: a registry reference needs MLflow; set MLFLOW_TRACKING_URI to the '
                'tracking server (the local stack: eval "$(onevision stack env)"), or give the model\'s HF folder '
                '(a path or s3:// prefix) instead')
    assert done.stderr.strip().splitlines() == [expected], done.stderr
    assert list(tmp_path.iterdir()) == []  # no stray mlflow.db

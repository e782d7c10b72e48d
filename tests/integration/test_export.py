"""The export step under kfp.local against the real stack; then the exported Triton repository, fetched
from S3 as KServe's storage initializer would, served by a real tritonserver on 127.0.0.1."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from onevision import storage
from onevision.recipe import dump_recipe, load_recipe
from serving import triton_client
from serving.engine import Engine
from serving.requests import Limits, parse_chat_request
from serving.triton_repo import TritonServer
from tests.conftest import free_port_block


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_export_then_serve_the_repository(local_stack, kfp_local: Path, tmp_path: Path, tiny_recipe) -> None:
    from components.export.component import export
    from model.builder import build_tiny

    prefix = f"s3://onevision/it-export-{uuid.uuid4().hex[:8]}"
    model, processor = build_tiny(tiny_recipe)
    model.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    storage.publish_dir(tmp_path / "hf", f"{prefix}/hf")
    storage.write_bytes(f"{prefix}/recipe.yaml", dump_recipe(load_recipe("recipes/tiny.yaml")).encode())

    task = export(recipe_uri=f"{prefix}/recipe.yaml", model_uri=f"{prefix}/hf", out_uri=f"{prefix}/export")
    assert task.outputs["triton_uri"] == f"{prefix}/export/triton"
    assert task.outputs["manifest_sha256"] == storage.manifest_hash(f"{prefix}/export")

    local = storage.get_dir(f"{prefix}/export", tmp_path / "export")  # sha256-verified, like a pod would
    assert (local / "triton/tiny-ov-triton/1/weights/config.json").is_file()
    manifests = {p.name: list(yaml.safe_load_all(p.read_text())) for p in (local / "manifests").glob("*.yaml")}
    _, triton_isvc = manifests["tiny-ov-triton.yaml"]
    assert triton_isvc["spec"]["predictor"]["model"]["storageUri"] == f"{prefix}/export/triton"
    kserve_env = manifests["tiny-ov.yaml"][0]["spec"]["predictor"]["containers"][0]["env"]
    assert {"name": "STORAGE_URI", "value": f"{prefix}/hf"} in kserve_env

    port = free_port_block(3)
    with TritonServer(local / "triton", tmp_path / "server", port, port + 1, port + 2) as server:
        server.wait_ready("tiny-ov-triton")
        body = {"messages": [{"role": "user", "content": "Which shape?"}], "max_tokens": 6}
        expected = Engine(model, processor).generate_batch([parse_chat_request(body, Limits())])[0].text
        assert triton_client.chat(server.url, body, model="tiny-ov-triton") == expected


def test_export_component_compiles_for_the_project_image(compiled_component) -> None:
    from components.export.component import export

    doc = compiled_component(export)
    component = doc["components"]["comp-export"]
    assert set(component["inputDefinitions"]["parameters"]) == {"recipe_uri", "model_uri", "out_uri"}
    assert set(component["outputDefinitions"]["parameters"]) == {"triton_uri", "manifests_uri", "manifest_sha256"}

"""The chat model on a real tritonserver (nvidia-pytriton's binary, Python backend, 127.0.0.1 only):
answers equal the in-process engine's on the same weights, alone and dynamically batched; a bad
request gets a clean 400 of its own while its batch companions are answered and the server stays ready."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from model.builder import build_tiny, load_pretrained
from onevision.recipe import load_recipe
from serving import triton_client
from serving.engine import Engine
from serving.requests import Limits, parse_chat_request
from serving.triton_client import TritonChatError
from serving.triton_repo import TritonServer, build_model_repository
from tests.conftest import free_port_block

ROOT = Path(__file__).resolve().parents[2]


def image_url(colour: tuple[int, int, int], size: int = 56) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(question: str, colour: tuple[int, int, int] = (200, 20, 20), url: str | None = None, **extra: Any) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url or image_url(colour)}},
               {"type": "text", "text": question}]
    return {"model": "onevision", "max_tokens": 8, **extra, "messages": [{"role": "user", "content": content}]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, Engine]]:
    """A tiny random model saved as an HF folder, served twice from one repository: `onevision`
    (config parameter model_uri -> the folder) and `onevision_copy` (weights copied into 1/weights)."""
    root = tmp_path_factory.mktemp("triton")
    model, processor = build_tiny(load_recipe(ROOT / "recipes/tiny.yaml"))
    model.save_pretrained(root / "hf")
    processor.save_pretrained(root / "hf")
    # 100 ms of queue delay: concurrent requests reliably meet in one batch
    build_model_repository(str(root / "hf"), root / "repo", max_batch_size=4, max_queue_delay_us=100_000)
    build_model_repository(str(root / "hf"), root / "repo", name="onevision_copy", copy_weights=True)
    port = free_port_block(3)
    server = TritonServer(root / "repo", root / "work", http_port=port, grpc_port=port + 1, metrics_port=port + 2)
    with server:
        server.wait_ready("onevision", timeout_s=90)
        server.wait_ready("onevision_copy", timeout_s=30)
        yield server, Engine(*load_pretrained(str(root / "hf")))
    assert server.process is not None and server.process.returncode == 0, server.log()[-3000:]


def local(engine: Engine, chat_body: dict) -> str:
    return engine.generate_batch([parse_chat_request(chat_body, Limits())])[0].text


def test_repository_layout_and_validation(tmp_path: Path, served: tuple[TritonServer, Engine]) -> None:
    repo = served[0].repository
    config = (repo / "onevision" / "config.pbtxt").read_text()
    for line in ('backend: "python"', "max_batch_size: 4", "max_queue_delay_microseconds: 100000",
                 'name: "REQUEST"', 'name: "TEXT"', "TYPE_STRING", "KIND_CPU", 'key: "model_uri"'):
        assert line in config
    assert (repo / "onevision" / "1" / "model.py").read_text() == (ROOT / "serving/triton_model.py").read_text()
    assert "model_uri" not in (repo / "onevision_copy" / "config.pbtxt").read_text()
    assert (repo / "onevision_copy" / "1" / "weights" / "config.json").is_file()

    hf = repo.parent / "hf"
    gpu = build_model_repository("s3://bucket/runs/x/hf", tmp_path, name="gpu", instance_kind="KIND_GPU")
    assert "kind: KIND_GPU" in (gpu / "config.pbtxt").read_text()
    assert 'string_value: "s3://bucket/runs/x/hf"' in (gpu / "config.pbtxt").read_text()
    with pytest.raises(FileExistsError):
        build_model_repository(str(hf), tmp_path, name="gpu")
    for bad in ({"name": "../up"}, {"name": ""}, {"max_batch_size": 0}, {"max_queue_delay_us": -1},
                {"instance_kind": "KIND_TPU"}):
        with pytest.raises(ValueError):
            build_model_repository(str(hf), tmp_path / "bad", **bad)
    with pytest.raises(FileNotFoundError):
        build_model_repository(str(tmp_path / "nothing"), tmp_path / "bad")
    with pytest.raises(ValueError):
        build_model_repository("  ", tmp_path / "bad")


def test_greedy_chat_with_an_image_matches_in_process(served: tuple[TritonServer, Engine]) -> None:
    server, engine = served
    request = body("What colour is the shape?")
    answer = triton_client.chat(server.url, request)
    assert answer == local(engine, request)
    assert answer  # the random model says something
    assert triton_client.chat(server.url, request, model="onevision_copy") == answer
    seeded = body("Describe it.", temperature=0.9, seed=7)  # sampling alone in its batch: same seed, same text
    assert triton_client.chat(server.url, seeded) == local(engine, seeded)


def test_concurrent_requests_batch_and_match(served: tuple[TritonServer, Engine]) -> None:
    server, engine = served
    bodies = [body(f"What is shape {i}?", (40 * i, 200 - 30 * i, 10), max_tokens=4 + i) for i in range(6)]
    with triton_client.client(server.url) as conn:
        before = conn.get_inference_statistics("onevision")["model_stats"][0]
    answers = triton_client.chat_many(server.url, bodies, concurrency=6)
    with triton_client.client(server.url) as conn:
        after = conn.get_inference_statistics("onevision")["model_stats"][0]
    assert answers == [local(engine, b) for b in bodies]
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["execution_count"] - before["execution_count"] < 6  # dynamic batching ran them together


def test_bad_requests_get_a_clean_error_and_the_server_stays_ready(served: tuple[TritonServer, Engine]) -> None:
    server, engine = served
    with pytest.raises(TritonChatError) as err:
        triton_client.chat(server.url, body("?", url="data:image/png;base64,@@not-base64@@"))
    assert err.value.status == 400 and "invalid base64" in err.value.message
    with pytest.raises(TritonChatError) as err:
        triton_client.chat(server.url, "{not json")
    assert err.value.status == 400 and "not valid JSON" in err.value.message
    with pytest.raises(TritonChatError) as err:
        triton_client.chat(server.url, {"messages": []})
    assert err.value.status == 400 and "messages must be a non-empty list" in err.value.message

    # a bad request batched with good ones fails alone
    good = [body("Which shape?", (10, 10, 220)), body("Which colour?", (10, 220, 10))]
    answers = triton_client.chat_many(server.url, [good[0], body("?", url="data:image/png;base64,!!"), good[1]])
    assert isinstance(answers[1], TritonChatError) and answers[1].status == 400
    assert answers[0] == local(engine, good[0]) and answers[2] == local(engine, good[1])
    assert triton_client.is_ready(server.url, "onevision")
    assert server.process is not None and server.process.poll() is None

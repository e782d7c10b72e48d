"""Both doors under hostile input (issue 21): bounded work per request, a responsive health route, auth.

    .venv/bin/python -m pytest tests/integration/test_serving_hostile.py -s     # prints what it measured

One `onevision serve` per backend (KServe, Triton), each started by the CLI with `--token`, both serving
the tiny model with the default limits, so the budgets are the ones derived from the model (text:
8192 tokens x 16 bytes; pixels: the 4096x4096 floor). Payloads are built once. The bounds are generous
(this is not a benchmark): readiness under 1 s while each request is handled, refusals in seconds, server
memory (RSS of the server's process tree, sampled while the request runs) back near where it was.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from serving import triton_client
from serving.triton_client import TritonChatError
from tests.conftest import free_port_block
from tests.integration.test_serving_kserve import model_dir, running  # noqa: F401 - model_dir is a fixture

TOKEN = "hostile-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT = "/openai/v1/chat/completions"
MB = 1 << 20
READY_WITHIN_S = 1.0
REFUSED_WITHIN_S = 5.0  # includes sending 30 MB over loopback and the server reading it
RSS_COMES_BACK_MB = 300  # after a refused request, over the RSS before it
PEAK_OVER_BASE_MB = 1500  # while a refused request runs (unbounded, 8 x 64 MP peaked at 8.7 GB)


@dataclass
class Door:
    url: str
    pid: int
    log: Path

    def rss_mb(self) -> float:
        """RSS of the server and its children (tritonserver, its Python-backend stub), in MiB."""
        root = psutil.Process(self.pid)
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / MB


def _serve(kind: str, model: Path, tmp: Path) -> Iterator[Door]:
    port = free_port_block(3)
    cli = Path(sys.executable).parent / "onevision"
    cmd = [str(cli), "serve", "--model", str(model), "--backend", kind, "--port", str(port), "--token", TOKEN]
    url, log = f"http://127.0.0.1:{port}", tmp / f"{kind}.log"
    with running(cmd, url, log, timeout_s=180) as proc:
        if kind == "triton":  # the server is ready before the model: wait for the model too
            triton_client.wait_ready(url, "onevision", timeout_s=120, alive=lambda: proc.poll() is None)
        yield Door(url, proc.pid, log)


@pytest.fixture(scope="module")
def kserve(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:  # noqa: F811
    yield from _serve("kserve", model_dir, tmp_path_factory.mktemp("hostile-kserve"))


@pytest.fixture(scope="module")
def triton(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:  # noqa: F811
    yield from _serve("triton", model_dir, tmp_path_factory.mktemp("hostile-triton"))


# ---- payloads, built once ---------------------------------------------------------------------------------
def _jpeg_url(image: Image.Image, quality: int) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _body(text: str, images: list[str] = (), **extra: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {"model": "onevision", "max_tokens": 2, "temperature": 0, **extra,
            "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]}


@pytest.fixture(scope="module")
def payloads() -> dict[str, tuple[bytes, int]]:
    """name -> (JSON body, the status KServe's OpenAI route must answer)."""
    bomb = _jpeg_url(Image.new("RGB", (7999, 7999), (120, 60, 200)), 50)  # 64 MP in 1 MB
    noise = np.random.default_rng(0).integers(0, 255, (1024, 2048, 3), dtype=np.uint8)
    photo = _jpeg_url(Image.fromarray(noise), 85)  # 2 MP that take real work to decode; 8 = the budget
    bodies = {
        "30 MB of text": (_body("word " * 6_000_000), 413),
        "8 x 7999x7999 JPEG": (_body("Colour?", [bomb] * 8), 413),
        "text just under the budget": (_body("word " * 26_000), 400),  # 130 KB: tokenized, over the context
        "8 x 2 MP noise JPEG (the budget)": (_body("Colour?", [photo] * 8), 200),
    }
    return {name: (json.dumps(body).encode(), status) for name, (body, status) in bodies.items()}


# ---- measuring one request --------------------------------------------------------------------------------
@dataclass
class Measured:
    status: int
    text: str
    seconds: float
    ready_worst_s: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float


def _measure(door: Door, send: Callable[[], tuple[int, str]]) -> Measured:
    """Run `send` in a thread; meanwhile probe readiness every 50 ms and sample the server's RSS."""
    before = door.rss_mb()
    result: dict[str, Any] = {}

    def work() -> None:
        start = time.perf_counter()
        try:
            result["answer"] = send()
        finally:
            result["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=work)
    thread.start()
    worst, peak = 0.0, before
    with httpx.Client(base_url=door.url, timeout=30) as probe:
        while thread.is_alive():
            start = time.perf_counter()
            assert probe.get("/v2/health/ready").status_code == 200
            worst = max(worst, time.perf_counter() - start)
            peak = max(peak, door.rss_mb())
            time.sleep(0.05)
    thread.join()
    time.sleep(0.5)  # let the server drop the request's buffers
    status, text = result["answer"]
    return Measured(status, text, result["seconds"], worst, before, peak, door.rss_mb())


def _post(door: Door, path: str, body: bytes, stream: bool = False) -> Callable[[], tuple[int, str]]:
    if stream:
        body = json.dumps({**json.loads(body), "stream": True}).encode()

    def send() -> tuple[int, str]:
        with httpx.Client(base_url=door.url, headers=AUTH, timeout=120) as client:
            response = client.post(path, content=body, headers={"Content-Type": "application/json"})
            return response.status_code, response.text
    return send


def _report(door: str, name: str, m: Measured) -> str:
    return (f"{door:7} {name:40} -> {m.status} in {m.seconds:6.2f} s; readiness worst {m.ready_worst_s * 1000:4.0f} ms;"
            f" RSS {m.rss_before_mb:.0f} -> peak {m.rss_peak_mb:.0f} -> {m.rss_after_mb:.0f} MiB")


# ---- 1-3: KServe stays ready, refuses fast, gives memory back ---------------------------------------------
def test_kserve_stays_ready_refuses_fast_and_gives_memory_back(kserve: Door, payloads: dict) -> None:
    lines, failures = [], []
    for stream in (False, True):
        for name, (body, status) in payloads.items():
            label = f"{name}{', streamed' if stream else ''}"
            m = _measure(kserve, _post(kserve, CHAT, body, stream))
            lines.append(_report("kserve", label, m))
            if m.status != status:
                failures.append(f"{label}: {m.status} (expected {status}) {m.text[:300]}")
            if m.ready_worst_s > READY_WITHIN_S:
                failures.append(f"{label}: readiness took {m.ready_worst_s:.2f} s")
            if status == 413:
                if m.seconds > REFUSED_WITHIN_S:
                    failures.append(f"{label}: refused after {m.seconds:.1f} s")
                if m.rss_after_mb - m.rss_before_mb > RSS_COMES_BACK_MB:
                    failures.append(f"{label}: RSS {m.rss_before_mb:.0f} -> {m.rss_after_mb:.0f} MiB after the refusal")
                if m.rss_peak_mb - m.rss_before_mb > PEAK_OVER_BASE_MB:
                    failures.append(f"{label}: RSS peaked at {m.rss_peak_mb:.0f} MiB")
    # the same 30 MB through KServe's own v2 route: its body is parsed by KServe, then by us off the loop
    text = json.loads(payloads["30 MB of text"][0])["messages"][0]["content"][0]["text"]
    v2 = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}).encode()
    m = _measure(kserve, _post(kserve, "/v2/models/onevision/infer", v2))
    lines.append(_report("kserve", "30 MB of text, v2", m))
    if m.status != 413 or m.ready_worst_s > READY_WITHIN_S or m.seconds > REFUSED_WITHIN_S:
        failures.append(f"30 MB of text, v2: {m.status} in {m.seconds:.1f} s, readiness {m.ready_worst_s:.2f} s")
    print("\n" + "\n".join(lines))
    assert not failures, "\n".join(failures)


# ---- 2-3 on Triton: the same budgets (400: Triton's HTTP front end has no 413) ----------------------------
def test_triton_refuses_fast_and_gives_memory_back(triton: Door, payloads: dict) -> None:
    lines, failures = [], []
    for name in ("30 MB of text", "8 x 7999x7999 JPEG"):
        def send(body: bytes = payloads[name][0]) -> tuple[int, str]:
            try:
                return 200, triton_client.chat(triton.url, body.decode(), token=TOKEN)
            except TritonChatError as err:
                return err.status, err.message

        m = _measure(triton, send)
        lines.append(_report("triton", name, m))
        if m.status != 400 or "budget" not in m.text:
            failures.append(f"{name}: {m.status} {m.text[:300]}")
        if m.seconds > REFUSED_WITHIN_S or m.ready_worst_s > READY_WITHIN_S:
            failures.append(f"{name}: refused in {m.seconds:.1f} s, readiness {m.ready_worst_s:.2f} s")
        if m.rss_after_mb - m.rss_before_mb > RSS_COMES_BACK_MB or m.rss_peak_mb - m.rss_before_mb > PEAK_OVER_BASE_MB:
            failures.append(f"{name}: RSS {m.rss_before_mb:.0f} -> peak {m.rss_peak_mb:.0f} -> {m.rss_after_mb:.0f} MiB")
    print("\n" + "\n".join(lines))
    assert not failures, "\n".join(failures)


# ---- 4: the token on both doors ---------------------------------------------------------------------------
def test_token_on_both_doors(kserve: Door, triton: Door) -> None:
    chat = json.dumps(_body("Hi")).encode()
    infer = json.dumps({"inputs": [{"name": "REQUEST", "shape": [1, 1], "datatype": "BYTES",
                                    "data": [chat.decode()]}]}).encode()
    doors = {"kserve": (kserve, CHAT, chat), "triton": (triton, "/v2/models/onevision/infer", infer)}
    for name, (door, path, body) in doors.items():
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = httpx.post(door.url + path, content=body, headers=headers, timeout=30)
            assert response.status_code == 401, (name, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer", name
            assert httpx.get(f"{door.url}/v2/models/onevision", headers=headers, timeout=10).status_code == 401
        response = httpx.post(door.url + path, content=body, headers=AUTH, timeout=60)
        assert response.status_code == 200, (name, response.text)
        for probe in ("/v2/health/live", "/v2/health/ready", "/v2/models/onevision/ready"):
            assert httpx.get(door.url + probe, timeout=10).status_code == 200, (name, probe)  # probes stay open
        processes = [psutil.Process(door.pid), *psutil.Process(door.pid).children(recursive=True)]
        listening = {c.laddr.ip for p in processes for c in getattr(p, "net_connections", p.connections)(kind="inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}, (name, listening)
    # tritonserver's own HTTP port (port+1) answers only the front: the bearer token alone is not enough
    inner = triton.url.rsplit(":", 1)[0] + f":{int(triton.url.rsplit(':', 1)[1]) + 1}"
    response = httpx.post(f"{inner}/v2/models/onevision/infer", content=infer, headers=AUTH, timeout=30)
    assert response.status_code == 403 and "restricted" in response.text, response.text
    assert triton_client.chat(triton.url, _body("Hi"), token=TOKEN) is not None


# ---- 5: names the problem, the same words on both doors ---------------------------------------------------
def test_non_image_bytes_are_4xx_without_object_addresses(kserve: Door, triton: Door) -> None:
    url = "data:image/png;base64," + base64.b64encode(b"\x7fELF" + bytes(200)).decode()
    response = httpx.post(kserve.url + CHAT, json=_body("?", [url]), headers=AUTH, timeout=30)
    message = response.json()["error"]["message"]
    assert response.status_code == 400 and "not a usable image" in message, message
    with pytest.raises(TritonChatError) as err:
        triton_client.chat(triton.url, _body("?", [url]), token=TOKEN)
    assert err.value.status == 400 and "not a usable image" in err.value.message, err.value.message
    for text in (message, err.value.message):
        assert "0x" not in text and "object at" not in text, text


def test_kserve_log_says_where_it_serves(kserve: Door) -> None:
    log = kserve.log.read_text()
    assert f"on {kserve.url} (OpenAI base {kserve.url}/openai/v1" in log, log[-2000:]
    assert "OpenAI endpoints not registered" not in log


# ---- after the barrage: still ready, still right ---------------------------------------------------------
def test_still_ready_and_correct_after_the_barrage(kserve: Door, triton: Door, model_dir: Path) -> None:  # noqa: F811
    from model.builder import load_pretrained
    from serving.engine import Engine
    from serving.requests import Limits, parse_chat_request

    body = _body("What colour is it?", max_tokens=8)
    expected = Engine(*load_pretrained(str(model_dir))).generate_batch([parse_chat_request(body, Limits())])[0].text
    for door in (kserve, triton):
        assert httpx.get(f"{door.url}/v2/health/ready", timeout=5).status_code == 200
    answer = httpx.post(kserve.url + CHAT, json=body, headers=AUTH, timeout=60).json()
    assert answer["choices"][0]["message"]["content"] == expected
    assert triton_client.chat(triton.url, body, token=TOKEN) == expected
    print(f"\nafter the barrage: kserve RSS {kserve.rss_mb():.0f} MiB, triton RSS {triton.rss_mb():.0f} MiB; "
          f"both answer {expected!r}")

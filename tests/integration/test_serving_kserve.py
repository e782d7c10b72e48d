"""The KServe server for real, in a subprocess on loopback: a tiny random model saved to a folder.

One server (token set, small media limits) serves every test: the official openai client (plain,
streaming, with an image), KServe's own InferenceRESTClient (v1, v2), bad inputs that must be 4xx and
leave the server healthy, bearer auth, a bounded load test (8 clients x 10 s, zero 5xx), and the
OpenAI conventions clients rely on (issue 17, point 5): the model list, `n`, exact streamed
`finish_reason`, seeded streams, the body cap.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image

from tests.conftest import free_port_block

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NAME = "onevision"
MAX_MEDIA_BYTES = 64 << 10  # the server's limits for this test (small, so over-size payloads stay small)
MAX_IMAGES = 2
MAX_BODY_BYTES = 512 << 10  # small, so the over-cap bodies stay small; every other test's body fits


@dataclass
class Server:
    url: str
    pid: int
    log: Path


def _png(size: tuple[int, int] = (48, 40)) -> bytes:
    image = Image.new("RGB", size, (235, 235, 235))
    image.paste((200, 30, 30), (12, 10, 36, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


PNG_B64 = base64.b64encode(_png()).decode()
DATA_URL = f"data:image/png;base64,{PNG_B64}"
QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_recipe: Any) -> Path:
    from model.builder import build_tiny, configure_stage

    model, processor = build_tiny(tiny_recipe)
    configure_stage(model, processor, tiny_recipe.stages.stage2_ov, tiny_recipe.model.image_size)
    path = tmp_path_factory.mktemp("served") / "hf"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@contextmanager
def running(cmd: list[str], url: str, log: Path, env: dict[str, str] | None = None,
            timeout_s: float = 120) -> Iterator[subprocess.Popen[bytes]]:
    """A server subprocess (output to `log`), yielded once `url`/v2/health/ready answers 200; SIGTERM after."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready in {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.25)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port_block(1)
    log = tmp_path_factory.mktemp("kserve") / "server.log"
    cmd = [sys.executable, "-m", "serving.kserve_server", "--model", str(model_dir), "--port", str(port),
           "--max-images", str(MAX_IMAGES), "--max-media-bytes", str(MAX_MEDIA_BYTES), "--max-new-tokens", "64",
           "--max-body-bytes", str(MAX_BODY_BYTES)]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, url, log, env={"ONEVISION_SERVING_TOKEN": TOKEN}) as proc:
        yield Server(url, proc.pid, log)


def _chat_body(**extra: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": QUESTION}]
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 24,
            **extra}


def _healthy(server: Server) -> None:
    for path in ("/", "/v2/health/live", "/v2/health/ready", f"/v1/models/{NAME}", f"/v2/models/{NAME}/ready"):
        response = httpx.get(server.url + path, timeout=10)  # no token: probes stay open
        assert response.status_code == 200, (path, response.text)
    assert httpx.get(f"{server.url}/v1/models/{NAME}", timeout=10).json()["ready"] is True


def test_listens_on_loopback_only(server: Server) -> None:
    process = psutil.Process(server.pid)
    conns = getattr(process, "net_connections", process.connections)(kind="inet")
    assert {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN} == {"127.0.0.1"}


def test_every_door_gives_the_same_greedy_answer(server: Server, model_dir: Path) -> None:
    import openai
    from kserve import InferenceRESTClient, RESTConfig
    from kserve.protocol.infer_type import InferInput, InferRequest

    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=TOKEN, max_retries=0, timeout=60)
    messages = _chat_body()["messages"]
    plain = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=24)
    assert plain.object == "chat.completion" and plain.model == NAME and plain.id
    (choice,) = plain.choices
    answer = choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens > 16 and 0 < plain.usage.completion_tokens <= 24  # >16: the image's tokens
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=24,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)

    async def kserve_doors() -> tuple[list[str], list[str]]:
        v1 = InferenceRESTClient(RESTConfig(protocol="v1", retries=0, timeout=60))
        v2 = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
        try:
            simple = {"prompt": QUESTION, "image": PNG_B64, "temperature": 0, "max_tokens": 24}
            out1 = await v1.infer(server.url, {"instances": [simple, _chat_body()]}, model_name=NAME, headers=AUTH)
            texts1 = [p["text"] for p in out1["predictions"]]
            assert out1["predictions"][0]["usage"] == {"prompt_tokens": plain.usage.prompt_tokens,
                                                       "completion_tokens": plain.usage.completion_tokens,
                                                       "total_tokens": plain.usage.total_tokens}
            by_text = InferRequest(NAME, [InferInput("text", [1], "BYTES", [QUESTION]),
                                          InferInput("image", [1], "BYTES", [PNG_B64])],
                                   parameters={"temperature": 0, "max_tokens": 24})
            by_body = InferRequest(NAME, [InferInput("request", [1], "BYTES", [json.dumps(_chat_body())])])
            texts2 = []
            for request in (by_text, by_body):
                response = await v2.infer(server.url, request, model_name=NAME, headers=dict(AUTH))
                assert response.get_output_by_name("finish_reason").data == [choice.finish_reason]
                texts2 += response.get_output_by_name("text").data
            return texts1, texts2
        finally:
            await v1.close()
            await v2.close()

    texts1, texts2 = asyncio.run(kserve_doors())
    print(f"\ngreedy answer of the random model: {answer!r}")
    assert streamed == answer
    assert texts1 == [answer, answer]
    assert texts2 == [answer, answer]
    # ... and the in-process engine on the same weights, which test_serving_triton holds Triton to
    from model.builder import load_pretrained
    from serving.engine import Engine
    from serving.requests import Limits, parse_chat_request

    model, processor = load_pretrained(str(model_dir))
    request = parse_chat_request({"messages": messages, "max_tokens": 24, "temperature": 0}, Limits())
    assert Engine(model, processor).generate_batch([request])[0].text == answer


def _parts(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**_chat_body(**extra), "messages": [{"role": "user", "content": list(parts)}]}


def _image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _v2_text(*texts: str, images: list[str] | None = None) -> dict[str, Any]:
    inputs = [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": list(texts)}]
    if images is not None:
        inputs.append({"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": images})
    return {"inputs": inputs}


HELLO = base64.b64encode(b"hello").decode()
BIG = base64.b64encode(b"\0" * (MAX_MEDIA_BYTES + 1024)).decode()
LONG = "red " * 9000  # > 8192 tokens, the tiny model's context
# (label, how to send, body, status, words the message must contain)
CASES: list[tuple[str, str, Any, int, tuple[str, ...]]] = [
    ("malformed JSON", "chat", b'{"model": "onevision", "messages": [', 400, ("malformed JSON",)),
    ("malformed JSON v1", "v1", b'{"instances": [', 400, ("Unrecognized request format",)),  # KServe's words
    ("unknown model", "chat", {**_chat_body(), "model": "gpt-4o"}, 404, ("'gpt-4o'", "not found")),
    ("unknown model v1", "v1:nope", {"instances": [{"prompt": "x"}]}, 404, ("nope",)),
    ("invalid base64", "chat", _parts(_image("data:image/png;base64,@@not-base64@@")), 400, ("invalid base64",)),
    ("invalid base64 v1", "v1", {"instances": [{"prompt": "fine"}, {"prompt": "x", "image": "%%%"}]}, 400,
     ("instances[1]", "invalid base64")),
    ("not an image", "chat", _parts(_image(f"data:image/png;base64,{HELLO}")), 400, ("not a usable image",)),
    ("not an image v2", "v2", _v2_text("x", images=[HELLO]), 400, ("text[0]", "not a usable image")),
    ("image over the size limit", "chat", _parts(_image(f"data:image/png;base64,{BIG}")), 413,
     (f"over {MAX_MEDIA_BYTES} bytes",)),
    ("too many images", "chat", _parts(*[_image(DATA_URL)] * (MAX_IMAGES + 1)), 400, ("too many media",)),
    ("prompt over the context", "chat", _parts({"type": "text", "text": LONG}), 400, ("exceeds the context length",)),
    ("prompt over the context v2", "v2", _v2_text(LONG), 400, ("context length",)),
    ("http URL", "chat", _parts(_image("http://169.254.169.254/latest/meta-data")), 400,
     ("scheme 'http'", "not allowed")),
    ("s3 bucket not allowed", "chat", _parts(_image("s3://someone-elses-bucket/a.png")), 400,
     ("'someone-elses-bucket'", "not allowed")),
    ("streamed, invalid base64", "chat", _parts(_image("data:image/png;base64,@@"), stream=True), 400,
     ("invalid base64",)),
    ("streamed, prompt over the context", "chat", _parts({"type": "text", "text": LONG}, stream=True), 400,
     ("exceeds the context length",)),
    ("max_tokens over the limit", "chat", _chat_body(max_tokens=100000), 400, ("max_tokens",)),
    ("no messages", "chat", {"model": NAME}, 400, ("messages",)),
    ("v1 without instances", "v1", {"inputs": []}, 400, ("instances",)),
    ("v2 without a text input", "v2", {"inputs": [{**_v2_text("x")["inputs"][0], "name": "prompt"}]}, 400, ("'text'",)),
    ("v2 text and image counts differ", "v2", _v2_text("x", "y", images=[PNG_B64]), 400, ("one image",)),
]


def _send(server: Server, how: str, body: Any) -> httpx.Response:
    kind, _, model = how.partition(":")
    path = {"chat": "/openai/v1/chat/completions", "v1": f"/v1/models/{model or NAME}:predict",
            "v2": f"/v2/models/{model or NAME}/infer"}[kind]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={**AUTH, "Content-Type": "application/json"})


def _message(response: httpx.Response) -> str:
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error


def test_bad_inputs_are_4xx_and_the_server_stays_healthy(server: Server) -> None:
    import openai

    failures = []
    for label, how, body, status, words in CASES:
        response = _send(server, how, body)
        is_json = response.headers.get("content-type", "").startswith("application/json")
        message = _message(response) if is_json else response.text
        if response.status_code != status or not all(w in message for w in words):
            failures.append(f"{label}: {response.status_code} {message[:300]!r}")
        elif how == "chat":  # the OpenAI error shape
            assert response.json()["error"]["type"] == "invalid_request_error", label
    assert not failures, "\n".join(failures)

    # the official client sees them as its typed errors
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=TOKEN, max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="scheme 'file'"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}])

    # still healthy, and a valid request still works through every door
    _healthy(server)
    ok = _send(server, "chat", _chat_body(max_tokens=4))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
    assert _send(server, "v1", {"instances": [{"prompt": "hi", "max_tokens": 4}]}).status_code == 200


def test_bearer_auth(server: Server) -> None:
    import openai

    body = _chat_body(max_tokens=4)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for path, payload in (("/openai/v1/chat/completions", body),
                              (f"/v1/models/{NAME}:predict", {"instances": [{"prompt": "x"}]}),
                              (f"/v2/models/{NAME}/infer", {"inputs": []})):
            response = httpx.post(server.url + path, json=payload, headers=headers, timeout=30)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10).status_code == 401
    ok = httpx.post(f"{server.url}/openai/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert ok.status_code == 200, ok.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}])
    metrics = httpx.get(f"{server.url}/metrics", timeout=10)  # Prometheus scrapes without a token
    assert metrics.status_code == 200 and "request_predict_seconds" in metrics.text
    assert "onevision_engine_steps_total" in metrics.text and "onevision_engine_rows" in metrics.text
    _healthy(server)


def test_bounded_load(server: Server) -> None:
    clients, duration = 8, 10.0
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def client(k: int, http: httpx.AsyncClient, deadline: float) -> None:
        i = 0
        while time.monotonic() < deadline:
            # half with the image, half text-only; different prompts, same sampling: they batch together
            body = _chat_body(max_tokens=16) if (k + i) % 2 else {
                "model": NAME, "messages": [{"role": "user", "content": f"Question {k}.{i}: {QUESTION}"}],
                "temperature": 0, "max_tokens": 16}
            start = time.monotonic()
            response = await http.post("/openai/v1/chat/completions", json=body)
            latencies.append(time.monotonic() - start)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            i += 1

    async def run() -> float:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=90, limits=limits) as http:
            start = time.monotonic()
            await asyncio.gather(*(client(k, http, start + duration) for k in range(clients)))
            return time.monotonic() - start

    elapsed = asyncio.run(run())
    ordered = sorted(latencies)
    p50, p99 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"\nload: {clients} clients x {duration:.0f} s -> {len(latencies)} requests in {elapsed:.1f} s, "
          f"{len(latencies) / elapsed:.1f} req/s, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"statuses {statuses}")
    assert not {s for s in statuses if s >= 500}, statuses
    assert statuses.get(200, 0) > 0
    _healthy(server)


# ---- OpenAI conventions (issue 17, point 5), through the official client ---------------------------------
def _openai(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=TOKEN, max_retries=0, timeout=60)


def test_openai_model_list(server: Server) -> None:
    import openai

    client = _openai(server)
    (card,) = client.models.list().data
    assert (card.id, card.object, card.owned_by) == (NAME, "model", "onevision-platform")
    assert 0 <= time.time() - card.created < 3600
    assert client.models.retrieve(NAME) == card
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' not found"):
        client.models.retrieve("gpt-4o")
    listed = httpx.get(f"{server.url}/openai/v1/models", headers=AUTH, timeout=10).json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [NAME]
    assert httpx.get(f"{server.url}/openai/v1/models", timeout=10).status_code == 401  # metadata needs the token


def test_openai_n_other_than_1_is_refused(server: Server) -> None:
    import openai

    client, messages = _openai(server), _chat_body()["messages"]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="n must be 1"):
            client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, n=5, stream=stream)
    assert len(client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, n=1).choices) == 1


def _streamed(client: Any, **kwargs: Any) -> tuple[str, str | None]:
    """The text and the last chunk's finish_reason of a streamed chat completion."""
    chunks = list(client.chat.completions.create(model=NAME, messages=_chat_body()["messages"], stream=True,
                                                 **kwargs))
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def test_openai_stream_finish_reason_is_exact(server: Server) -> None:
    client, messages = _openai(server), _chat_body()["messages"]
    plain = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=12)
    # the random model practically never emits <|im_end|>: its answer runs to max_tokens
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 12
    answer = plain.choices[0].message.content
    assert _streamed(client, temperature=0, max_tokens=12) == (answer, "length")
    # a stop string inside that answer: both answers are cut there and say "stop"
    middle = len(answer) // 2
    start = next(i for i in range(middle, len(answer) - 1) if not answer[i:i + 2].isspace() and
                 " " not in answer[i:i + 2])
    stop = answer[start:start + 2]
    cut = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=12, stop=stop)
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == answer.split(stop)[0].strip()
    assert _streamed(client, temperature=0, max_tokens=12, stop=stop) == (cut.choices[0].message.content, "stop")


def test_openai_seed_is_honoured_when_streaming(server: Server) -> None:
    client, messages = _openai(server), _chat_body()["messages"]
    sampling = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 16}
    first, _ = _streamed(client, seed=1234, **sampling)
    assert first and _streamed(client, seed=1234, **sampling)[0] == first
    plain = client.chat.completions.create(model=NAME, messages=messages, seed=1234, **sampling)
    assert plain.choices[0].message.content == first  # streamed or not, the same seed samples the same text
    assert _streamed(client, seed=4321, **sampling)[0] != first


def test_body_cap(server: Server) -> None:
    import openai

    url, headers = f"{server.url}/openai/v1/chat/completions", {**AUTH, "Content-Type": "application/json"}
    body = json.dumps(_chat_body(max_tokens=4)).encode()
    exact = body + b" " * (MAX_BODY_BYTES - len(body))  # JSON allows the padding: at the cap is accepted
    assert httpx.post(url, content=exact, headers=headers, timeout=60).status_code == 200
    over = httpx.post(url, content=exact + b" ", headers=headers, timeout=60)
    assert over.status_code == 413 and f"cap of {MAX_BODY_BYTES} bytes" in _message(over)

    def chunked(extra: bytes) -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield from (exact[i:i + 65536] for i in range(0, len(exact), 65536))
        yield extra

    assert httpx.post(url, content=chunked(b""), headers=headers, timeout=60).status_code == 200
    refused = httpx.post(url, content=chunked(b" "), headers=headers, timeout=60)
    assert refused.status_code == 413 and "so far" in _message(refused)
    # the official client: an image whose base64 alone is over the cap
    big = base64.b64encode(os.urandom(MAX_BODY_BYTES)).decode()
    with pytest.raises(openai.APIStatusError, match="max_body_bytes") as err:
        _openai(server).chat.completions.create(model=NAME, max_tokens=4, messages=[{"role": "user", "content": [
            _image(f"data:image/png;base64,{big}"), {"type": "text", "text": QUESTION}]}])
    assert err.value.status_code == 413
    _healthy(server)

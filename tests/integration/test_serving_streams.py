"""Streams do not block the KServe server (issue 18, part 2): the real server on loopback, the openai client.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/integration/test_serving_streams.py -s   # prints p99s

One server (the tiny random model, max batch 16, max_tokens up to 256, a token). Streamed requests
decode in the same running batch as plain ones, so 4 streams of 256 tokens must leave 8 plain clients'
p99 latency within 2x of their p99 without the streams; a client that disconnects mid-stream must free
its slot within one decoding step (the engine's own counters on /metrics say when the row left).
The random model practically never emits <|im_end|>: every answer runs to its max_tokens.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port_block
from tests.integration.test_serving_kserve import (  # noqa: F401 - model_dir is a fixture
    DATA_URL,
    QUESTION,
    model_dir,
    running,
)

TOKEN = "streams-test-token"
NAME = "onevision"
PLAIN_CLIENTS, PLAIN_REQUESTS, PLAIN_TOKENS = 8, 4, 16  # each plain client sends its requests one after another
STREAMS, STREAM_TOKENS = 4, 256


@pytest.fixture(scope="module")
def url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    port = free_port_block(1)
    log = tmp_path_factory.mktemp("kserve-streams") / "server.log"
    cmd = [sys.executable, "-m", "serving.kserve_server", "--model", str(model_dir), "--port", str(port),
           "--max-batch-size", "16", "--max-new-tokens", str(STREAM_TOKENS)]
    base = f"http://127.0.0.1:{port}"
    with running(cmd, base, log, env={"ONEVISION_SERVING_TOKEN": TOKEN}):
        yield base


def engine_metrics(url: str) -> dict[str, float]:
    """The engine's counters from /metrics (onevision_engine_<name>, counters without their _total)."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("onevision_engine_"):
            name, value = line.split()
            values[name.removeprefix("onevision_engine_").removesuffix("_total")] = float(value)
    return values


def messages(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}},
                                         {"type": "text", "text": f"{QUESTION} ({i})"}]}]


def client(url: str) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=TOKEN, max_retries=0, timeout=120)


async def plain_phase(url: str) -> list[float]:
    """PLAIN_CLIENTS clients, each sending PLAIN_REQUESTS requests in turn; every latency in seconds."""
    latencies: list[float] = []
    api = client(url)

    async def one(k: int) -> None:
        for i in range(PLAIN_REQUESTS):
            start = time.perf_counter()
            answer = await api.chat.completions.create(model=NAME, messages=messages(100 * k + i), temperature=0,
                                                       max_tokens=PLAIN_TOKENS)
            latencies.append(time.perf_counter() - start)
            assert answer.usage.completion_tokens <= PLAIN_TOKENS

    try:
        await asyncio.gather(*(one(k) for k in range(PLAIN_CLIENTS)))
    finally:
        await api.close()
    return latencies


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def test_streams_do_not_block_plain_requests(url: str) -> None:
    async def run() -> tuple[list[float], list[float], list[float], float, dict[str, float]]:
        await plain_phase(url)  # warm-up: the decoding thread, allocator, connections
        alone = await plain_phase(url)
        api = client(url)
        started = [asyncio.Event() for _ in range(STREAMS)]
        ended: list[float] = []

        async def stream(k: int) -> int:
            chunks = await api.chat.completions.create(model=NAME, messages=messages(1000 + k), temperature=0,
                                                       max_tokens=STREAM_TOKENS, stream=True)
            pieces = 0
            async for chunk in chunks:
                pieces += bool(chunk.choices and chunk.choices[0].delta.content)
                started[k].set()
            ended.append(time.perf_counter())
            return pieces

        streams = [asyncio.create_task(stream(k)) for k in range(STREAMS)]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)  # all four are decoding
            beside = await plain_phase(url)
            plain_done = time.perf_counter()
            during = engine_metrics(url)
            pieces = await asyncio.gather(*streams)
        finally:
            for task in streams:
                task.cancel()
            await api.close()
        assert all(p > STREAM_TOKENS // 4 for p in pieces), pieces  # they streamed as they decoded
        return alone, beside, ended, plain_done, during

    alone, beside, ended, plain_done, during = asyncio.run(run())
    print(f"\nplain p99 {p99(alone) * 1000:.0f} ms alone, {p99(beside) * 1000:.0f} ms beside {STREAMS} streams of "
          f"{STREAM_TOKENS} tokens (p50 {sorted(alone)[len(alone) // 2] * 1000:.0f} / "
          f"{sorted(beside)[len(beside) // 2] * 1000:.0f} ms); rows during {during['rows']:.0f}, "
          f"peak {during['peak_rows']:.0f}")
    assert min(ended) > plain_done  # the streams decoded through the whole second phase
    assert during["rows"] == STREAMS  # the plain requests left; the streams still decode
    assert during["peak_rows"] > STREAMS  # plain requests joined the batch beside the streams
    assert p99(beside) <= 2 * p99(alone), (p99(alone), p99(beside))


def test_a_disconnected_stream_frees_its_slot_within_one_step(url: str) -> None:
    import openai

    api = openai.OpenAI(base_url=f"{url}/openai/v1", api_key=TOKEN, max_retries=0, timeout=120)
    before = engine_metrics(url)
    chunks = api.chat.completions.create(model=NAME, messages=messages(7), temperature=0, max_tokens=STREAM_TOKENS,
                                         stream=True)
    seen = 0
    for chunk in chunks:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 3:
            break
    assert engine_metrics(url)["rows"] == 1
    chunks.close()  # the client goes away mid-stream: the connection closes
    deadline = time.monotonic() + 30
    while (after := engine_metrics(url))["rows"] and time.monotonic() < deadline:
        time.sleep(0.02)
    print(f"\ndisconnected after 3 pieces: the row left after {after['steps'] - before['steps']:.0f} steps "
          f"in all, cancel lag {after['cancel_lag_steps']:.0f} step(s)")
    assert after["rows"] == 0 and after["cancelled"] == before["cancelled"] + 1
    assert after["cancel_lag_steps"] <= 1  # steps it decoded after the server saw the disconnect
    assert after["steps"] - before["steps"] < STREAM_TOKENS // 2  # it did not run on to its max_tokens
    # and the server serves the next request
    assert api.chat.completions.create(model=NAME, messages=messages(8), max_tokens=4).choices[0].message.role == \
        "assistant"

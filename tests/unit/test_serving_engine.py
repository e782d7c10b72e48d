"""The serving engine's continuous batching: answers are the one-at-a-time answers (greedy and seeded
sampling), requests join and leave the running batch at each step, streams share it and a cancelled
stream leaves within one step, timeouts answer 504, over-long prompts 400 before the queue.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_serving_engine.py -q
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from typing import Any

import pytest
from PIL import Image

from serving.engine import Engine
from serving.requests import Limits, RequestError, parse_chat_request


@pytest.fixture(scope="module")
def engine(tiny_recipe) -> Engine:
    from model.builder import build_tiny

    model, processor = build_tiny(tiny_recipe)
    return Engine(model, processor, max_batch_size=4, max_wait_ms=50, limits=Limits(max_new_tokens=64),
                  context_length=1024)


def image_url(colour: tuple[int, int, int], size: int = 56) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(question: str, colour=(200, 20, 20), **extra) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(colour)}},
                                                      {"type": "text", "text": question}]}], "max_tokens": 6, **extra}


def test_batched_answers_are_the_one_at_a_time_answers(engine: Engine) -> None:
    requests = [parse_chat_request(chat(f"What is shape {i}?", (30 * i, 200, 10)), engine.limits) for i in range(6)]
    alone = [engine.generate_batch([r])[0] for r in requests]
    engine.peak_rows = 0

    async def together():
        return await asyncio.gather(*(engine.submit(r) for r in requests))

    batched = asyncio.run(together())
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in alone]
    assert engine.peak_rows == 4  # 6 requests, max_batch_size 4: they shared the batch, never more than 4


def test_the_decoding_loop_gives_transformers_generate_answers(engine: Engine) -> None:
    """RunningBatch (the engine's loop) and model.generation.generate (HF generate, what evaluation runs)."""
    from model.generation import generate

    requests = [parse_chat_request(chat(f"Which {i}?", (60 * i, 0, 99), max_tokens=12), engine.limits)
                for i in range(3)]
    items = [engine.prepare(r) for r in requests]
    expected = generate(engine.model, engine.processor, items, max_new_tokens=12)
    assert [c.text for c in engine.generate_batch(requests, items)] == expected


def test_requests_join_and_leave_the_running_batch_at_each_step(engine: Engine) -> None:
    """Different lengths, greedy and seeded sampling, arriving while others decode: each answer is its
    answer alone, a short request leaves as soon as it is done, and a late one joins the running batch."""
    bodies = [chat("long?", max_tokens=40), chat("short?", (10, 10, 200), max_tokens=3),
              chat("sampled?", (90, 90, 90), max_tokens=12, temperature=0.8, top_p=0.9, seed=7),
              chat("late?", (0, 120, 0), max_tokens=5)]
    requests = [parse_chat_request(b, engine.limits) for b in bodies]
    alone = [engine.generate_batch([r])[0] for r in requests]
    done: list[int] = []

    async def one(i: int, delay_steps: int):
        start = engine.steps_run
        while engine.steps_run < start + delay_steps:  # arrive while the others are decoding
            await asyncio.sleep(0.002)
        result = await engine.submit(requests[i])
        done.append(i)
        return result

    async def run():
        return await asyncio.gather(one(0, 0), one(1, 0), one(2, 0), one(3, 6))

    steps, prefills = engine.steps_run, engine.prefills_run
    results = asyncio.run(run())
    assert [(c.text, c.completion_tokens) for c in results] == [(c.text, c.completion_tokens) for c in alone]
    assert done[-1] == 0 and done.index(1) < done.index(3)  # the short one left early; the late one too
    assert engine.prefills_run - prefills == 2  # three started together, the late one joined at a step
    assert engine.steps_run - steps <= alone[0].completion_tokens + 1  # all within the long one's steps


def test_stop_strings_and_limits(engine: Engine) -> None:
    request = parse_chat_request(chat("Say something."), engine.limits)
    text = engine.generate_batch([request])[0].text
    assert len(text) > 2
    stop = text[1:3]
    stopped = parse_chat_request(chat("Say something.", stop=[stop]), engine.limits)
    cut = engine.generate_batch([stopped])[0]
    assert cut.text == text.split(stop)[0] and cut.finish_reason == "stop"

    async def streamed():
        return "".join([piece async for piece in engine.stream(stopped)])

    assert asyncio.run(streamed()) == cut.text  # no piece of the stop string reaches a stream


def test_a_streams_finish_reason_is_the_engines(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """"length" at max_tokens; "stop" on <|im_end|>, here a token of the greedy answer made the end token
    (the random model practically never emits <|im_end|> itself)."""
    request = parse_chat_request(chat("Finish?", max_tokens=6), engine.limits)

    async def streamed():
        stream = engine.stream(request)
        text = "".join([piece async for piece in stream])
        return text, stream.completion, list(stream._row.ids)

    text, completion, ids = asyncio.run(streamed())
    assert (completion.text, completion.finish_reason, completion.completion_tokens) == (text, "length", 6)
    k = next((i for i in range(1, len(ids)) if ids[i] not in ids[:i]), 0)  # its first occurrence ends the answer
    monkeypatch.setattr(engine, "end_id", ids[k])
    _, completion, _ = asyncio.run(streamed())
    assert (completion.finish_reason, completion.completion_tokens) == ("stop", k)


def test_over_long_prompt_is_400_before_queueing(engine: Engine) -> None:
    body = chat("word " * 1500)  # within the text budget (1024 tokens x 16 bytes), over the context
    with pytest.raises(RequestError) as err:
        asyncio.run(engine.submit(parse_chat_request(body, engine.limits)))
    assert err.value.status == 400 and "exceeds the context length" in err.value.message


def test_a_request_past_its_timeout_is_504(engine: Engine) -> None:
    request = parse_chat_request(chat("slow?", max_tokens=64), engine.limits)
    with pytest.raises(RequestError) as err:
        asyncio.run(engine.submit(request, timeout_s=0.001))
    assert err.value.status == 504


def test_streaming_yields_the_greedy_answer(engine: Engine) -> None:
    request = parse_chat_request(chat("Stream it."), engine.limits)
    expected = engine.generate_batch([request])[0]

    async def collect():
        stream = engine.stream(request)
        return [piece async for piece in stream], stream.completion

    pieces, completion = asyncio.run(collect())
    assert "".join(pieces) == expected.text and completion == expected


def test_a_stream_shares_the_batch_and_a_cancelled_one_leaves_within_a_step(engine: Engine) -> None:
    long_stream = parse_chat_request(chat("Go on.", max_tokens=64), engine.limits)
    plain = parse_chat_request(chat("Quick?", (5, 5, 5), max_tokens=4), engine.limits)
    expected = engine.generate_batch([plain])[0]

    async def run() -> tuple[Any, int, int, int]:
        stream = engine.stream(long_stream)
        await stream.__anext__()  # decoding
        answer = await engine.submit(plain)  # answered while the stream decodes: it joined the batch
        assert engine.rows == 1 and stream.completion is None
        cancelled, steps = engine.cancelled, engine.steps_run
        stream.cancel()
        while engine.rows:  # the decoding thread takes the row out at its next step
            await asyncio.sleep(0.001)
        return answer, engine.cancelled - cancelled, engine.steps_run - steps, engine.cancel_lag_steps

    answer, cancelled, steps_after, lag = asyncio.run(run())
    assert answer == expected and cancelled == 1
    assert lag <= 1 and steps_after <= 1  # its slot was free within one step, not after 64 tokens


def test_budgets_are_derived_from_the_model_unless_set(engine: Engine, tiny_recipe) -> None:
    from model.builder import build_tiny

    assert engine.limits.max_text_bytes == 1024 * 16 and engine.limits.max_messages == 512
    assert engine.limits.max_request_pixels == 4096 * 4096  # the tiny grid is far below the floor
    model, processor = build_tiny(tiny_recipe)
    assert Engine(model, processor, limits=Limits(max_text_bytes=99)).limits.max_text_bytes == 99


def test_streaming_prepares_off_the_event_loop(engine: Engine) -> None:
    """A heavy streamed request (a 4096x4096 noise image to decode and resize) must leave the loop free:
    a 10 ms heartbeat never stalls for long while it is prepared."""
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 255, (4096, 4096, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "?"}]}], "max_tokens": 2}
    request = parse_chat_request(body, Limits(max_media_bytes=64 << 20))

    async def run() -> tuple[float, float]:
        gaps, stop = [], asyncio.Event()

        async def heartbeat() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.05)  # the heartbeat is running before the request starts
        start = time.perf_counter()
        async for _ in engine.stream(request):
            pass
        took = time.perf_counter() - start
        stop.set()
        await beat
        return took, max(gaps)

    took, worst = asyncio.run(run())
    print(f"\nstreamed a 16.8 MP image in {took:.2f} s; worst event-loop stall {worst * 1000:.0f} ms")
    assert worst < max(0.25, took / 3), (took, worst)

"""One inference engine for every door (KServe v1/v2/OpenAI, Triton): continuous (token-level) batching.

    engine = Engine.load("s3://onevision/runs/tiny/r1/stage2_ov/hf", max_batch_size=8, max_wait_ms=10)
    result = await engine.submit(parse_chat_request(body, engine.limits))   # Completion(text, ...)
    async for piece in engine.stream(request): ...                           # text as it is decoded
    engine.generate_batch([request, ...])                                     # synchronous, no queue

One decoding thread owns the model and runs a batch of up to `max_batch_size` rows
(model.generation.RunningBatch). At every step, queued requests may join the batch (one prefill for
all of them; while rows decode, arrivals gather until half the free slots are asked for or the oldest
has waited `max_wait_ms`, since a prefill stalls every row), every row decodes one token, and a row leaves as soon as it is finished (<|im_end|>,
its own `max_tokens`, a stop string), cancelled (a stream's client went away, a caller stopped
waiting) or past its deadline, so its slot is free for the next step. Streamed and plain requests
share the queue and the batch: a stream gets its text piece by piece, a plain request its Completion
at the end. Each row has its own positions and sampling (greedy, or temperature/top_p with its own
seeded generator), so an answer is the same whatever shares the batch (tested).

When the batch is idle, a new request waits at most `max_wait_ms` for companions that are being
prepared (and not at all when none is), so a lone client pays no delay. The asyncio loop only queues:
tokenizing and the processor run in a thread, the model in the decoding thread, so health probes
answer while heavy requests are prepared. A request still queued past its `timeout_s` (or a plain one
not finished by then) is answered 504 and leaves; a prompt longer than the model's context is refused
with 400 before it reaches the model. Budgets the caller leaves unset in `limits` (text bytes,
messages, pixels) are derived from this model's context and AnyRes grid (serving.budgets).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model import chat
from model.generation import RunningBatch
from model.processing import SampleError, SampleProcessor
from serving.budgets import model_budgets
from serving.requests import GenerationRequest, Limits, RequestError


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def as_openai(self, model_name: str) -> dict[str, Any]:
        """The OpenAI chat.completion object of this answer (the serving route's body, the pyfunc's output)."""
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                             "finish_reason": self.finish_reason}],
                "usage": self.usage()}


class _Row:
    """One request in the engine: its prompt, the tokens decoded so far, and where its output goes."""

    def __init__(self, request: GenerationRequest, item: Any, deadline: float, streamed: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.request, self.item, self.deadline, self.streamed, self.loop = request, item, deadline, streamed, loop
        self.queued_at = time.monotonic()
        self.future: asyncio.Future | None = loop.create_future() if loop else None  # the Completion
        self.pieces: asyncio.Queue[str | None] | None = asyncio.Queue() if streamed else None
        self.ids: list[int] = []
        self.text = ""  # decoded so far, cut at a stop string
        self.sent = 0  # characters of the visible text already handed to the stream
        self.finish: str | None = None  # "stop" | "length" once finished
        self.error: Exception | None = None
        self.cancelled_step: int | None = None  # engine step when the caller went away
        self.started = False  # in the running batch (a stream past its first token has no deadline)
        self.generator: torch.Generator | None = None  # per row, so a seeded answer ignores its companions

    def visible(self, final: bool) -> str:
        """The text a client may see now: stripped like the final answer; while decoding, a trailing
        partial character, trailing space and a possible start of a stop string are held back."""
        text = self.text.lstrip()
        if final:
            return text.rstrip()
        text = text.rstrip("\ufffd").rstrip()
        held = max((k for stop in self.request.stop for k in range(1, len(stop)) if text.endswith(stop[:k])),
                   default=0)
        return text[: len(text) - held]

    def completion(self) -> Completion:
        return Completion(self.visible(True), len(self.item), len(self.ids), self.finish or "length")


class Engine:
    def __init__(self, model: Any, processor: Any, name: str = "onevision", max_batch_size: int = 8,
                 max_wait_ms: float = 10.0, timeout_s: float = 60.0, limits: Limits | None = None,
                 template: chat.Template = "qwen_1_5", context_length: int | None = None):
        self.model, self.processor, self.name = model.eval(), processor, name
        self.max_batch_size, self.max_wait_s, self.timeout_s = max_batch_size, max_wait_ms / 1000, timeout_s
        self.context_length = context_length or int(getattr(model.config.text_config, "max_position_embeddings", 32768))
        limits = limits or Limits()
        derived = model_budgets(model.config, self.context_length)
        self.limits = dataclasses.replace(limits, **{k: v for k, v in derived.items() if getattr(limits, k) is None})
        self.sample_processor = SampleProcessor(processor, template, 1 << 20, video_frames=self.limits.video_frames)
        self.end_id = processor.tokenizer.convert_tokens_to_ids(chat.IM_END)
        self._incoming: collections.deque[_Row] = collections.deque()
        self._wakeup = threading.Condition()  # guards _incoming and _closed; wakes the decoding thread
        self._thread: threading.Thread | None = None
        self._closed = False
        self._preparing = 0  # requests being validated/processed: companions about to join the queue
        self._lock = threading.Lock()  # one forward at a time: the model is not re-entrant
        # observables (read by /metrics and the tests)
        self.rows = 0  # requests in the running batch now
        self.peak_rows = 0
        self.steps_run = 0  # decoding steps (one token for every row)
        self.prefills_run = 0  # forwards that let requests join
        self.cancelled = 0  # rows that left before finishing (client gone, timeout)
        self.cancel_lag_steps = 0  # the most steps a cancelled row kept decoding after its cancel

    @classmethod
    def load(cls, model_uri: str, device_map: str | None = None, dtype: torch.dtype | None = None,
             **kwargs: Any) -> Engine:
        """The engine over an HF folder, placed on this process's GPUs in bf16 (several: device_map="auto")
        or on the CPU in fp32 (serving.placement); `dtype` (and `device_map`) given: exactly there."""
        from serving.placement import load_placed

        model, processor = load_placed(model_uri, device_map, dtype)
        return cls(model, processor, **kwargs)

    def stats(self) -> dict[str, int]:
        """The engine's counters, for metrics: rows decoding now, queued, steps, prefills, cancels."""
        return {"rows": self.rows, "queued": len(self._incoming), "peak_rows": self.peak_rows,
                "steps": self.steps_run, "prefills": self.prefills_run, "cancelled": self.cancelled,
                "cancel_lag_steps": self.cancel_lag_steps}

    # ---- synchronous core -------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> Any:
        """The processed prompt; RequestError 400 if it cannot be built or is over the context."""
        try:
            item = self.sample_processor.prompt(request.record, media=request.media)
        except SampleError as err:
            raise RequestError(400, f"cannot build the prompt: {err}") from None
        if len(item) + request.max_new_tokens > self.context_length:
            raise RequestError(400, f"prompt of {len(item)} tokens + max_tokens {request.max_new_tokens} exceeds "
                                    f"the context length {self.context_length}")
        return item

    def generate_batch(self, requests: list[GenerationRequest], items: list[Any] | None = None) -> list[Completion]:
        """Generate for requests as one batch, outside the queue (each row leaves when it finishes)."""
        items = items or [self.prepare(r) for r in requests]
        rows = [_Row(r, item, float("inf")) for r, item in zip(requests, items, strict=True)]
        batch = RunningBatch(self.model, self.processor.tokenizer.pad_token_id)
        with self._lock:
            live = self._advance(batch, [], rows)
            while live:
                live = self._advance(batch, live, [])
        for row in rows:
            if row.error is not None:
                raise row.error
        return [row.completion() for row in rows]

    def _advance(self, batch: RunningBatch, rows: list[_Row], joining: list[_Row]) -> list[_Row]:
        """One scheduling step: gone rows leave, `joining` rows are prefilled, every row decodes one token.
        Returns the rows still decoding, in the batch's order. Call with the model lock held."""
        rows = self._leave(batch, rows)
        for row in [r for r in joining if self._gone(r)]:  # cancelled or expired while queued
            self.cancelled += 1
            self._publish(row, done=True)
        joining = [r for r in joining if r.cancelled_step is None]
        if joining:
            logits = batch.join([r.item for r in joining])  # (n, V)
            self.prefills_run += 1
            for row, token in zip(joining, self._choose(logits, joining), strict=True):
                row.started = True
                self._take(row, token)
            rows = self._leave(batch, rows + joining)  # a row may finish on its first token
        self.peak_rows = max(self.peak_rows, len(batch))
        if rows:
            logits = batch.step([r.ids[-1] for r in rows])  # (B, V)
            self.steps_run += 1
            for row, token in zip(rows, self._choose(logits, rows), strict=True):
                self._take(row, token)
            rows = self._leave(batch, rows)
        return rows

    def _gone(self, row: _Row) -> bool:
        """Cancelled, or past its deadline (a stream only until its first token: its client sees progress)."""
        if row.cancelled_step is None and row.deadline < time.monotonic() and not (row.streamed and row.started):
            row.error = RequestError(504, f"generation did not finish within {self.timeout_s:.0f} s")
            row.cancelled_step = self.steps_run
        return row.cancelled_step is not None

    def _leave(self, batch: RunningBatch, rows: list[_Row]) -> list[_Row]:
        """Finished and gone rows leave the batch (their caller is told); the others, in order."""
        keep, left = [], []
        for index, row in enumerate(rows):
            if row.finish is None and self._gone(row):
                self.cancelled += 1
                self.cancel_lag_steps = max(self.cancel_lag_steps, self.steps_run - (row.cancelled_step or 0))
            (left if row.finish is not None or row.cancelled_step is not None else keep).append(index)
        batch.keep(keep)
        self.rows = len(keep)  # before anyone is told: a caller that sees its answer sees its slot free
        for index in left:
            self._publish(rows[index], done=True)
        return [rows[i] for i in keep]

    def _choose(self, logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
        """The next token of each row (B,): argmax, or sampled with the row's temperature and top_p."""
        tokens = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            r = row.request
            if r.greedy:
                continue
            if row.generator is None:
                row.generator = torch.Generator(device=logits.device)
                if r.seed is None:
                    row.generator.seed()
                else:
                    row.generator.manual_seed(r.seed)
            probs = torch.softmax(logits[i] / r.temperature, dim=-1)  # (V,)
            if r.top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(-1) - ordered > r.top_p
                probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
            tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        return tokens

    def _take(self, row: _Row, token: int) -> None:
        """Append a decoded token to its row: finish on <|im_end|>, max_tokens or a stop string; stream it."""
        if token == self.end_id:
            row.finish = "stop"
        else:
            row.ids.append(token)
            if len(row.ids) >= row.request.max_new_tokens:
                row.finish = "length"
        if row.finish is None and not row.streamed and not row.request.stop:
            return  # nobody reads the text before the end: decode it once, then
        row.text = self.processor.tokenizer.decode(row.ids, skip_special_tokens=True)
        cuts = [row.text.index(s) for s in row.request.stop if s in row.text]
        if cuts:
            row.text, row.finish = row.text[: min(cuts)], "stop"
        elif row.finish is None:
            self._publish(row, done=False)

    def _publish(self, row: _Row, done: bool) -> None:
        """Hand a row's new text (streams) and, once done, its Completion or error to its event loop."""
        if row.loop is None:
            return
        piece = ""
        if row.pieces is not None and row.error is None and row.cancelled_step is None:
            visible = row.visible(final=done)
            piece, row.sent = visible[row.sent:], max(row.sent, len(visible))
        if not piece and not done:
            return
        result: Any = row.error if row.error is not None else row.completion() if done else None

        def deliver() -> None:  # on the row's event loop
            if piece and row.pieces is not None:
                row.pieces.put_nowait(piece)
            if done:
                if row.future is not None and not row.future.done():
                    if isinstance(result, Exception):
                        row.future.set_exception(result)
                    else:
                        row.future.set_result(result)
                if row.pieces is not None:
                    row.pieces.put_nowait(None)

        try:
            row.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # its event loop is closed: nobody is waiting any more
            if row.cancelled_step is None:
                row.cancelled_step = self.steps_run

    # ---- the queue and the decoding thread --------------------------------------------------------
    async def _enqueue(self, request: GenerationRequest, timeout_s: float | None, streamed: bool) -> _Row:
        """Validate and process a request off the event loop, then queue it for the decoding thread."""
        self._preparing += 1
        try:
            item = await asyncio.to_thread(self.prepare, request)  # 400s before queueing
        finally:
            self._preparing -= 1
        row = _Row(request, item, time.monotonic() + (timeout_s or self.timeout_s), streamed,
                   asyncio.get_running_loop())
        with self._wakeup:
            if self._closed:
                raise RequestError(503, "the engine is shut down")
            self._incoming.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._decode_loop, name=f"engine-{self.name}", daemon=True)
                self._thread.start()
            self._wakeup.notify()
        return row

    def _cancel(self, row: _Row) -> None:
        """The caller went away: the row leaves the batch at the next step (its slot is freed)."""
        if row.cancelled_step is None and row.finish is None:
            row.cancelled_step = self.steps_run

    async def submit(self, request: GenerationRequest, timeout_s: float | None = None) -> Completion:
        """Queue a validated request; resolves when its row has finished (RequestError 504 on timeout)."""
        row = await self._enqueue(request, timeout_s, streamed=False)
        assert row.future is not None
        try:
            return await asyncio.wait_for(asyncio.shield(row.future), max(0.0, row.deadline - time.monotonic()))
        except TimeoutError:
            self._cancel(row)
            raise RequestError(504, f"generation did not finish within {timeout_s or self.timeout_s:.0f} s") from None
        except asyncio.CancelledError:  # the caller's task was cancelled (client gone): free the slot
            self._cancel(row)
            raise

    def stream(self, request: GenerationRequest) -> Stream:
        """The text of one request as it is decoded (`stream: true`), batched with everything else."""
        return Stream(self, request)

    def _decode_loop(self) -> None:
        batch = RunningBatch(self.model, self.processor.tokenizer.pad_token_id)
        rows: list[_Row] = []
        while True:
            with self._wakeup:
                while not self._incoming and not rows and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    break
                if not rows:  # idle: wait briefly for companions being prepared, so they share a prefill
                    until = time.monotonic() + self.max_wait_s
                    while (self._preparing and len(self._incoming) < self.max_batch_size
                           and (remaining := until - time.monotonic()) > 0):
                        self._wakeup.wait(remaining)
                joining = [self._incoming.popleft() for _ in range(self._admit(rows))]
            try:
                with self._lock:
                    rows = self._advance(batch, rows, joining)
            except Exception as err:  # noqa: BLE001  a model failure fails the rows it was decoding, not the server
                for row in rows + joining:
                    if row.finish is None and row.error is None:
                        row.error = err
                    self._publish(row, done=True)  # a caller already answered ignores it
                rows, self.rows = [], 0
                batch = RunningBatch(self.model, self.processor.tokenizer.pad_token_id)
        for row in rows + list(self._incoming):
            row.error = RequestError(503, "the engine is shut down")
            self._publish(row, done=True)

    def _admit(self, rows: list[_Row]) -> int:
        """How many queued requests join at this step. A prefill stalls every decoding row for a few
        steps' time, and prefilling several requests at once costs little more than one, so while rows
        decode, arrivals gather until half the free slots are asked for or the oldest has waited
        `max_wait_ms`. Call with `_wakeup` held."""
        free = min(self.max_batch_size - len(rows), len(self._incoming))
        if not rows or not free:
            return free
        waited = time.monotonic() - self._incoming[0].queued_at
        return free if free >= max(1, (self.max_batch_size - len(rows)) // 2) or waited >= self.max_wait_s else 0

    async def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)


class Stream:
    """Text pieces of one streamed request as its row decodes (an async iterator); `completion` at the end.

    The first `__anext__` prepares the request (RequestError 4xx before any piece); `cancel()` (or
    `aclose()`) takes an unfinished request out of the batch at the next decoding step. Joined, the
    pieces are the Completion's text.
    """

    def __init__(self, engine: Engine, request: GenerationRequest):
        self._engine, self._request = engine, request
        self._row: _Row | None = None

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> str:
        if self._row is None:
            self._row = await self._engine._enqueue(self._request, None, streamed=True)
        assert self._row.pieces is not None
        piece = await self._row.pieces.get()
        if piece is None:
            self._row.pieces.put_nowait(None)  # a later __anext__ ends too
            if self._row.error is not None:
                raise self._row.error
            raise StopAsyncIteration
        return piece

    @property
    def completion(self) -> Completion | None:
        """Token count and finish reason, once the stream has ended."""
        row = self._row
        return row.completion() if row is not None and row.finish is not None and row.error is None else None

    def cancel(self) -> None:
        """Synchronous, so it also works inside a cancelled task (a client that disconnected)."""
        if self._row is not None:
            self._engine._cancel(self._row)

    async def aclose(self) -> None:
        self.cancel()

"""One inference engine for every door (KServe v1/v2/OpenAI, Triton): a queue with dynamic batching.

    engine = Engine.load("s3://onevision/runs/tiny/r1/stage2_ov/hf", max_batch_size=8, max_wait_ms=10)
    result = await engine.submit(parse_chat_request(body, engine.limits))   # Completion(text, ...)
    engine.generate_batch([request, ...])                                     # synchronous, no queue

Requests wait at most `max_wait_ms` for companions (and not at all when none is queued or being
prepared, so a lone client pays no delay), then up to `max_batch_size` of them with the same
sampling settings run as one left-padded batch (model.generation, the code evaluation uses, so a
greedy answer is the same whatever the batch: tested). One worker thread owns the model; the asyncio
loop only queues: every expensive step (decoding, tokenizing, the processor) runs in a thread, for
streamed requests too, so health probes answer while a heavy request is prepared. A request past its
`timeout_s` is answered 504 and dropped from the queue; a prompt longer than the model's context is
refused with 400 before it reaches the model. Budgets the caller leaves unset in `limits` (text bytes,
messages, pixels) are derived from this model's context and AnyRes grid (serving.budgets).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from model import chat
from model.generation import collate_left
from model.processing import SampleError, SampleProcessor
from serving.budgets import model_budgets
from serving.requests import GenerationRequest, Limits, RequestError


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class _Pending:
    request: GenerationRequest
    item: Any  # the processed prompt
    future: asyncio.Future
    deadline: float


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
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._preparing = 0  # requests being validated/processed: companions about to join the queue
        self._lock = threading.Lock()  # one generate at a time: the model is not re-entrant
        self.batches_run = 0

    @classmethod
    def load(cls, model_uri: str, **kwargs: Any) -> Engine:
        from model.builder import load_pretrained

        model, processor = load_pretrained(model_uri)
        return cls(model, processor, **kwargs)

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

    @torch.no_grad()
    def generate_batch(self, requests: list[GenerationRequest], items: list[Any] | None = None) -> list[Completion]:
        """Generate for requests that share sampling settings, as one batch."""
        items = items or [self.prepare(r) for r in requests]
        first = requests[0]
        batch = collate_left(items, self.processor.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        # never past the context: the longest (left-padded) prompt bounds what the whole batch may add
        budget = self.context_length - batch["input_ids"].shape[1]
        kwargs: dict[str, Any] = {"do_sample": not first.greedy,
                                  "max_new_tokens": max(1, min(budget, max(r.max_new_tokens for r in requests)))}
        if not first.greedy:
            kwargs.update(temperature=first.temperature, top_p=first.top_p)
            if first.seed is not None:
                torch.manual_seed(first.seed)
        with self._lock:
            out = self.model.generate(**batch, eos_token_id=self.end_id, pad_token_id=self.processor.tokenizer.pad_token_id,
                                      **kwargs)
            self.batches_run += 1
        new = out[:, batch["input_ids"].shape[1]:]
        completions = []
        for row, request in enumerate(requests):
            ids = new[row].tolist()
            finished = self.end_id in ids[: request.max_new_tokens]
            ids = ids[: ids.index(self.end_id)] if finished else ids[: request.max_new_tokens]
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
            for stop in request.stop:
                if stop in text:
                    text, finished = text.split(stop)[0], True
            completions.append(Completion(text, len(items[row]), len(ids), "stop" if finished else "length"))
        return completions

    # ---- asynchronous queue -----------------------------------------------------------------------
    async def submit(self, request: GenerationRequest, timeout_s: float | None = None) -> Completion:
        """Queue a validated request; resolves when its batch has run (RequestError 504 on timeout)."""
        self._preparing += 1
        try:
            item = await asyncio.to_thread(self.prepare, request)  # 400s before queueing; off the event loop
        finally:
            self._preparing -= 1
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first request, or a new event loop: the queue belongs to its loop
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._serve())
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        pending = _Pending(request, item, loop.create_future(), deadline)
        await self._queue.put(pending)
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise RequestError(504, f"generation did not finish within {timeout_s or self.timeout_s:.0f} s") from None

    async def _serve(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            start = time.monotonic()
            while len(batch) < self.max_batch_size:
                remaining = self.max_wait_s - (time.monotonic() - start)
                if remaining <= 0 or (self._queue.empty() and not self._preparing):
                    break  # nobody else is on the way: waiting would only add latency
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            now = time.monotonic()
            live = [p for p in batch if not p.future.done() and p.deadline > now]
            groups: dict[tuple, list[_Pending]] = {}
            for p in live:  # one generate call per sampling setting
                r = p.request
                groups.setdefault((r.greedy, r.temperature, r.top_p, r.seed), []).append(p)
            for group in groups.values():
                try:
                    results = await asyncio.to_thread(self.generate_batch, [p.request for p in group],
                                                      [p.item for p in group])
                except Exception as err:  # a model failure fails its batch, not the server
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(err)
                    continue
                for p, result in zip(group, results):
                    if not p.future.done():
                        p.future.set_result(result)

    def _stream_inputs(self, request: GenerationRequest) -> dict[str, Any]:
        """One request's model inputs (prepare + collate), on the model's device."""
        item = self.prepare(request)
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in collate_left([item], self.processor.tokenizer.pad_token_id).items()}

    async def stream(self, request: GenerationRequest) -> Any:
        """Async iterator of text pieces for one request (`stream: true`), generated token by token
        outside the batching queue; the model lock keeps it from overlapping a batch."""
        from transformers import TextIteratorStreamer

        batch = await asyncio.to_thread(self._stream_inputs, request)  # decode + tokenize: off the event loop
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=self.timeout_s)
        kwargs: dict[str, Any] = {"do_sample": not request.greedy, "max_new_tokens": request.max_new_tokens}
        if not request.greedy:
            kwargs.update(temperature=request.temperature, top_p=request.top_p)

        def run() -> None:
            with self._lock, torch.no_grad():
                self.model.generate(**batch, streamer=streamer, eos_token_id=self.end_id,
                                    pad_token_id=self.processor.tokenizer.pad_token_id, **kwargs)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        sentinel = object()
        emitted = ""
        while True:
            piece = await asyncio.to_thread(next, streamer, sentinel)
            if piece is sentinel:
                break
            emitted += piece
            cut = [emitted.index(s) for s in request.stop if s in emitted]
            if cut:  # a stop string: emit up to it and stop listening (the thread finishes on its own)
                keep = len(piece) - (len(emitted) - min(cut))
                if keep > 0:
                    yield piece[:keep]
                break
            if piece:
                yield piece
        await asyncio.to_thread(thread.join)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

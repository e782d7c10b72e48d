"""KServe model server: v1, Open Inference Protocol v2 and an OpenAI chat route, over one Engine.

    python -m serving.kserve_server --model s3://onevision/runs/tiny/r1/stage2_ov/hf --port 8080
    ONEVISION_SERVING_TOKEN=secret python -m serving.kserve_server --model /models/hf --port 8080 --host 0.0.0.0
    serve_kserve("/models/hf", port=8080)                      # the same, from Python (blocking)

    curl -s 127.0.0.1:8080/v1/models/onevision:predict -d '{"instances": [{"prompt": "Colour?", "image": "<b64>"}]}'
    curl -s 127.0.0.1:8080/v2/models/onevision/infer \
         -d '{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Colour?"]}]}'
    openai.OpenAI(base_url="http://127.0.0.1:8080/openai/v1", api_key="secret").chat.completions.create(...)

Routes: KServe's own (`/`, `/metrics` Prometheus with the engine's `onevision_engine_*` counters, `/v1/models/<name>:predict`, `/v2/health/{live,ready}`,
`/v2/models/<name>/infer`, ...) plus `POST /openai/v1/chat/completions` (JSON or `stream: true` SSE) and
`GET /openai/v1/models[/<name>]` (OpenAI's model list and model objects). KServe 0.21's OpenAI routes and
their data models (`kserve.protocol.rest.openai.types`, whose `Model`/`ModelList` come from vllm) import
vllm and register only for its `OpenAIModel`s, so these are our own FastAPI routes on KServe's app, in the
same shapes as KServe's `models` endpoint. A body over `Limits.max_body_bytes` is refused with 413 before
it is parsed (serving.auth.BodyCap). Every door
parses through serving.requests and queues on the same Engine, so a greedy answer is the same whichever
door asked (tested). A bad request is a 4xx naming the problem (RequestError's status) and never
reaches the model. With a token (`ONEVISION_SERVING_TOKEN` or `token=`) every route except liveness,
readiness and metrics needs `Authorization: Bearer <token>`, so kubelet probes and Prometheus need none.

KServe 0.21 binds its REST server to 0.0.0.0 unconditionally; we set the host (default 127.0.0.1) on its
uvicorn config before it starts, and leave gRPC off (it binds [::] and we serve no gRPC clients).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import kserve
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from kserve.protocol.infer_type import (
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
)

from serving.auth import TOKEN_ENV, BearerAuth, BodyCap
from serving.engine import Completion, Engine
from serving.requests import CallBudget, Limits, RequestError, parse_chat_request

MAX_INSTANCES = 32  # per v1/v2 request: one HTTP call must not fill the queue for everyone else
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "stop", "seed")


class OneVisionModel(kserve.Model):
    """A KServe model around an Engine: v1 `{"instances": [...]}` and v2 InferRequest in `predict`."""

    def __init__(self, name: str, engine: Engine | None = None, model_uri: str | None = None,
                 **engine_kwargs: Any):
        super().__init__(name)
        # Not `self.engine`: KServe reads a truthy `engine` attribute as "start my own engine server".
        self.onevision = engine
        self._model_uri, self._engine_kwargs = model_uri, engine_kwargs
        self.created = int(time.time())  # the OpenAI model object's `created`: when this server loaded it

    def load(self) -> bool:
        if self.onevision is None:
            if self._model_uri is None:
                raise ValueError("OneVisionModel needs an engine or a model_uri")
            self.onevision = Engine.load(self._model_uri, name=self.name, **self._engine_kwargs)
        self.created = int(time.time())
        self.ready = True
        return self.ready

    @property
    def limits(self) -> Limits:
        return self._engine.limits

    @property
    def _engine(self) -> Engine:
        if self.onevision is None:
            raise RuntimeError(f"model {self.name} is not loaded")
        return self.onevision

    async def predict(self, payload: dict | InferRequest,
                      headers: dict[str, str] | None = None) -> dict | InferResponse:
        if isinstance(payload, InferRequest):
            return await self._predict_v2(payload)
        return await self._predict_v1(payload)

    # ---- v1: {"instances": [chat body | {"prompt", "image"}]} ---------------------------------------
    async def _predict_v1(self, payload: Any) -> dict[str, Any]:
        if isinstance(payload, (bytes, str)):  # KServe passes the body through undecoded unless it is sent as JSON
            try:
                payload = await asyncio.to_thread(json.loads, payload)  # a big body must not stall the probes
            except (ValueError, UnicodeDecodeError) as err:
                raise RequestError(400, f"malformed JSON body: {err}") from None
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not instances:
            raise RequestError(400, 'v1 body must be {"instances": [...]} with at least one instance')
        completions = await self._generate(instances, "instances")
        return {"predictions": [{"text": c.text, "finish_reason": c.finish_reason, "usage": c.usage()}
                                for c in completions]}

    # ---- v2: BYTES "text" (+ "image") or BYTES "request" (JSON chat bodies) -------------------------
    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        inputs = {i.name: i for i in request.inputs}
        # reading the tensors and parsing JSON bodies is per byte: off the event loop, like the rest
        bodies = await asyncio.to_thread(self._v2_bodies, request, inputs)
        completions = await self._generate(bodies, "request" if "request" in inputs else "text")
        n = len(completions)
        outputs = [InferOutput("text", [n], "BYTES", [c.text for c in completions]),
                   InferOutput("finish_reason", [n], "BYTES", [c.finish_reason for c in completions])]
        usage = {"prompt_tokens": sum(c.prompt_tokens for c in completions),
                 "completion_tokens": sum(c.completion_tokens for c in completions)}
        return InferResponse(request.id or str(uuid.uuid4()), self.name, outputs, parameters=usage)

    @staticmethod
    def _v2_bodies(request: InferRequest, inputs: dict[str, InferInput]) -> list[Any]:
        params = dict(request.parameters or {})
        sampling = {k: params[k] for k in SAMPLING_KEYS if k in params}
        if "request" in inputs:
            bodies = []
            for i, raw in enumerate(_strings(inputs["request"])):
                try:
                    body = json.loads(raw)
                except ValueError as err:
                    raise RequestError(400, f"request[{i}]: not JSON ({err})") from None
                # request parameters are defaults; the body's own sampling fields win
                bodies.append({**sampling, **body} if isinstance(body, dict) else body)
        elif "text" in inputs:
            texts = _strings(inputs["text"])
            images = _strings(inputs["image"]) if "image" in inputs else [""] * len(texts)
            if len(images) != len(texts):
                raise RequestError(400, f"input 'image' has {len(images)} element(s), 'text' has {len(texts)}: "
                                        "one image (or '') per prompt")
            bodies = [{"prompt": t, "image": im or None, **sampling} for t, im in zip(texts, images)]
        else:
            raise RequestError(400, f"v2 inputs must include BYTES 'text' (+ optional 'image') or 'request'; "
                                    f"got {sorted(inputs)}")
        return bodies

    async def _generate(self, items: list[Any], where: str) -> list[Completion]:
        """Chat bodies or {"prompt", "image"} items -> completions; errors are prefixed `<where>[i]: `."""
        if len(items) > MAX_INSTANCES:
            raise RequestError(400, f"{where}: {len(items)} items, at most {MAX_INSTANCES} per request")
        # Validate every item before queueing any, so a bad item costs no generation; the items share one
        # pixel budget for the call.
        requests, call = [], CallBudget()
        for i, item in enumerate(items):
            try:
                # in a thread: decoding images must not stall the event loop (and with it the probes)
                requests.append(await asyncio.to_thread(parse_chat_request, _instance_body(item), self.limits, call))
            except RequestError as err:
                raise RequestError(err.status, f"{where}[{i}]: {err.message}") from None
        return list(await asyncio.gather(*(self._engine.submit(r) for r in requests)))


def _instance_body(instance: Any) -> dict[str, Any]:
    """An item -> an OpenAI chat body: as is if it has `messages`; `{"prompt", "image"?}` converted."""
    if not isinstance(instance, dict):
        raise RequestError(400, "must be an object (a chat body or {'prompt': ..., 'image': ...})")
    if "messages" in instance:
        return instance
    prompt = instance.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(400, "needs 'messages' or a string 'prompt'")
    images = instance.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise RequestError(400, "image must be a base64 string, a data: URL or a list of them")
    # Images first, then the text: the "<image>\n<question>" layout LLaVA data uses.
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    content.append({"type": "text", "text": prompt})
    rest = {k: v for k, v in instance.items() if k not in ("prompt", "image")}
    return {**rest, "messages": [{"role": "user", "content": content}]}


def _strings(tensor: InferInput) -> list[str]:
    """A BYTES input's elements as str, whether it came as JSON strings or binary data."""
    if tensor.datatype != "BYTES":
        raise RequestError(400, f"input {tensor.name!r} must be BYTES, not {tensor.datatype}")
    try:
        values = tensor.as_numpy().ravel().tolist()
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"input {tensor.name!r}: cannot read as UTF-8 strings ({err})") from None


# ---- OpenAI chat route ------------------------------------------------------------------------------
def _openai_error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


OWNED_BY = "onevision-platform"  # the OpenAI model object's `owned_by`


def add_openai_route(app: FastAPI, model: OneVisionModel) -> None:
    """POST /openai/v1/chat/completions on `app`, answered by `model`'s engine, and GET /openai/v1/models
    (the list an OpenAI client reads to find the served model) and /openai/v1/models/<name>."""

    def card() -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": model.created, "owned_by": OWNED_BY}

    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [card()]})

    async def retrieve_model(name: str) -> JSONResponse:
        if name != model.name:
            return _openai_error(404, f"model {name!r} not found; this server serves {model.name!r}")
        return JSONResponse(card())

    async def chat_completions(request: Request) -> Response:
        try:
            body = await asyncio.to_thread(json.loads, await request.body())  # off the loop: bodies can be big
        except (ValueError, UnicodeDecodeError) as err:
            return _openai_error(400, f"malformed JSON body: {err}")
        if isinstance(body, dict) and body.get("model") not in (None, model.name):
            return _openai_error(404, f"model {body.get('model')!r} not found; this server serves {model.name!r}")
        try:
            generation = await asyncio.to_thread(parse_chat_request, body, model.limits)  # decodes images
            if generation.stream:
                return await _stream_response(model, generation)
            completion = await model._engine.submit(generation)
        except RequestError as err:
            return _openai_error(err.status, err.message)
        return JSONResponse(completion.as_openai(model.name))

    app.add_api_route("/openai/v1/chat/completions", chat_completions, methods=["POST"], response_model=None)
    app.add_api_route("/openai/v1/models", list_models, methods=["GET"], response_model=None)
    app.add_api_route("/openai/v1/models/{name:path}", retrieve_model, methods=["GET"], response_model=None)


async def _stream_response(model: OneVisionModel, generation: Any) -> Response:
    """SSE chunks of a streamed request; its row decodes in the engine's running batch with every other
    request, and a client that disconnects cancels it at the next decoding step."""
    pieces = model._engine.stream(generation)
    try:  # the first piece runs prepare(): a bad request is still a plain 4xx, not a broken stream
        first = [await pieces.__anext__()]
    except StopAsyncIteration:
        first = []
    except BaseException:
        pieces.cancel()
        raise
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        chunk = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model.name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(chunk)}\n\n"

    async def events() -> AsyncIterator[str]:
        # Joined, the engine's pieces are the JSON answer's text (stripped, cut at a stop string).
        try:
            yield event({"role": "assistant", "content": ""})
            async for piece in _chain(first, pieces):
                yield event({"content": piece})
            completion = pieces.completion  # the engine's own reason: "length" at max_tokens, else "stop"
            if completion is None:  # only a row cancelled here (its client went away) ends unfinished
                return
            yield event({}, completion.finish_reason)
            yield "data: [DONE]\n\n"
        finally:  # also on a disconnect (Starlette cancels this task): the row leaves the batch
            pieces.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chain(first: list[str], rest: AsyncIterator[str]) -> AsyncIterator[str]:
    for piece in first:
        yield piece
    async for piece in rest:
        yield piece


class EngineMetrics:
    """Prometheus collector over the engine's counters (`GET /metrics`): rows decoding now, queued,
    decoding steps, prefills, requests that left early, and the most steps a cancelled row kept decoding."""

    HELP: ClassVar[dict[str, tuple[str, str]]] = {
            "rows": ("gauge", "requests decoding in the running batch"),
            "queued": ("gauge", "requests waiting to join the running batch"),
            "peak_rows": ("gauge", "the most requests decoding at once so far"),
            "steps": ("counter", "decoding steps run (one token for every row)"),
            "prefills": ("counter", "forwards that let queued requests join the batch"),
            "cancelled": ("counter", "requests that left the batch unfinished (client gone, timeout)"),
            "cancel_lag_steps": ("gauge", "the most steps a cancelled request kept decoding after its cancel")}

    def __init__(self) -> None:
        self.model: OneVisionModel | None = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engine = self.model.onevision if self.model is not None else None
        if engine is None:
            return
        for key, value in engine.stats().items():
            kind, text = self.HELP[key]
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"onevision_engine_{key}", text, value=value)


_METRICS = EngineMetrics()


# ---- auth, errors, server ---------------------------------------------------------------------------
async def _request_error_handler(_: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestError)
    # {"error": message}: KServe's own error shape, which its InferenceRESTClient reports.
    return JSONResponse({"error": err.message}, status_code=err.status)


def install(app: FastAPI, model: OneVisionModel, token: str | None = None) -> None:
    """Our additions to KServe's app: the OpenAI routes, RequestError -> its status, the body cap
    (the model's `limits.max_body_bytes`), optional auth."""
    add_openai_route(app, model)
    from prometheus_client import REGISTRY

    if _METRICS.model is None:  # one collector per process; a later install points it at its model
        REGISTRY.register(_METRICS)
    _METRICS.model = model
    app.add_exception_handler(RequestError, _request_error_handler)
    app.add_middleware(BodyCap, max_bytes=model.limits.max_body_bytes)
    if token:  # added last, so it runs first: no token, no body read
        app.add_middleware(BearerAuth, token=token)


class _NotOurOpenAIRoute(logging.Filter):
    """Drops KServe's "OpenAI endpoints not registered" (its vllm-backed routes): ours is registered."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "OpenAI endpoints not registered"


class _HostModelServer(kserve.ModelServer):
    """kserve.ModelServer whose REST server binds `host` instead of the hard-coded 0.0.0.0, and that
    prints `announce` once it listens."""

    def __init__(self, host: str, announce: str = "", **kwargs: Any):
        super().__init__(**kwargs)
        self.host, self.announce = host, announce

    async def _serve(self) -> None:
        if self._rest_server is not None:  # created by start(); uvicorn reads the host when it binds
            self._rest_server.config.host = self.host
        announcing = asyncio.ensure_future(self._announce())
        try:
            await super()._serve()
        finally:
            announcing.cancel()

    async def _announce(self) -> None:
        uvicorn_server = getattr(self._rest_server, "_server", None)
        while uvicorn_server is not None and not uvicorn_server.started:
            await asyncio.sleep(0.05)
        if self.announce:
            print(self.announce, flush=True)


def serve_kserve(model_uri: str, port: int, host: str = "127.0.0.1", name: str = "onevision",
                 max_batch_size: int = 8, max_wait_ms: float = 10, token: str | None = None,
                 limits: Limits | None = None, timeout_s: float = 60.0) -> None:
    """Load the model and serve it until SIGTERM/SIGINT (blocking). `token` falls back to $ONEVISION_SERVING_TOKEN."""
    from kserve.model_server import app

    model = OneVisionModel(name, model_uri=model_uri, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                           timeout_s=timeout_s, limits=limits)
    model.load()
    install(app, model, token if token is not None else os.environ.get(TOKEN_ENV) or None)
    logging.getLogger("kserve").addFilter(_NotOurOpenAIRoute())
    announce = (f"kserve     serving {model_uri} as {name} on http://{host}:{port} "
                f"(OpenAI base http://{host}:{port}/openai/v1; Ctrl-C stops)")
    # One worker: the engine (and its model) lives in this process; gRPC off (it would bind [::]).
    _HostModelServer(host, announce, http_port=port, workers=1, enable_grpc=False).start([model])


def main(argv: list[str] | None = None) -> None:
    # Flag names must not be prefixes of KServe's own flags: kserve parses sys.argv (parse_known_args)
    # when imported, and an ambiguous prefix would make it exit.
    parser = argparse.ArgumentParser(description="Serve a LLaVA-OneVision HF folder with KServe (v1, v2, OpenAI).")
    parser.add_argument("--model", required=True, help="HF folder: local path or s3:// prefix")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 inside a pod; loopback elsewhere")
    parser.add_argument("--name", default="onevision", help="model name in the routes")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per-request generation timeout (504)")
    defaults = Limits()
    parser.add_argument("--max-images", type=int, default=defaults.max_images)
    parser.add_argument("--max-media-bytes", type=int, default=defaults.max_media_bytes)
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="the whole request body (media as base64 count 4/3); 413 over it")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--max-text-bytes", type=int, default=None, help="default: from the model's context")
    parser.add_argument("--max-request-pixels", type=int, default=None, help="default: from the AnyRes grid")
    parser.add_argument("--allow-s3-bucket", action="append", default=[],
                        help="repeatable; media from any other bucket is refused")
    # No --token flag: argv is visible to every user of the node; the token comes from the environment.
    args, _ = parser.parse_known_args(argv)  # tolerate KServe's own flags (e.g. --enable_docs_url)
    limits = Limits(max_images=args.max_images, max_media_bytes=args.max_media_bytes,
                    max_body_bytes=args.max_body_bytes,
                    max_new_tokens=args.max_new_tokens, allowed_s3_buckets=tuple(args.allow_s3_bucket),
                    max_text_bytes=args.max_text_bytes, max_request_pixels=args.max_request_pixels)
    serve_kserve(args.model, args.port, host=args.host, name=args.name, max_batch_size=args.max_batch_size,
                 max_wait_ms=args.max_wait_ms, limits=limits, timeout_s=args.timeout_s)


if __name__ == "__main__":
    main()

"""A bearer-token front for tritonserver, on loopback: what `onevision serve --backend triton --token T` runs.

    with AuthProxy("127.0.0.1:8001", token="T", port=8000, upstream_headers={KEY: secret}):
        ...  # http://127.0.0.1:8000 answers as tritonserver does; 401 without `Authorization: Bearer T`

tritonserver has no bearer auth of its own: its `--http-restricted-api` only compares one header with
one value (403, not constant time). So the public port is this proxy, with the KServe door's BearerAuth
(same open paths: probes and readiness, metrics); it forwards authenticated requests to tritonserver's
HTTP port, adding `upstream_headers`. serving.serve restricts that port with a random per-run secret
header, so a local user who finds the inner port still cannot skip the token, and turns gRPC off (this
front speaks HTTP only). Bodies over `max_body_bytes` (tritonserver's own default, 64 MiB) get 413
before they are read in full.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Self

import httpx
import uvicorn

from serving.auth import BearerAuth

# Connection-level headers: they describe one hop, never forwarded (RFC 9110 7.6.1)
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
              b"transfer-encoding", b"upgrade", b"host", b"authorization"}
MAX_BODY_BYTES = 64 << 20


class AuthProxy:
    """An ASGI reverse proxy in a background thread (uvicorn), started and stopped by the caller."""

    def __init__(self, upstream: str, token: str, port: int, host: str = "127.0.0.1",
                 upstream_headers: dict[str, str] | None = None, timeout_s: float = 600.0,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self.extra = [(k.lower().encode(), v.encode()) for k, v in (upstream_headers or {}).items()]
        self.timeout_s, self.max_body_bytes = timeout_s, max_body_bytes
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(BearerAuth(self._app, token), host=host, port=port, lifespan="off",
                                log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None

    def start(self, timeout_s: float = 10.0) -> Self:
        self._thread = threading.Thread(target=self._server.run, name="auth-proxy", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the auth proxy could not listen on {self.url} (port taken?)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await self._body(scope, receive)
        if body is None:
            await _json(send, 413, f"request body over {self.max_body_bytes} bytes")
            return
        if self._client is None:  # created on the proxy's own event loop
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=10.0),
                                             limits=httpx.Limits(max_connections=64))
            # httpx's own defaults (Accept-Encoding: gzip, ...) would make tritonserver compress answers
            # that the client never asked to be compressed: forward the client's headers only
            self._client.headers.clear()
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")  # as sent: no re-encoding
        query = (scope.get("query_string") or b"").decode("latin-1")
        url = f"http://{self.upstream}{path}" + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP] + self.extra
        request = self._client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as err:
            await _json(send, 502, f"tritonserver at {self.upstream} did not answer: {type(err).__name__}")
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    async def _body(self, scope: dict[str, Any], receive: Any) -> bytes | None:
        """The whole request body, or None once it passes max_body_bytes (declared or received)."""
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError  # the client went away: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


async def _json(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

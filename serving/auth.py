"""ASGI guards: the bearer-token check shared by both doors (KServe's app, the front of tritonserver),
and the cap on a request's body (KServe's app).

    app = BearerAuth(app, token="secret")        # any ASGI app: 401 without `Authorization: Bearer secret`
    app = BodyCap(app, max_bytes=50 << 20)       # 413 for a body over 50 MiB, before it is parsed

Probes and scraping stay open (liveness, readiness, model readiness, KServe's model status, metrics):
kubelet and Prometheus carry no token. Everything else, inference and metadata alike, needs the token.
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any

TOKEN_ENV = "ONEVISION_SERVING_TOKEN"
OPEN_PATHS = re.compile(r"^/$|^/metrics$|^/v2/health/(live|ready)$|^/v2/models/[^/]+(/versions/[^/]+)?/ready$"
                        r"|^/v1/models/[^/:]+$")
_REFUSAL = (b'{"error": {"message": "missing or invalid bearer token", "type": "authentication_error", '
            b'"code": 401}}')


class BearerAuth:
    """ASGI middleware: `Authorization: Bearer <token>` on every path but OPEN_PATHS. Pure ASGI (not
    BaseHTTPMiddleware) so SSE responses pass through unbuffered."""

    def __init__(self, app: Any, token: str):
        if not token:
            raise ValueError("BearerAuth needs a non-empty token")
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not OPEN_PATHS.match(scope["path"]):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no timing oracle
                await _refuse(send, 401, _REFUSAL, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodyCap:
    """ASGI middleware: 413 for a request body over `max_bytes` (OpenAI's error shape, naming the cap).
    With a Content-Length it is refused from the header, before a byte of the body is read; a chunked
    body is read here, counted, refused as soon as it passes the cap, and otherwise handed on whole."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:  # the server refuses a body longer than its Content-Length
            if length.isdigit() and int(length) > self.max_bytes:
                await self._refuse(send, f"{int(length)} bytes")
            else:
                await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send, f"{size} bytes so far")
                return
            if not message.get("more_body"):
                break
        first: list[dict[str, Any]] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict[str, Any]:  # the body once, then the client's own events (disconnect)
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any, size: str) -> None:
        message = (f"request body ({size}) is over the cap of {self.max_bytes} bytes per request "
                   "(max_body_bytes; images and videos count as base64, 4/3 of their size)")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": 413}}).encode()
        await _refuse(send, 413, body, [(b"connection", b"close")])


async def _refuse(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """Answer a JSON error without calling the app."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers,
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

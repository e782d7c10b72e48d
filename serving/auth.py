"""Bearer-token check shared by both doors: KServe's app (middleware) and the front of tritonserver.

    app = BearerAuth(app, token="secret")        # any ASGI app: 401 without `Authorization: Bearer secret`

Probes and scraping stay open (liveness, readiness, model readiness, KServe's model status, metrics):
kubelet and Prometheus carry no token. Everything else, inference and metadata alike, needs the token.
"""

from __future__ import annotations

import hmac
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
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(_REFUSAL)).encode())]})
                await send({"type": "http.response.body", "body": _REFUSAL})
                return
        await self.app(scope, receive, send)

"""Client for the OneVision chat model on Triton (HTTP/REST, KServe v2 protocol).

    from serving.triton_client import chat, chat_many, wait_ready
    wait_ready("127.0.0.1:8000", model="onevision", timeout_s=60)
    text = chat("127.0.0.1:8000", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
    texts = chat_many("127.0.0.1:8000", [body1, body2, ...], concurrency=4)   # in flight together
    chat("127.0.0.1:8000", body, token="T")     # a server started with --token (Authorization: Bearer T)

The body is an OpenAI chat body (serving.requests); it travels as UTF-8 JSON in the REQUEST string
tensor, the answer comes back in TEXT. A refused request raises TritonChatError with the HTTP status
(400 for a bad request) and the server's message. tritonclient.http, not .grpc: the gRPC client's
protos clash with KServe's in one process (duplicate proto symbol `inference.ServerLiveRequest`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


class TritonChatError(RuntimeError):
    """The server refused or failed a request: `status` is the HTTP status (int, 0 if unknown)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message = status, message


def _host(url: str) -> str:
    """tritonclient wants host:port; accept http://host:port too (https is not used here)."""
    return url.removeprefix("http://").rstrip("/")


def _error(err: InferenceServerException) -> TritonChatError:
    try:
        status = int(err.status() or 0)
    except (TypeError, ValueError):
        status = 0
    return TritonChatError(status, err.message() or str(err))


def _inputs(body: Any) -> list[httpclient.InferInput]:
    payload = body if isinstance(body, (str, bytes)) else json.dumps(body)
    data = np.array([[payload.encode("utf-8") if isinstance(payload, str) else payload]], dtype=np.object_)
    tensor = httpclient.InferInput("REQUEST", [1, 1], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=True)
    return [tensor]


def _outputs() -> list[httpclient.InferRequestedOutput]:
    return [httpclient.InferRequestedOutput("TEXT", binary_data=True)]


def _text(result: Any) -> str:
    value = result.as_numpy("TEXT").reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def client(url: str, concurrency: int = 1, timeout_s: float = 120.0) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(_host(url), concurrency=concurrency, connection_timeout=timeout_s,
                                            network_timeout=timeout_s)


def _auth(token: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {token}"} if token else None


def chat(url: str, body: dict[str, Any] | str, model: str = "onevision", timeout_s: float = 120.0,
         token: str | None = None) -> str:
    """The completion text for one chat body (a dict, or its JSON text)."""
    with client(url, timeout_s=timeout_s) as conn:
        try:
            result = conn.infer(model, _inputs(body), outputs=_outputs(), headers=_auth(token))
        except InferenceServerException as err:
            raise _error(err) from None
    return _text(result)


def chat_many(url: str, bodies: Sequence[dict[str, Any] | str], model: str = "onevision", concurrency: int = 8,
              timeout_s: float = 120.0, token: str | None = None) -> list[str | TritonChatError]:
    """Send all bodies at once (up to `concurrency` in flight) so Triton can batch them; per body the
    text, or the TritonChatError it got (one refusal does not hide the other answers)."""
    with client(url, concurrency=max(1, concurrency), timeout_s=timeout_s) as conn:
        pending = [conn.async_infer(model, _inputs(b), outputs=_outputs(), headers=_auth(token)) for b in bodies]
        answers: list[str | TritonChatError] = []
        for handle in pending:
            try:
                answers.append(_text(handle.get_result()))
            except InferenceServerException as err:
                answers.append(_error(err))
    return answers


def is_ready(url: str, model: str | None = "onevision") -> bool:
    """Server ready (and `model` ready, if named); False when nothing answers."""
    try:
        with client(url, timeout_s=5.0) as conn:
            return bool(conn.is_server_ready() and (model is None or conn.is_model_ready(model)))
    except Exception:  # noqa: BLE001  connection refused, reset, timeout: not ready
        return False


def wait_ready(url: str, model: str | None = "onevision", timeout_s: float = 120.0,
               alive: Callable[[], bool] | None = None, interval_s: float = 0.5) -> None:
    """Poll until ready; RuntimeError if `alive()` says the server process died, TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        if is_ready(url, model):
            return
        if alive is not None and not alive():
            raise RuntimeError(f"tritonserver at {url} exited before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"tritonserver at {url} not ready (model {model!r}) within {timeout_s:.0f} s")
        time.sleep(interval_s)

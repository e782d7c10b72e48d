"""`onevision serve`: a model on 127.0.0.1 behind KServe or Triton, for local use and tests.

    onevision serve --model s3://onevision/runs/tiny/r1/stage2_ov/hf --backend kserve --port 8080
    onevision serve --model models:/llava-onevision-tiny@champion --backend triton --port 8000 --token T

`--model` is an HF checkpoint folder (local or s3://) or an MLflow registry reference
(`models:/NAME@ALIAS` or `models:/NAME/VERSION`), resolved to its version's source URI; that needs
MLFLOW_TRACKING_URI (without it, one line says so, and no stray ./mlflow.db is created).

Ports: KServe takes `port`. Triton takes `port` (HTTP), port+1 (gRPC) and port+2 (metrics); with a token
(`--token` or $ONEVISION_SERVING_TOKEN) `port` is a bearer-token front (serving.auth_proxy), port+1 is
tritonserver's own HTTP port, restricted to that front by a per-run secret header, and gRPC is off.
SIGTERM or Ctrl-C stops tritonserver (and its Python-backend stubs) before the command exits 0.

Mistakes are one line on stderr and exit 1 before anything starts: a malformed or unresolvable registry
reference, a model folder that is missing or not an HF folder (or an s3:// prefix never published), a
port that is taken.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

from serving.auth import TOKEN_ENV

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
# Every tritonserver HTTP API except health: the front forwards them with the secret header.
RESTRICTED_APIS = "metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging"
FRONT_HEADER = "onevision-front-key"


def resolve_model_uri(uri: str) -> str:
    """An HF folder URI for a path, an s3:// prefix or a registry reference (ValueError saying what is
    wrong: malformed, MLFLOW_TRACKING_URI unset, or what MLflow answered)."""
    if not uri.startswith("models:/"):
        return uri
    match = _MODELS_URI.match(uri)
    if match is None:
        raise ValueError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:  # MLflow would fall back to a new sqlite ./mlflow.db, which has no models
        raise ValueError(f"{uri}: a registry reference needs MLflow; set MLFLOW_TRACKING_URI to the tracking "
                         "server (the local stack: eval \"$(onevision stack env)\"), or give the model's HF "
                         "folder (a path or s3:// prefix) instead")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from onevision import tracking

    client = MlflowClient(tracking_uri)
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            version = client.get_model_version(match["name"], match["version"])
    except MlflowException as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{uri}: MLflow at {tracking_uri} cannot resolve it: {first}") from None
    return tracking.weights_uri(version)


def check_model_folder(uri: str) -> None:
    """ValueError naming the problem unless `uri` holds a model: a local folder with config.json, or a
    published s3:// prefix (its manifest is there). Checked before any server starts loading it."""
    from onevision import storage

    if storage.is_s3(uri):
        try:
            files = storage.read_manifest(uri).get("files", {})
        except (storage.StorageError, ValueError, OSError) as err:
            raise ValueError(f"{uri}: {' '.join(str(err).split())}") from None
        if "config.json" not in files:
            raise ValueError(f"{uri}: published, but not an HF model folder (no config.json in its manifest)")
        return
    path = Path(uri)
    if not path.is_dir():
        raise ValueError(f"{uri}: no such folder; give an HF model folder (a path or s3:// prefix) or "
                         "models:/NAME@ALIAS")
    if not (path / "config.json").is_file():
        raise ValueError(f"{uri}: not an HF model folder (no config.json)")


def serve(model: str, backend: str, port: int, name: str = "onevision", max_batch_size: int = 8,
          max_wait_ms: float = 10.0, token: str | None = None) -> None:
    """Serve until interrupted (see the module docstring for ports). A bad `model` or `backend` exits
    with one line naming the problem (SystemExit), not a traceback."""
    if backend not in ("kserve", "triton"):
        raise SystemExit(f"serve: backend {backend!r}: expected kserve or triton")
    try:
        model_uri = resolve_model_uri(model)
        check_model_folder(model_uri)
    except ValueError as err:
        raise SystemExit(f"serve: {err}") from None
    from onevision.stack import port_free

    ports = [port] if backend == "kserve" else [port, port + 1, port + 2]
    busy = [str(p) for p in ports if not port_free(p)]
    if busy:
        raise SystemExit(f"serve: port {', '.join(busy)} in use on 127.0.0.1; choose another --port"
                         + ("" if backend == "kserve" else " (Triton takes it and the next two)"))
    token = token or os.environ.get(TOKEN_ENV) or None
    if backend == "kserve":
        from serving.kserve_server import serve_kserve

        serve_kserve(model_uri, port, host="127.0.0.1", name=name, max_batch_size=max_batch_size,
                     max_wait_ms=max_wait_ms, token=token)
        return
    _serve_triton(model_uri, port, name, max_batch_size, max_wait_ms, token)


@contextlib.contextmanager
def _signals_stop_the_server() -> Iterator[None]:
    """SIGTERM (what `kill`, systemd and Kubernetes send) and SIGINT (Ctrl-C) raise KeyboardInterrupt, so
    the with blocks below stop tritonserver and remove the repository. Python's default for SIGTERM ends
    the process at once: tritonserver, in a session of its own, would keep serving. A second signal
    during the stop is ignored (TritonServer.stop ends in SIGKILL after its grace period anyway)."""
    def stop(signum: int, frame: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_triton(model_uri: str, port: int, name: str, max_batch_size: int, max_wait_ms: float,
                  token: str | None) -> None:
    import tempfile
    import time

    import serving.triton_client  # noqa: F401 - before the signals are armed: a SIGINT that lands inside an
    # import of a C extension (numpy, under tritonclient) comes out as ImportError, not KeyboardInterrupt
    from serving.auth_proxy import AuthProxy
    from serving.triton_repo import TritonServer, build_model_repository

    try:  # a signal at any point, even before ready, stops the server cleanly (the with blocks)
        with _signals_stop_the_server(), tempfile.TemporaryDirectory(prefix="onevision-triton-") as work, \
                contextlib.ExitStack() as stack:
            try:
                build_model_repository(model_uri, f"{work}/repository", name=name, max_batch_size=max_batch_size,
                                       max_queue_delay_us=int(max_wait_ms * 1000))
            except ValueError as err:  # a bad name or batch setting
                raise SystemExit(f"serve: {err}") from None
            if token:
                secret = secrets.token_urlsafe(32)
                server = TritonServer(f"{work}/repository", f"{work}/server", port + 1, None, port + 2,
                                      extra_args=(f"--http-restricted-api={RESTRICTED_APIS}:{FRONT_HEADER}={secret}",))
            else:
                server = TritonServer(f"{work}/repository", f"{work}/server", port, port + 1, port + 2)
            stack.callback(server.stop)  # registered before the start: a signal in between cannot leak it
            server.start()
            try:
                server.wait_ready(name)
            except RuntimeError as err:  # it exited or timed out: the reason, then the log's tail
                raise SystemExit(f"serve: tritonserver did not become ready: {err}") from None
            auth = "no token"
            if token:
                stack.enter_context(AuthProxy(server.url, token, port, upstream_headers={FRONT_HEADER: secret}))
                auth = "bearer token required; gRPC off"
            print(f"triton     serving {model_uri} as {name} on http://127.0.0.1:{port} ({auth}; Ctrl-C stops)",
                  flush=True)
            while server.process is not None and server.process.poll() is None:
                time.sleep(1)
            # it stopped by itself: say so (the log goes with the temporary folder)
            tail = [line for line in server.log().splitlines() if line.strip()][-1:]
            raise SystemExit(f"serve: tritonserver exited by itself (code {server.process.returncode})"
                             + (f": {tail[0].strip()}" if tail else ""))
    except KeyboardInterrupt:
        pass

"""`onevision serve`: a model on 127.0.0.1 behind KServe or Triton, for local use and tests.

    onevision serve --model s3://onevision/runs/tiny/r1/stage2_ov/hf --backend kserve --port 8080
    onevision serve --model models:/llava-onevision-tiny@champion --backend triton --port 8000

`--model` is an HF checkpoint folder (local or s3://) or an MLflow registry reference
(`models:/NAME@ALIAS` or `models:/NAME/VERSION`), resolved to its version's source URI.
"""

from __future__ import annotations

import re

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def resolve_model_uri(uri: str) -> str:
    """An HF folder URI for a path, an s3:// prefix or a registry reference (ValueError if malformed)."""
    if not uri.startswith("models:/"):
        return uri
    match = _MODELS_URI.match(uri)
    if match is None:
        raise ValueError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if match["alias"]:
        version = client.get_model_version_by_alias(match["name"], match["alias"])
    else:
        version = client.get_model_version(match["name"], match["version"])
    return version.source


def serve(model: str, backend: str, port: int, name: str = "onevision", max_batch_size: int = 8,
          max_wait_ms: float = 10.0, token: str | None = None) -> None:
    """Serve until interrupted. Triton uses port (HTTP), port+1 (gRPC) and port+2 (metrics)."""
    model_uri = resolve_model_uri(model)
    if backend == "kserve":
        from serving.kserve_server import serve_kserve

        serve_kserve(model_uri, port, host="127.0.0.1", name=name, max_batch_size=max_batch_size,
                     max_wait_ms=max_wait_ms, token=token)
        return
    if backend != "triton":
        raise ValueError(f"backend {backend!r}: expected kserve or triton")
    import tempfile
    import time

    from serving.triton_repo import TritonServer, build_model_repository

    with tempfile.TemporaryDirectory(prefix="onevision-triton-") as work:
        build_model_repository(model_uri, f"{work}/repository", name=name, max_batch_size=max_batch_size,
                               max_queue_delay_us=int(max_wait_ms * 1000))
        with TritonServer(f"{work}/repository", f"{work}/server", port, port + 1, port + 2) as server:
            try:  # Ctrl-C at any point, even before ready, stops the server cleanly (the with block)
                server.wait_ready(name)
                print(f"triton     serving {model_uri} as {name} on http://127.0.0.1:{port} (Ctrl-C stops)",
                      flush=True)
                while server.process is not None and server.process.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass

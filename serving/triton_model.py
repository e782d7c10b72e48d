"""Triton Python-backend model: OpenAI-style chat JSON in, generated text out, on the shared Engine.

This file is a template: `serving.triton_repo.build_model_repository` copies it to
`<repository>/<name>/1/model.py`, where Triton's Python-backend stub imports it (as module `1.model`)
and calls `TritonPythonModel`. It is not imported by the project itself.

    REQUEST  TYPE_STRING [1]   an OpenAI chat body, UTF-8 JSON (see serving.requests.parse_chat_request)
    TEXT     TYPE_STRING [1]   the completion text

Model config parameters (config.pbtxt `parameters`), all optional:
    model_uri             weights: an s3:// prefix or a local HF folder; default `<version dir>/weights`
    max_new_tokens        the largest `max_tokens` a request may ask for (Limits.max_new_tokens)
    allowed_s3_buckets    comma-separated buckets a request may name in s3:// media URLs

Triton's dynamic batcher hands `execute` up to max_batch_size rows at once; they are validated one by
one (a bad request gets its own TritonError with the 4xx message, the others still run), grouped by
sampling settings, and each group runs as one left-padded `Engine.generate_batch`. Greedy answers do
not depend on the batch, so Triton answers what the KServe door and the in-process engine answer.

The stub needs the project importable: the image (or the venv behind `PATH`, see
serving.triton_repo.server_env) has it installed. The stub appends this version folder to `sys.path`;
a file named model.py there would shadow the project's `model` package, so it is taken off first.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if getattr(sys.modules.get("model"), "__file__", None) == os.path.abspath(__file__):
    del sys.modules["model"]  # this file, imported as `model` through the stub's path: not the package

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the stub at run time

from serving.engine import Engine
from serving.requests import (
    CallBudget,
    GenerationRequest,
    Limits,
    RequestError,
    parse_chat_request,
)

INPUT, OUTPUT = "REQUEST", "TEXT"


def _error(status: int, message: str) -> Any:
    """A per-request error; Triton's HTTP front end answers INVALID_ARG 400, NOT_FOUND 404, INTERNAL 500.
    It has no code for 413: an over-budget request is a 400 here, with the same message as KServe's 413."""
    codes = pb_utils.TritonError
    code = {400: "INVALID_ARG", 404: "NOT_FOUND", 413: "INVALID_ARG", 422: "INVALID_ARG",
            503: "UNAVAILABLE"}.get(status, "INTERNAL")
    try:
        return pb_utils.InferenceResponse(output_tensors=[], error=codes(message, getattr(codes, code)))
    except (AttributeError, TypeError):  # a backend without error codes
        return pb_utils.InferenceResponse(output_tensors=[], error=codes(message))


def _body(raw: Any) -> Any:
    if isinstance(raw, np.ndarray):
        raw = raw.item()
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, f"{INPUT} must be UTF-8 JSON") from None
    if not isinstance(raw, str):
        raise RequestError(400, f"{INPUT} must be a string holding a JSON chat body")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"{INPUT} is not valid JSON: {err}") from None


def _placement(args: dict[str, str]) -> tuple[str | None, Any]:
    """(device_map, dtype) for the instance kind: KIND_MODEL (what a GPU deploy target gets) = one
    instance placed by serving.placement over every GPU the pod sees (device_map="auto" on several);
    KIND_GPU = this instance's own GPU; KIND_CPU = the CPU in fp32."""
    import torch

    from serving.placement import choose_placement, detect_placement

    kind = args.get("model_instance_kind", "CPU")
    if kind == "MODEL":
        return detect_placement()
    if kind == "GPU":
        bf16 = torch.cuda.is_bf16_supported()
        return f"cuda:{int(args.get('model_instance_device_id') or 0)}", torch.bfloat16 if bf16 else torch.float16
    return choose_placement(False, 0)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: (v or {}).get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        weights = Path(args["model_repository"]) / args["model_version"] / "weights"
        model_uri = params.get("model_uri", "").strip() or (str(weights) if weights.is_dir() else "")
        if not model_uri:
            raise RuntimeError(f"no weights: set the model_uri parameter or put the HF folder at {weights}")
        defaults = Limits()
        buckets = tuple(b.strip() for b in params.get("allowed_s3_buckets", "").split(",") if b.strip())
        limits = Limits(max_new_tokens=int(params.get("max_new_tokens") or defaults.max_new_tokens),
                        allowed_s3_buckets=buckets)
        self.max_batch_size = max(1, int(config.get("max_batch_size") or 1))
        self.engine = Engine.load(model_uri, *_placement(args), name=config.get("name", "onevision"),
                                  max_batch_size=self.max_batch_size, limits=limits)
        self.model_uri = model_uri

    def _parse(self, request: Any) -> list[tuple[GenerationRequest, Any]]:
        """The rows of one Triton request, validated and tokenised (RequestError if any is bad)."""
        tensor = pb_utils.get_input_tensor_by_name(request, INPUT)
        if tensor is None:
            raise RequestError(400, f"input {INPUT} is missing")
        rows, call = [], CallBudget()  # the rows of one request share the per-call pixel budget
        for raw in tensor.as_numpy().reshape(-1):
            generation = parse_chat_request(_body(raw), self.engine.limits, call)
            if generation.stream:
                raise RequestError(400, "stream: true is not supported by the Triton model; use the KServe "
                                        "OpenAI route to stream")
            rows.append((generation, self.engine.prepare(generation)))
        if not rows:
            raise RequestError(400, f"input {INPUT} is empty")
        return rows

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        texts: dict[int, list[str | None]] = {}
        groups: dict[tuple, list[tuple[int, int, GenerationRequest, Any]]] = {}
        for index, request in enumerate(requests):
            try:
                rows = self._parse(request)
            except RequestError as err:
                responses[index] = _error(err.status, err.message)
                continue
            except Exception as err:  # noqa: BLE001  a bug in validation fails this request, never the model
                responses[index] = _error(500, f"cannot read the request: {type(err).__name__}: {err}")
                continue
            texts[index] = [None] * len(rows)
            for row, (generation, item) in enumerate(rows):
                key = (generation.greedy, generation.temperature, generation.top_p, generation.seed)
                groups.setdefault(key, []).append((index, row, generation, item))
        for group in groups.values():
            for start in range(0, len(group), self.max_batch_size):
                chunk = [entry for entry in group[start:start + self.max_batch_size] if responses[entry[0]] is None]
                if not chunk:
                    continue
                try:
                    completions = self.engine.generate_batch([e[2] for e in chunk], [e[3] for e in chunk])
                except Exception as err:  # noqa: BLE001  a model failure fails its batch, not the server
                    for index, *_ in chunk:
                        responses[index] = _error(500, f"generation failed: {type(err).__name__}: {err}")
                    continue
                for (index, row, _, _), completion in zip(chunk, completions):
                    texts[index][row] = completion.text
        for index, rows in texts.items():
            if responses[index] is None:
                out = np.array([[t.encode("utf-8")] for t in rows], dtype=np.object_)
                responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, out)])
        return responses

    def finalize(self) -> None:
        self.engine = None

"""A registered version as an MLflow pyfunc: chat with the model straight from the registry.

    eval "$(onevision stack env)"          # MLFLOW_TRACKING_URI and the S3 endpoint/keys of the local stack
    import mlflow
    model = mlflow.pyfunc.load_model("models:/llava-onevision-tiny@candidate")
    model.predict({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}},
        {"type": "text", "text": "What colour is the shape?"}]}]}, params={"max_tokens": 16})
    # -> [{"object": "chat.completion", "choices": [{"message": {"role": "assistant", "content": "red"}, ...}]}]

The register step logs this file as the version's model ("models from code", MLflow's pickle-free way):
the MLflow model holds this code, an input example and a signature (OpenAI chat messages in; one
chat.completion per request out; params max_tokens, temperature, top_p, seed), and its model config
`weights_uri`: the S3 prefix of the merged HF folder the version stands for. The weights are not copied
into MLflow: `load_context` loads them from that prefix (downloaded once into the local cache and checked
against its manifest), as the KServe predictor does. Requests are parsed and bounded by the same code as
the serving route (serving.requests: image size, pixel and text budgets), and a batch of requests decodes
as one batch of the engine. Where it is loaded, the project's packages must be importable (the project
image, or a checkout with `pip install -e .`): the code here is a thin door onto serving.engine.
"""

from __future__ import annotations

from typing import Any

import mlflow

WEIGHTS_URI = "weights_uri"  # the model config key: the HF folder (s3:// prefix or local path)


class OneVisionChatModel(mlflow.pyfunc.PythonModel):
    """OpenAI-style chat requests in, chat.completion dicts out (one per request, in order)."""

    def load_context(self, context: Any) -> None:
        from serving.engine import Engine

        config = context.model_config or {}
        if not config.get(WEIGHTS_URI):
            raise ValueError(f"the model config has no {WEIGHTS_URI!r}: this MLflow model does not say where "
                             "its weights are (was it logged by the register step?)")
        self.engine = Engine.load(config[WEIGHTS_URI], name=config.get("served_name", "onevision"))

    # model_input has no annotation on purpose: MLflow reads predict's type hints as a second signature
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # noqa: ANN001
        from serving.requests import parse_chat_request

        bodies = [{**body, **(params or {})} for body in chat_bodies(model_input)]
        requests = [parse_chat_request(body, self.engine.limits) for body in bodies]  # RequestError names what is wrong
        return [c.as_openai(self.engine.name) for c in self.engine.generate_batch(requests)]


def chat_bodies(model_input: Any) -> list[dict[str, Any]]:
    """The requests in what pyfunc hands `predict`: a DataFrame with a `messages` column (a dict or a
    list of dicts, as MLflow converts them), a dict or a list of dicts."""
    if hasattr(model_input, "to_dict"):  # pandas.DataFrame: one row per request
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, list):
        rows = list(model_input)
    else:
        raise TypeError(f"expected chat requests ({{'messages': [...]}}, a list of them or a DataFrame with a "
                        f"'messages' column), got {type(model_input).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "messages" not in row:
            raise TypeError(f"request {i}: expected a dict with 'messages', got {str(row)[:80]!r}")
    return [{"messages": _plain(row["messages"])} for row in rows]


def _plain(value: Any) -> Any:
    """numpy arrays (pandas' cells of lists) back to lists, recursively."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


mlflow.models.set_model(OneVisionChatModel())

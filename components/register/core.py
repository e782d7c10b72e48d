"""Register a trained, evaluated, exported checkpoint as an MLflow model version, with a model card.

    python -m components.register.core --recipe recipes/tiny.yaml --model s3://onevision/runs/tiny/r1/stage2_ov/hf \
        --evaluation s3://.../evaluate/stage2_ov --export s3://.../export --pipeline-run r1

One registered model per recipe (`evaluation.registered_model`, default `llava-onevision-<recipe>`). The
version's source is a small MLflow pyfunc model (serving/mlflow_pyfunc.py: code, signature, input example,
and the weights' S3 prefix in its model config), logged in the step's MLflow run, so that
`mlflow.pyfunc.load_model("models:/<name>@candidate")` answers chat requests. The merged HF folder in S3
is referenced (tag `onevision.weights_uri`, `tracking.weights_uri`), never re-uploaded through the MLflow
artifact proxy; the Triton repository and manifests (the export) are referenced by tag too. Tags: lineage (recipe
hash, data manifest hashes, git commit, pipeline run id, the checkpoint of every stage), the eval scores
(`onevision.eval.<task>.<metric>`, what the next evaluation's champion comparison reads) and the gate
(`onevision.gate_passed`), the evaluation's prefix (`onevision.evaluation_uri`: the next evaluation reads
the champion's answers there for its gallery). The description is the model card (Markdown), linking to
the review gallery of the gating evaluation (its MLflow run's gallery.html, and the copy in S3). Alias
`candidate` is set only when the evaluation gate passed; promotion (promote.py) moves `champion`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
import sys
from importlib.metadata import version as installed_version
from typing import Any

# what the next evaluation reads from the champion: its scores, and where its answers (samples) lie
from components.evaluate.core import EVAL_TAG_PREFIX, EVALUATION_URI_TAG
from onevision import storage, tracking
from onevision.recipe import Recipe, load_recipe
from onevision.cli_exit import run_command

TAG_GATE = "onevision.gate_passed"
TAG_GATE_REASONS = "onevision.gate_reasons"
TAG_EXPORT = "onevision.export_uri"
TAG_EVALUATION_RUN = "onevision.evaluation_run_id"
TAG_CHECKPOINT_PREFIX = "onevision.checkpoint."
CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous-champion"
CHAT_MODEL_PATH = "chat_model"  # the pyfunc's folder in the register run's artifacts
# what loading the pyfunc needs besides the project's own packages (the project image holds all of them)
CHAT_MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "pillow", "av")


class RegistryError(RuntimeError):
    """A registration or promotion that must not happen; the message says why."""


def gallery_links(evaluation_uri: str, evaluated: dict[str, Any], tracking_uri: str | None = None) -> list[str]:
    """Markdown lines linking to the gating evaluation's review gallery: its MLflow run's artifact (the UI's
    page for it when the tracking server is http(s), and the `runs:/` path) and the published copy."""
    page = evaluated.get("gallery")
    if not page:
        return []
    sheet = page.rsplit(".", 1)[0] + ".png"
    lines = []
    run_id, experiment = evaluated.get("mlflow_run_id"), evaluated.get("mlflow_experiment_id")
    if run_id:
        if (tracking_uri or "").startswith(("http://", "https://")) and experiment:
            ui = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}/artifactPath"
            lines.append(f"- [{page}]({ui}/{page}) and [the contact sheet]({ui}/{sheet}) in the evaluation run")
        lines.append(f"- MLflow artifacts: `runs:/{run_id}/{page}`, `runs:/{run_id}/{sheet}`")
    lines.append(f"- published: `{storage.join(evaluation_uri, page)}`, `{storage.join(evaluation_uri, sheet)}`")
    return lines


def model_card(recipe: Recipe, model_uri: str, evaluation: dict[str, Any], comparison: str,
               data: dict[str, dict[str, Any]], checkpoints: dict[str, str], gallery: list[str] = ()) -> str:
    lines = [f"# {recipe.registered_model_name}: {recipe.name}", "", recipe.description or "", "",
             "## Lineage", f"- checkpoint: `{model_uri}`", f"- recipe hash: `{recipe.hash()}`",
             f"- git commit: `{tracking.git_commit()}`"]
    lines += [f"- {stage} checkpoint: `{uri}`" for stage, uri in checkpoints.items()]
    if data:
        lines += ["", "## Data (curation, per stage)", "| stage | in | kept | duplicates | rejected |", "|---|---|---|---|---|"]
        lines += [f"| {stage} | {m.get('records_in', '-')} | {m.get('kept', '-')} | {m.get('duplicates', '-')} | "
                  f"{m.get('rejected', '-')} |" for stage, m in data.items()]
    lines += ["", "## Evaluation", comparison.split("\n", 1)[1].strip() if "\n" in comparison else comparison]
    if gallery:
        lines += ["", "## Review gallery",
                  "Held-out samples with the reference and this version's answer (and the champion's, when there "
                  "was one), each marked right or wrong:", *gallery]
    reasons = evaluation.get("reasons") or []
    lines += ["", "## Known limits"]
    lines += [f"- gate: {r}" for r in reasons] or ["- none recorded by the gate"]
    lines += ["- scores are on the recipe's evaluation tasks only; see the comparison for the paper's numbers"]
    return "\n".join(lines) + "\n"


def chat_model_example() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The pyfunc's input example (a chat request with a PNG, as a client sends it) and an output of its shape."""
    import base64
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (220, 40, 40)).save(png, format="PNG")
    request = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}},
        {"type": "text", "text": "What colour is the shape?"}]}]}
    answer = [{"id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": "onevision",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "red"}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}]
    return request, answer


def log_chat_model(recipe: Recipe, model_uri: str, pipeline_run_id: str) -> tuple[str, str]:
    """Log the version's pyfunc (code, model config {weights_uri: model_uri}, signature, input example; no
    weights) in the register run (a step run under the pipeline's parent run when it exists); returns
    (the pyfunc's artifact URI, the run id). Saved with `save_model` and logged as artifacts: `log_model`
    would load the model (all its weights) to check the example, in a step that must stay small."""
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from serving.mlflow_pyfunc import WEIGHTS_URI

    request, answer = chat_model_example()
    signature = infer_signature(request, answer, params={"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 0})
    code = importlib.util.find_spec("serving.mlflow_pyfunc").origin  # the file, not imported: it sets the model
    parent = tracking.pipeline_parent(MlflowClient(), recipe, pipeline_run_id)
    if parent is not None:
        run = tracking.step_run("register", parent.info.run_id, params={"model_uri": model_uri})
    else:  # registered outside a pipeline run: a run of its own, with the lineage tags
        experiment = mlflow.set_experiment(tracking.experiment_name(recipe))
        run = mlflow.start_run(experiment_id=experiment.experiment_id, run_name=f"register {pipeline_run_id}",
                               tags={**tracking.lineage_tags(recipe, pipeline_run_id), tracking.TAG_STEP: "register"})
    with run as active, tempfile.TemporaryDirectory(prefix="chat-model-") as scratch:
        mlflow.pyfunc.save_model(
            f"{scratch}/{CHAT_MODEL_PATH}", python_model=code, signature=signature, input_example=request,
            model_config={WEIGHTS_URI: model_uri, "served_name": recipe.registered_model_name},
            pip_requirements=[f"{name}=={installed_version(name)}" for name in CHAT_MODEL_REQUIREMENTS])
        mlflow.log_artifacts(f"{scratch}/{CHAT_MODEL_PATH}", CHAT_MODEL_PATH)
        return f"{active.info.artifact_uri.rstrip('/')}/{CHAT_MODEL_PATH}", active.info.run_id


def register(recipe_uri: str, model_uri: str, evaluation_uri: str, pipeline_run_id: str,
             export_uri: str | None = None, data_uris: dict[str, str] | None = None,
             checkpoints: dict[str, str] | None = None) -> dict[str, Any]:
    """Create the model version; returns {"name", "version", "candidate", "gate_passed"}."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    recipe = load_recipe(recipe_uri)
    storage.read_manifest(model_uri)  # only a completely published checkpoint is registered
    evaluated = storage.read_manifest(evaluation_uri)["metadata"]
    gate = json.loads(storage.read_bytes(storage.join(evaluation_uri, "gate.json")))
    comparison = storage.read_bytes(storage.join(evaluation_uri, "comparison.md")).decode()
    if evaluated.get("model") != model_uri:
        raise RegistryError(f"{evaluation_uri} evaluated {evaluated.get('model')}, not {model_uri}")
    data = {stage: storage.read_manifest(uri)["metadata"] for stage, uri in (data_uris or {}).items()}
    checkpoints = dict(checkpoints or {})

    manifest_hashes = {stage: storage.manifest_hash(uri) for stage, uri in (data_uris or {}).items()}
    tags = tracking.lineage_tags(recipe, pipeline_run_id,
                                 json.dumps(manifest_hashes, sort_keys=True) if manifest_hashes else None)
    tags[TAG_GATE] = "true" if gate["passed"] else "false"
    if gate["reasons"]:
        tags[TAG_GATE_REASONS] = "; ".join(gate["reasons"])[:5000]
    tags.update({f"{EVAL_TAG_PREFIX}{key.replace('/', '.')}": str(value) for key, value in gate["scores"].items()})
    tags.update({f"{TAG_CHECKPOINT_PREFIX}{stage}": uri for stage, uri in checkpoints.items()})
    tags[EVALUATION_URI_TAG] = evaluation_uri
    tags[tracking.TAG_WEIGHTS] = model_uri
    if evaluated.get("mlflow_run_id"):
        tags[TAG_EVALUATION_RUN] = evaluated["mlflow_run_id"]
    if export_uri:
        storage.read_manifest(export_uri)
        tags[TAG_EXPORT] = export_uri

    client = MlflowClient()
    name = recipe.registered_model_name
    try:
        client.create_registered_model(name, tags={tracking.TAG_RECIPE_NAME: recipe.name},
                                       description=f"LLaVA-OneVision models trained with recipe {recipe.name}.")
    except MlflowException as err:
        if "already exists" not in str(err).lower() and getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    import mlflow

    card = model_card(recipe, model_uri, gate, comparison, data, checkpoints,
                      gallery_links(evaluation_uri, evaluated, mlflow.get_tracking_uri()))
    existing = [v for v in client.search_model_versions(f"name = '{name}'", max_results=1000)
                if tracking.weights_uri(v) == model_uri and v.tags.get(tracking.TAG_PIPELINE_RUN) == pipeline_run_id]
    if existing:  # a retried or resumed pipeline step: the version this run already registered
        version = existing[0]
        print(f"[register] {name} v{version.version} already registered by run {pipeline_run_id}", flush=True)
    else:
        source, run_id = log_chat_model(recipe, model_uri, pipeline_run_id)
        version = client.create_model_version(name, source=source, run_id=run_id, tags=tags, description=card)
    for _ in range(60):  # S3 sources are READY at once; other stores may take a moment
        if client.get_model_version(name, version.version).status == "READY":
            break
        time.sleep(1)
    if gate["passed"]:
        client.set_registered_model_alias(name, CANDIDATE, version.version)
    return {"name": name, "version": version.version, "candidate": gate["passed"], "gate_passed": gate["passed"],
            "model_card": card}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--model", required=True, help="the merged HF folder in S3")
    parser.add_argument("--evaluation", required=True, help="the evaluate step's published prefix")
    parser.add_argument("--export", default=None, help="the export step's published prefix")
    parser.add_argument("--pipeline-run", required=True)
    args = parser.parse_args(argv)
    result = register(args.recipe, args.model, args.evaluation, args.pipeline_run, args.export)
    print(json.dumps({k: v for k, v in result.items() if k != "model_card"}, indent=1))


if __name__ == "__main__":
    sys.exit(run_command("register", main))

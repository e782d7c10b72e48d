"""Register a trained, evaluated, exported checkpoint as an MLflow model version, with a model card.

    python -m components.register.core --recipe recipes/tiny.yaml --model s3://onevision/runs/tiny/r1/stage2_ov/hf \
        --evaluation s3://.../evaluate/stage2_ov --export s3://.../export --pipeline-run r1

One registered model per recipe (`evaluation.registered_model`, default `llava-onevision-<recipe>`). The
version's source is the merged HF folder in S3, referenced, never re-uploaded through the MLflow artifact
proxy; the Triton repository and manifests (the export) are referenced by tag. Tags: lineage (recipe
hash, data manifest hashes, git commit, pipeline run id, the checkpoint of every stage), the eval scores
(`onevision.eval.<task>.<metric>`, what the next evaluation's champion comparison reads) and the gate
(`onevision.gate_passed`), the evaluation's prefix (`onevision.evaluation_uri`: the next evaluation reads
the champion's answers there for its gallery). The description is the model card (Markdown), linking to
the review gallery of the gating evaluation (its MLflow run's gallery.html, and the copy in S3). Alias
`candidate` is set only when the evaluation gate passed; promotion (promote.py) moves `champion`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

# what the next evaluation reads from the champion: its scores, and where its answers (samples) lie
from components.evaluate.core import EVAL_TAG_PREFIX, EVALUATION_URI_TAG
from onevision import storage, tracking
from onevision.recipe import Recipe, load_recipe

TAG_GATE = "onevision.gate_passed"
TAG_GATE_REASONS = "onevision.gate_reasons"
TAG_EXPORT = "onevision.export_uri"
TAG_EVALUATION_RUN = "onevision.evaluation_run_id"
TAG_CHECKPOINT_PREFIX = "onevision.checkpoint."
CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous-champion"


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
                if v.source == model_uri and v.tags.get(tracking.TAG_PIPELINE_RUN) == pipeline_run_id]
    if existing:  # a retried or resumed pipeline step: the version this run already registered
        version = existing[0]
        print(f"[register] {name} v{version.version} already registered by run {pipeline_run_id}", flush=True)
    else:
        version = client.create_model_version(name, source=model_uri, tags=tags, description=card)
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
    main()

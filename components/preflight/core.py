"""Preflight: check everything a pipeline run needs before any GPU step, then pin the run's recipe.

    python -m components.preflight.core --recipe recipes/tiny.yaml --runs-root s3://onevision/runs --run-id r1 \
        --override stage1.lr=2e-3

Checks, all of them, reported together (one run fails once, with every reason):
  credentials  the S3 and MLflow settings the pods get from Secrets/ConfigMaps are present (names, never values)
  s3           the runs bucket exists and a probe object can be written, read back and deleted;
               an s3:// init checkpoint exists
  data         every enabled stage's sources exist, local or s3:// (json_path, dataset_uri, media_root;
               a synthetic:// world is generated, an hf:// source without a mirror cannot be checked
               offline): each missing one named with its stage and source
  mlflow       the tracking server answers /health within seconds (not after minutes of client retries)
  registry     the model registry answers, and the champion's version (if any) can be read
  recipe       the recipe with the run's overrides validates; a resumed run id keeps the same recipe
  memory       every training stage on GPUs fits its step's GPUs (`cluster.steps`: gpus per node, nodes,
               gpu_memory_gb): the plan of `onevision recipe plan` (model/plan.py), printed; a stage
               that does not fit is named with its shortfall
Then it publishes the resolved recipe at `<run_uri>/recipe/recipe.yaml` (what every later step reads)
with `data.json`: each enabled stage's data recipe (components/curate/datarecipe.py: the mixture, the
curation settings, the record files' ETags) and the content-addressed prefix its shards go to,
`<data_root>/<recipe>/<stage>/<hash>`, shared by every run with the same data (so curation is cached).
Then it opens the pipeline's parent MLflow run. Rerunning with the same run id resumes: nothing is
redone, and the pinned data recipes are read back rather than fingerprinted again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from components.curate.datarecipe import DataRecipe
from components.curate.sources import missing_inputs
from onevision import storage, tracking
from onevision.recipe import STAGE_NAMES, Recipe, RecipeError, dump_recipe, load_recipe, parse_recipe
from onevision.cli_exit import run_command

# pipeline parameter value 0 means "the recipe's None" for these optional fields
ZERO_IS_NONE = {"max_steps", "vision_tower_lr"}


class PreflightError(RuntimeError):
    """What is missing or unreachable, every reason listed."""


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Set dotted fields (`stage1.lr`, `curation.workers`, `evaluation.batch_size`, `training.seed`) and
    revalidate. Values may arrive as strings (KFP passes dict members that way); they are parsed into the
    field's type by the recipe's own validation."""
    doc = recipe.model_dump(mode="json")
    for key, raw in overrides.items():
        path = key.split(".")
        node: Any = doc["stages"] if path[0] in STAGE_NAMES else doc
        for part in path[:-1]:
            if not isinstance(node, dict) or part not in node or node[part] is None:
                raise RecipeError(f"override {key!r}: no such recipe field")
            node = node[part]
        field = path[-1]
        if not isinstance(node, dict) or field not in node:
            raise RecipeError(f"override {key!r}: no such recipe field")
        value = raw
        if isinstance(raw, str):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise RecipeError(f"override {key!r}: {raw!r} is not a number, boolean or JSON value") from None
        if isinstance(value, float) and value.is_integer() and isinstance(node[field], int):
            value = int(value)  # KFP hands integer parameters over as "3.0"
        node[field] = None if field in ZERO_IS_NONE and value == 0 else value
    return parse_recipe(doc, f"{recipe.name} with overrides {sorted(overrides)}")


def check_sources(recipe: Recipe) -> list[str]:
    """Every enabled stage's data sources: each `json_path`, `dataset_uri` and `media_root` that curation
    would not find (components/curate/sources.missing_inputs says what exists means for each kind), one
    line each, naming the stage and the source. S3 inputs are skipped when the S3 credentials are missing
    (that is named already)."""
    can_s3 = all(os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    problems = []
    for name, stage in recipe.stages.enabled():
        for number, source in enumerate(stage.data, 1):
            uris = [u for u in (source.json_path, source.dataset_uri, source.media_root) if u]
            if not can_s3 and any(storage.is_s3(u) for u in uris):
                continue
            try:
                missing = missing_inputs(source)
            except storage.StorageError as err:
                missing = [f"cannot be checked: {err}"]
            problems += [f"data: {name} source {number} ({source.json_path or source.dataset_uri}): {why}"
                         for why in missing]
    return problems


def check_s3(runs_root: str, recipe: Recipe) -> list[str]:
    problems = [f"credentials: {name} is not set (the pod gets it from the S3 Secret)"
                for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(name)]
    if problems or not storage.is_s3(runs_root):
        return problems
    location = storage.parse_s3(runs_root)
    try:
        if not storage.s3_client().bucket_exists(location.bucket):
            return [f"s3: bucket {location.bucket!r} of {runs_root} does not exist at {storage.s3_endpoint()}"]
        probe = storage.join(runs_root, "_preflight", f"probe-{os.getpid()}")
        storage.write_bytes(probe, b"ok")
        if storage.read_bytes(probe) != b"ok":
            problems.append(f"s3: probe object {probe} read back different bytes")
        storage.delete(probe)
    except Exception as err:  # noqa: BLE001 - any failure here is a reason to stop, reported by name
        return [f"s3: {storage.s3_endpoint()} refused a write/read/delete under {runs_root}: {err}"]
    init = recipe.model.init_from
    if init and storage.is_s3(init) and not (storage.exists(init) or storage.list_uris(init.rstrip("/") + "/", limit=1)):
        problems.append(f"s3: the recipe's input {init} does not exist")
    return problems


def check_mlflow(recipe: Recipe, timeout_s: float = 5.0) -> list[str]:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return [f"mlflow: MLFLOW_TRACKING_URI must name the tracking server (got {uri!r})"]
    try:
        tracking.check_server(uri, timeout=timeout_s)
    except tracking.TrackingError as err:
        return [f"mlflow: {err}"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        models = client.search_registered_models(filter_string=f"name = '{recipe.registered_model_name}'")
        if models and "champion" in models[0].aliases:
            client.get_model_version(recipe.registered_model_name, models[0].aliases["champion"])
    except Exception as err:  # noqa: BLE001
        return [f"registry: {uri} cannot read registered model {recipe.registered_model_name!r}: {err}"]
    return []


def check_memory(recipe: Recipe) -> list[str]:
    """The memory plan against the recipe's own cluster resources; one line per stage that does not fit.
    A recipe whose stages all run on CPU steps (gpus 0, the tiny recipe) is not planned (nor is torch
    loaded)."""
    if not any(recipe.cluster.resources(name).gpus for name, _ in recipe.stages.enabled()):
        return []
    from model.plan import PlanError, plan_recipe

    try:
        plan = plan_recipe(recipe)
    except PlanError as err:
        return [f"memory: cannot plan {recipe.name}: {err}"]
    print("[preflight] memory plan:\n" + plan.render(), flush=True)
    return [f"memory: {line}" for line in plan.refusals()]


def default_data_root(runs_root: str) -> str:
    """`curated` beside the runs: s3://onevision/runs -> s3://onevision/curated."""
    parent, _, name = runs_root.rstrip("/").rpartition("/")
    return storage.join(parent if name and not parent.endswith(":/") else runs_root, "curated")


def plan_data(recipe: Recipe, data_root: str) -> dict[str, dict[str, str]]:
    """{stage: {"data_recipe": JSON, "data_uri": content-addressed prefix}} for every enabled stage."""
    plan = {}
    for name, _ in recipe.stages.enabled():
        data = DataRecipe.of(recipe, name)
        plan[name] = {"data_recipe": data.to_json(), "data_uri": data.curated_uri(data_root)}
    return plan


def publish_recipe(recipe: Recipe, run_uri: str, data_root: str) -> tuple[str, dict[str, dict[str, str]]]:
    """Pin the run's recipe and its stages' data recipes; a resumed run id must carry the same recipe.
    Returns the recipe's URI and the data plan (read back when the run already exists)."""
    prefix = storage.join(run_uri, "recipe")
    uri = storage.join(prefix, "recipe.yaml")
    try:
        pinned = storage.read_manifest(prefix)
    except storage.ManifestMissingError:
        plan = plan_data(recipe, data_root)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "recipe.yaml").write_text(dump_recipe(recipe))
            Path(tmp, "data.json").write_text(json.dumps(plan, indent=1, sort_keys=True))
            storage.publish_dir(tmp, prefix, metadata={"recipe_hash": recipe.hash()})
        return uri, plan
    if pinned["metadata"]["recipe_hash"] != recipe.hash():
        raise PreflightError(f"recipe: run {run_uri} already exists with recipe hash "
                             f"{pinned['metadata']['recipe_hash'][:12]}, but this run's recipe (with its "
                             f"parameters) hashes to {recipe.hash()[:12]}; start a new run id")
    if "data.json" not in pinned["files"]:  # pinned before data recipes were: plan them now
        return uri, plan_data(recipe, data_root)
    return uri, json.loads(storage.read_bytes(storage.join(prefix, "data.json")))


def run(recipe_uri: str, runs_root: str, run_id: str, overrides: dict[str, Any] | None = None,
        data_root: str | None = None) -> dict[str, Any]:
    """Check, pin the recipe and its data recipes, open the MLflow parent run. Returns run_id, run_uri,
    recipe_uri, mlflow_parent, recipe_hash and `data` ({stage: {data_recipe, data_uri}}); `data_root`
    defaults to `curated` beside `runs_root`."""
    try:
        recipe = apply_overrides(load_recipe(recipe_uri), overrides or {})
    except RecipeError as err:
        raise PreflightError(f"recipe: {err}") from None
    problems = check_s3(runs_root, recipe) + check_sources(recipe) + check_mlflow(recipe) + check_memory(recipe)
    if problems:
        raise PreflightError("preflight failed, nothing was started:\n  " + "\n  ".join(problems))
    run_uri = storage.join(runs_root, recipe.name, run_id)
    data_root = data_root or default_data_root(runs_root)
    pinned_uri, plan = publish_recipe(recipe, run_uri, data_root)
    parent = tracking.ensure_pipeline_run(recipe, run_id)
    with tracking.step_run("preflight", parent, params={"recipe_uri": recipe_uri, "overrides": overrides or {}}):
        import mlflow

        mlflow.log_text(dump_recipe(recipe), "recipe.yaml")
        mlflow.log_dict(plan, "data.json")
    print(f"[preflight] ok: run {run_id} -> {run_uri} (recipe {recipe.hash()[:12]}, MLflow parent {parent})", flush=True)
    return {"run_id": run_id, "run_uri": run_uri, "recipe_uri": pinned_uri, "mlflow_parent": parent,
            "recipe_hash": recipe.hash(), "data": plan}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.preflight.core", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe YAML: local path or s3://")
    parser.add_argument("--runs-root", default="s3://onevision/runs", help="runs live at <root>/<recipe>/<run id>")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--data-root", default=None, help="curated data live at <root>/<recipe>/<stage>/<hash> "
                                                          "(default: curated beside --runs-root)")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.override)
    try:
        result = run(args.recipe, args.runs_root, args.run_id, overrides, args.data_root)
    except PreflightError as err:
        print(err, file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_command("preflight", main))

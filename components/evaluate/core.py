"""Evaluate a checkpoint with LMMs-Eval, gate it, and compare it with the paper and the champion.

    python -m components.evaluate.core --recipe recipes/tiny.yaml --stage stage2_ov \
        --model s3://onevision/runs/tiny/r1/stage2_ov/hf --out s3://onevision/runs/tiny/r1/evaluate/stage2_ov

    from components.evaluate.core import run
    report = run("recipes/tiny.yaml", "stage2_ov", model_uri, out_uri, mlflow_parent=parent_id)
    report["gate"]["passed"], report["gate"]["reasons"]

Protocol (the paper's): `python -m lmms_eval --model onevision` (our plugin, components/evaluate/
lmms_model.py: the training-time template and processing), greedy, 0-shot, `evaluation.batch_size`
(1 by default), video frames from the recipe. Tasks are the recipe's: lmms-eval's own (ai2d, chartqa,
docvqa_val, mme, mmmu_val, ... read from an HF datasets cache: ONEVISION_HF_CACHE_URI, a PVC folder or
an s3:// mirror, with HF_HUB_OFFLINE=1: pods need no internet) and our offline `shapes_*` tasks. lmms-eval exits 0 even when
a task failed, so the results JSON is checked: every task present, its metric a number, samples > 0;
otherwise EvaluationError names the task and quotes lmms-eval's log. The gate (absolute thresholds,
and "at most max_regression below the registry's champion") is an output, not an exception.
Published under `out`: results.json, samples_<task>.jsonl, comparison.md, gate.json, lmms_eval.log, and
the review gallery built from the logged samples (gallery.html, self-contained, and gallery.png; the
champion's answers come from the samples its own evaluation published: its `onevision.evaluation_uri` tag).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from components.evaluate import gallery
from components.evaluate.offline import TASKS_DIR, is_offline, write_offline_data
from onevision import storage
from onevision.recipe import EvalTask, Recipe, load_recipe
from onevision.cli_exit import run_command

EVAL_TAG_PREFIX = "onevision.eval."  # model-version tags: onevision.eval.<task>.<metric> = value
CHAMPION_ALIAS = "champion"
EVALUATION_URI_TAG = "onevision.evaluation_uri"  # model-version tag: where its evaluation (and samples) lie


class EvaluationError(RuntimeError):
    """Evaluation could not produce trustworthy scores (as opposed to scores below the gate)."""


def _log_tail(log: str, lines: int = 15) -> str:
    interesting = [ln for ln in log.splitlines() if "error" in ln.lower() or "Traceback" in ln or "Exception" in ln]
    return "\n".join((interesting or log.splitlines())[-lines:])


def run_lmms_eval(model_dir: str, tasks: list[EvalTask], out_dir: Path, *, template: str, video_frames: int,
                  batch_size: int, seed: int, work: Path, include_paths: list[str] = ()) -> tuple[dict[str, Any], Path]:
    """Run lmms-eval once over all tasks; (its results JSON, the folder with it and the samples)."""
    offline = [t.name for t in tasks if is_offline(t.name)]
    for path in write_offline_data(offline, work / "shapes_data", seed, {t.name: t.limit for t in tasks}, work / "world"):
        if not path.stat().st_size:
            raise EvaluationError(f"task {path.stem}: its data file {path} is empty")
    builtin_limits = {t.limit for t in tasks if not is_offline(t.name)}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "onevision",
           "--model_args", f"pretrained={model_dir},template={template},video_frames={video_frames}",
           "--tasks", ",".join(t.name for t in tasks), "--batch_size", str(batch_size),
           "--include_path", ",".join([str(TASKS_DIR), *include_paths]), "--output_path", str(out_dir),
           "--log_samples", "--seed", str(seed), "--verbosity", "INFO"]
    if builtin_limits - {None}:
        cmd += ["--limit", str(max(builtin_limits - {None}))]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
           **hf_cache_env(work)}
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    log = done.stdout + "\n" + done.stderr
    (out_dir / "lmms_eval.log").parent.mkdir(parents=True, exist_ok=True)
    (out_dir / "lmms_eval.log").write_text(log)
    found = sorted(out_dir.rglob("*_results.json"))
    if done.returncode != 0 or not found:
        raise EvaluationError(f"lmms-eval wrote no results (exit {done.returncode}) for tasks "
                              f"{[t.name for t in tasks]}:\n{_log_tail(log)}")
    results = json.loads(found[-1].read_text())
    check_results(results, tasks, log)
    return results, found[-1].parent


def hf_cache_env(work: Path) -> dict[str, str]:
    """HF_HOME for lmms-eval's datasets: ONEVISION_HF_CACHE_URI, a folder (a PVC) or an s3:// prefix
    holding a published copy of an HF cache (fetched once into `work`, sha256-verified); else inherited."""
    uri = os.environ.get("ONEVISION_HF_CACHE_URI")
    if not uri:
        return {}
    if not storage.is_s3(uri):
        if not Path(uri).is_dir():
            raise EvaluationError(f"ONEVISION_HF_CACHE_URI={uri}: no such folder")
        return {"HF_HOME": uri}
    local = work / "hf_home"
    if not local.is_dir():
        storage.get_dir(uri, local)
    return {"HF_HOME": str(local)}


def check_results(results: dict[str, Any], tasks: list[EvalTask], log: str = "") -> None:
    """Raise EvaluationError naming the first task without a usable score."""
    for task in tasks:
        got = results.get("results", {}).get(task.name)
        if got is None:
            raise EvaluationError(f"task {task.name}: no results from lmms-eval (it errored or was not found)"
                                  f"\n{_log_tail(log)}")
        samples = (results.get("n-samples", {}).get(task.name) or {}).get("effective", 0)
        if not samples:
            raise EvaluationError(f"task {task.name}: evaluated on 0 samples")
        value = got.get(f"{task.metric},none", got.get(task.metric))
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            raise EvaluationError(f"task {task.name}: metric {task.metric!r} missing or not a number "
                                  f"(has {sorted(k.split(',')[0] for k in got if ',' in k)})")


def scores_of(results: dict[str, Any], tasks: list[EvalTask]) -> dict[str, float]:
    """{"<task>/<metric>": value} for the recipe's tasks."""
    out = {}
    for task in tasks:
        got = results["results"][task.name]
        out[f"{task.name}/{task.metric}"] = float(got.get(f"{task.metric},none", got.get(task.metric)))
    return out


def gate(scores: dict[str, float], tasks: list[EvalTask], champion: dict[str, float] | None) -> dict[str, Any]:
    """{"passed": bool, "reasons": [...]} from absolute thresholds and the regression bound vs champion."""
    reasons = []
    for task in tasks:
        key = f"{task.name}/{task.metric}"
        value = scores[key]
        if task.threshold is not None and value < task.threshold:
            reasons.append(f"{key} = {value:.4g} is below the threshold {task.threshold:.4g}")
        if task.max_regression is not None and champion and key in champion:
            floor = champion[key] - task.max_regression
            if value < floor:
                reasons.append(f"{key} = {value:.4g} is more than {task.max_regression:.4g} below the champion's "
                               f"{champion[key]:.4g}")
    return {"passed": not reasons, "reasons": reasons, "scores": scores, "champion": champion}


def champion_version(model_name: str) -> Any | None:
    """The registered model's `champion` version (an MLflow ModelVersion), or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:
        return None  # no such model or no champion yet: nothing to regress against


def champion_scores(model_name: str, version: Any | None = None) -> tuple[str | None, dict[str, float] | None]:
    """(version, {"<task>/<metric>": value}) of the registered model's champion, or (None, None)."""
    version = version or champion_version(model_name)
    if version is None:
        return None, None
    scores = {k[len(EVAL_TAG_PREFIX):].replace(".", "/", 1): float(v) for k, v in version.tags.items()
              if k.startswith(EVAL_TAG_PREFIX)}
    return version.version, scores


def champion_samples(version: Any, tasks: list[EvalTask]) -> dict[str, list[dict[str, Any]]]:
    """The champion's lmms-eval samples per task, read from its published evaluation (tag
    onevision.evaluation_uri, set by register); {} for a task it has none of (an older or other task)."""
    uri = (version.tags or {}).get(EVALUATION_URI_TAG) if version is not None else None
    found = {}
    for task in tasks if uri else []:
        try:
            found[task.name] = gallery.parse_jsonl(storage.read_bytes(storage.join(uri, f"samples_{task.name}.jsonl"))
                                                   .decode())
        except Exception as err:  # the gallery shows "not answered"; the gate does not depend on it
            print(f"[evaluate] champion v{version.version}: no samples for {task.name} at {uri} ({err})", flush=True)
    return found


def write_gallery(recipe: Recipe, stage: str, model_uri: str, folder: Path, work: Path, tasks: list[EvalTask],
                  champion: Any | None) -> dict[str, Any]:
    """gallery.html and gallery.png in `folder`, from the samples there (and the champion's)."""
    docs = {}
    for task in tasks:
        data = work / "shapes_data" / f"{task.name}.jsonl"
        if data.is_file():
            docs[task.name] = gallery.parse_jsonl(data.read_text())
    return gallery.build_gallery(
        gallery.load_samples(folder), {t.name: t.metric for t in tasks}, folder, docs=docs,
        title=f"{recipe.name} / {stage}: {model_uri}", champion=champion_samples(champion, tasks),
        champion_label=f"champion v{champion.version}" if champion is not None else None)


def comparison_table(recipe: Recipe, stage: str, scores: dict[str, float], champion: dict[str, float] | None,
                     champion_version: str | None, gate_result: dict[str, Any]) -> str:
    """Markdown: ours vs the paper (same size and stage, in the paper's unit) vs the champion."""
    published = {f"{p.task}/{p.metric}": p for p in recipe.evaluation.published}
    lines = [f"# Evaluation: {recipe.name} / {stage}", "",
             f"Gate: **{'passed' if gate_result['passed'] else 'failed'}**"
             + "".join(f"\n- {r}" for r in gate_result["reasons"]), "",
             f"| task | metric | ours | published ({stage}) | champion{f' (v{champion_version})' if champion_version else ''}"
             " | threshold |", "|---|---|---|---|---|---|"]
    thresholds = {f"{t.name}/{t.metric}": t.threshold for t in recipe.evaluation.tasks}
    for key, value in scores.items():
        task, metric = key.split("/", 1)
        ref = published.get(key)
        paper = getattr(ref, stage, None) if ref and stage in ("stage2_si", "stage2_ov") else None
        ours = f"{value:.4g}" + (f" ({value * ref.scale:.1f})" if ref and ref.scale != 1 else "")
        champ = f"{champion[key]:.4g}" if champion and key in champion else "-"
        limit = thresholds.get(key)
        lines.append(f"| {task} | {metric} | {ours} | {'-' if paper is None else f'{paper:g}'} | {champ} | "
                     f"{'-' if limit is None else f'{limit:.4g}'} |")
    if recipe.evaluation.published_source:
        lines += ["", f"Published numbers: {recipe.evaluation.published_source}."]
    return "\n".join(lines) + "\n"


def _video_frames(recipe: Recipe) -> int:
    frames = [spec.video_frames for _, spec in recipe.stages.enabled() if spec.video_frames]
    return frames[-1] if frames else 8


def _log_to_mlflow(stage: str, mlflow_parent: str, report: dict[str, Any], folder: Path) -> dict[str, str]:
    """Log the step's run (metrics, every published file as an artifact); {"mlflow_run_id", "mlflow_experiment_id"}."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from onevision import tracking

    metrics = {key: value for key, value in report["scores"].items()}
    with tracking.step_run(f"evaluate_{stage}", mlflow_parent, params={"model_uri": report["model_uri"]}) as own:
        mlflow.log_metrics(metrics)
        mlflow.log_metric("gate_passed", float(report["gate"]["passed"]))
        mlflow.log_artifacts(str(folder))
    client = MlflowClient()
    parent = client.get_run(mlflow_parent)
    stage_runs = client.search_runs([parent.info.experiment_id],
                                    f"tags.`mlflow.parentRunId` = '{mlflow_parent}' and tags.`{tracking.TAG_STEP}` = '{stage}'")
    for run in stage_runs[:1]:  # the stage's training run gets the scores too, next to its loss curves
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, f"eval/{key}", value)
    return {"mlflow_run_id": own.info.run_id, "mlflow_experiment_id": own.info.experiment_id}


def published_report(stage: str, model_uri: str, out_uri: str) -> dict[str, Any] | None:
    """The report of an evaluation of `model_uri` already published at `out_uri`, else None."""
    try:
        meta = storage.read_manifest(out_uri)["metadata"]
    except storage.ManifestMissingError:
        return None
    if meta.get("model") != model_uri:
        raise EvaluationError(f"{out_uri} holds an evaluation of {meta.get('model')}, not {model_uri}")
    verdict = json.loads(storage.read_bytes(storage.join(out_uri, "gate.json")))
    return {"stage": stage, "model_uri": model_uri, "scores": verdict["scores"], "gate": verdict, "uri": out_uri,
            "comparison_markdown": storage.read_bytes(storage.join(out_uri, "comparison.md")).decode(),
            "champion_version": None,
            "gallery_uri": storage.join(out_uri, meta["gallery"]) if meta.get("gallery") else None}


def run(recipe_uri: str, stage: str, model_uri: str, out_uri: str, mlflow_parent: str | None = None,
        work_dir: str | None = None, include_paths: list[str] = ()) -> dict[str, Any]:
    """The pipeline step: evaluate `model_uri` (HF folder, path or s3://) trained through `stage`."""
    recipe = load_recipe(recipe_uri)
    published = published_report(stage, model_uri, out_uri)
    if published is not None:  # a resumed or retried run: the verdict stands, lmms-eval is not rerun
        return published
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"evaluate-{stage}-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="publish-", dir=work))
    tasks = list(recipe.evaluation.tasks)
    results, lmms_dir = run_lmms_eval(
        storage.resolve_source(model_uri), tasks, work / "lmms_out", template="plain" if stage == "stage1" else "qwen_1_5",
        video_frames=_video_frames(recipe), batch_size=recipe.evaluation.batch_size, seed=recipe.training.seed,
        work=work, include_paths=list(include_paths))
    scores = scores_of(results, tasks)
    reigning = champion_version(recipe.registered_model_name) if mlflow_parent or \
        os.environ.get("MLFLOW_TRACKING_URI") else None
    champion_number, champion = champion_scores(recipe.registered_model_name, reigning) if reigning else (None, None)
    verdict = gate(scores, tasks, champion)
    shutil.copy(sorted(lmms_dir.glob("*_results.json"))[-1], folder / "results.json")
    for samples in lmms_dir.glob("*_samples_*.jsonl"):
        shutil.copy(samples, folder / f"samples_{samples.stem.split('_samples_', 1)[1]}.jsonl")
    shutil.copy(work / "lmms_out" / "lmms_eval.log", folder / "lmms_eval.log")
    (folder / "gate.json").write_text(json.dumps(verdict, indent=1, sort_keys=True))
    table = comparison_table(recipe, stage, scores, champion, champion_number, verdict)
    (folder / "comparison.md").write_text(table)
    shown = write_gallery(recipe, stage, model_uri, folder, work, tasks, reigning)
    report = {"stage": stage, "model_uri": model_uri, "scores": scores, "gate": verdict, "uri": out_uri,
              "comparison_markdown": table, "champion_version": champion_number, "gallery": shown,
              "gallery_uri": storage.join(out_uri, gallery.GALLERY_HTML)}
    tracked = _log_to_mlflow(stage, mlflow_parent, report, folder) if mlflow_parent else {}
    report.update(tracked)
    storage.publish_dir(folder, out_uri, metadata={"model": model_uri, "gate_passed": verdict["passed"], **scores,
                                                   "gallery": gallery.GALLERY_HTML, **tracked})
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe YAML, local path or s3://")
    parser.add_argument("--stage", required=True, help="the stage the model finished (stage2_si, stage2_ov...)")
    parser.add_argument("--model", required=True, help="HF checkpoint folder, local or s3://")
    parser.add_argument("--out", required=True, help="where results are published (path or s3://)")
    parser.add_argument("--mlflow-parent", default=None, help="parent MLflow run id of the pipeline run")
    args = parser.parse_args(argv)
    report = run(args.recipe, args.stage, args.model, args.out, args.mlflow_parent)
    print(report["comparison_markdown"])
    sys.exit(0 if report["gate"]["passed"] else 4)


if __name__ == "__main__":
    sys.exit(run_command("evaluate", main))

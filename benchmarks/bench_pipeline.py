"""Pipeline overhead: the local KFP DAG's wall time vs the same steps' cores called directly, as a ratio.

    .venv/bin/python benchmarks/bench_pipeline.py              # writes benchmarks/results/pipeline.json (~6 min)
    .venv/bin/python benchmarks/bench_pipeline.py --quick      # fewer, smaller steps, one evaluation (~3 min)

Both runs execute the tiny recipe's whole flow on a private local stack (SeaweedFS S3 + MLflow on free
loopback ports, in a temporary state folder, stopped afterwards), on two run ids:
- ours ("DAG"): `pipelines.local.run_local` - the DAG of pipelines/onevision.py under kfp.local's
  SubprocessRunner: preflight, curate x4, train x4, evaluate x2, export, register, deploy, finish, each task a
  fresh Python subprocess (kfp executor, component imports, artifacts on disk).
- baseline ("direct"): the same cores (components/*/core.py) called in this one process, in the DAG's
  dependency order (kfp.local happens to run the four curations first; the sum is the same), the exit
  handler's (finish: end the parent MLflow run) last, with the same arguments (the pipeline's parameter
  defaults and overrides, via `pipelines.onevision.parameter_defaults` / `_overrides`), each in its own
  scratch folder.
The cores themselves start what they start in both runs (training runs `python -m model.train`,
evaluation `python -m lmms_eval`), so the difference is what the orchestration adds.
Reported: wall of each run (ratio = direct / DAG: < 1 means orchestration costs that fraction), seconds
of overhead per task, and per step kind the DAG task's wall (timed around kfp.local's task dispatch)
against the direct call. Before either run, one throwaway process imports what the steps import (torch,
transformers, deepspeed, lmms_eval, mlflow, kfp, kserve, matplotlib), untimed: without it the
DAG, which runs first, paid the cold page cache alone (measured in isolation on one trained model: the
evaluate task under kfp.local 50.2 s cold, 40.0 s warm; its core called directly 39.6-41.6 s). A recipe
variant (a temporary file extending recipes/tiny.yaml) drops the evaluation gate thresholds (a few
training steps cannot pass them, and the flow must reach export, register, deploy), cuts the evaluation
`limit`s and the synthetic sources (`?n=400`, quick 200 records); the pipeline's own parameters cap each
stage's steps and batch (full: 4 steps of 32, quick: 2 of 8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from onevision.recipe import STAGE_NAMES

ROOT = Path(__file__).resolve().parents[1]
WARM_IMPORTS = ("torch", "transformers", "deepspeed", "lmms_eval", "mlflow", "kfp", "kserve", "matplotlib")
TASKS = ("shapes_color", "shapes_mc", "shapes_multi_image", "shapes_video")
# step kind -> (DAG component name prefix, label)
KINDS = {"preflight": "preflight", "curate": "curate", "train-stage": "train", "evaluate": "evaluate",
         "export": "export", "register-model": "register", "deploy-endpoint": "deploy",
         "finish-pipeline-run": "finish"}
SETTINGS = {  # full: the recipe's DAG, 4 steps of batch 32 per stage, 400 records per source, 8 samples per eval task
    # quick: one evaluation (after Stage-2 OV, one task), 2 steps of batch 8 per stage, 200 records per source
    True: {"steps": 2, "batch": 8, "after_stages": ["stage2_ov"], "tasks": ["shapes_color"], "limit": 4, "n": 200},
    False: {"steps": 4, "batch": 32, "after_stages": ["stage2_si", "stage2_ov"], "tasks": list(TASKS), "limit": 8,
            "n": 400},
}


def write_variant(path: Path, quick: bool) -> Path:
    """recipes/tiny.yaml without gate thresholds, with the mode's evaluation limits (and data size)."""
    s = SETTINGS[quick]
    doc: dict[str, Any] = {
        "extends": str(ROOT / "recipes/tiny.yaml"),
        "evaluation": {"after_stages": s["after_stages"],
                       "tasks": [{"name": t, "metric": "exact_match", "limit": s["limit"]} for t in s["tasks"]]}}
    if s["n"]:
        from onevision.recipe import load_recipe

        tiny = load_recipe(ROOT / "recipes/tiny.yaml")
        doc["stages"] = {name: {"data": [{"dataset_uri": f"{d.dataset_uri}?n={s['n']}", "sampling_strategy":
                                          d.sampling_strategy} for d in stage.data]} for name, stage in tiny.stages.enabled()}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def pipeline_params(quick: bool) -> dict[str, Any]:
    """The DAG's own parameters cap the training (the direct run gets the same values)."""
    s = SETTINGS[quick]
    return {**{f"{stage}_max_steps": s["steps"] for stage in STAGE_NAMES},
            **{f"{stage}_global_batch_size": s["batch"] for stage in STAGE_NAMES}}


class TaskClock:
    """Times every kfp.local task dispatch (a subprocess per task) in this process."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def __enter__(self) -> TaskClock:
        from kfp.local import task_dispatcher

        self._module, self._original = task_dispatcher, task_dispatcher.run_single_task_implementation

        def timed(**kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return self._original(**kwargs)
            finally:
                self.times.append((kwargs.get("component_name", "?"), time.perf_counter() - started))

        task_dispatcher.run_single_task_implementation = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        self._module.run_single_task_implementation = self._original


def kind_of(component_name: str) -> str:
    name = component_name.removeprefix("comp-")
    for prefix, kind in KINDS.items():
        if name == prefix or name.startswith(prefix + "-"):
            return kind
    return name


def run_dag(recipe_path: Path, state: Path, run_id: str, gitops: str, params: dict[str, Any]) -> dict[str, Any]:
    from pipelines.local import run_local

    with TaskClock() as clock:
        started = time.perf_counter()
        summary = run_local(str(recipe_path), state_dir=str(state), run_id=run_id, gitops_repo=gitops, params=params)
        total = time.perf_counter() - started
    if not summary.get("registered"):
        raise RuntimeError(f"the DAG run {run_id} registered nothing: {summary}")
    return {"wall_s": summary["wall_s"], "run_local_s": total,
            "tasks": [{"kind": kind_of(name), "component": name, "seconds": s} for name, s in clock.times]}


def run_direct(recipe_path: Path, run_id: str, gitops: str, params: dict[str, Any]) -> dict[str, Any]:
    """The DAG's steps as plain calls of their cores, in its order, with its arguments."""
    from components.curate.core import DataRecipe, run_data
    from components.evaluate.core import run as evaluate
    from components.finish.core import finish_pipeline_run as finish
    from components.export.core import run as export
    from components.preflight.core import run as preflight
    from components.register.core import register
    from components.register.promote import deploy
    from components.train.core import run as train
    from onevision.recipe import load_recipe
    from pipelines.local import RUNS_ROOT
    from pipelines.onevision import _overrides, parameter_defaults

    recipe = load_recipe(recipe_path)
    values = {**parameter_defaults(recipe), **params, "deploy_env": "dev", "canary_percent": 0}
    tasks: list[dict[str, Any]] = []

    def step(kind: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"direct-{kind}-") as scratch:
            if "work_dir" in kwargs:
                kwargs["work_dir"] = scratch
            if "trainjob_path" in kwargs:
                kwargs["trainjob_path"] = str(Path(scratch) / "trainjob.json")
            out = fn(*args, **kwargs)
        tasks.append({"kind": kind, "seconds": time.perf_counter() - started})
        return out

    started = time.perf_counter()
    # curated data of its own: the DAG's, under the stack's shared data root, would otherwise be reused
    pre = step("preflight", preflight, str(recipe_path), RUNS_ROOT, run_id, _overrides(values, recipe),
               f"s3://onevision/curated-direct/{run_id}")
    run_uri, pinned, parent = pre["run_uri"], pre["recipe_uri"], pre["mlflow_parent"]
    init, data_uris, checkpoints, verdict = "", {}, {}, None
    for stage in STAGE_NAMES:
        planned = pre["data"][stage]
        cur = step("curate", lambda **kw: run_data(DataRecipe.from_json(planned["data_recipe"]), planned["data_uri"], **kw),
                   workers=values["curate_workers"] or None, work_dir="")
        trained = step("train", train, pinned, stage, cur["uri"], f"{run_uri}/{stage}", init or None, parent,
                       work_dir="", run_id=pre["run_id"], node_selector=values["gpu_node_selector"],
                       tolerations=values["gpu_tolerations"], trainjob_path="")
        init = trained["hf_uri"]
        data_uris[stage], checkpoints[stage] = cur["uri"], init
        if stage in recipe.evaluation.after_stages:
            verdict = step("evaluate", evaluate, pinned, stage, init, f"{run_uri}/evaluate/{stage}",
                           mlflow_parent=parent, work_dir="")
    if not verdict or not verdict["gate"]["passed"]:
        raise RuntimeError(f"direct run {run_id}: the gate did not pass: {verdict and verdict['gate']}")
    step("export", export, pinned, init, f"{run_uri}/export", work_dir="")
    reg = step("register", register, pinned, init, verdict["uri"], pre["run_id"], export_uri=f"{run_uri}/export",
               data_uris=data_uris, checkpoints=checkpoints)
    step("deploy", deploy, reg["name"], str(reg["version"]), values["deploy_env"], gitops,
         values["canary_percent"] or None)
    # the DAG's exit handler: ends the parent MLflow run (summary metrics, timeline), as the DAG does
    step("finish", finish, pinned, RUNS_ROOT, pre["run_id"], "SUCCEEDED")
    return {"wall_s": time.perf_counter() - started, "tasks": tasks}


def by_kind(tasks: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "seconds": 0.0})
    for task in tasks:
        out[task["kind"]]["count"] += 1
        out[task["kind"]]["seconds"] += task["seconds"]
    return dict(out)


def measure(quick: bool) -> dict[str, Any]:
    """Both runs on a private stack; the raw result (what results/pipeline.json holds)."""
    from onevision import stack

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    state = work / "stack"
    began = time.perf_counter()
    # SIGTERM (run_all's timeout) unwinds like an exception, so the stack below is stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    info = stack.stack_up(state, s3_port=stack.free_port_block(10), mlflow_port=stack.free_port_block(1))
    try:
        os.environ.update(info.env())
        gitops = work / "gitops.git"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(gitops)], check=True)
        subprocess.run([sys.executable, "-c", f"import {', '.join(WARM_IMPORTS)}"], check=True, cwd=ROOT)
        recipe_path = write_variant(work / "bench-recipe.yaml", quick)
        params = pipeline_params(quick)
        stamp = time.strftime("%H%M%S")
        dag = run_dag(recipe_path, state, f"bench-dag-{stamp}", str(gitops), params)
        direct = run_direct(recipe_path, f"bench-direct-{stamp}", str(gitops), params)
    finally:
        stack.stack_down(state)
        shutil.rmtree(work, ignore_errors=True)
    dag_kinds, direct_kinds = by_kind(dag["tasks"]), by_kind(direct["tasks"])
    n_tasks = len(direct["tasks"])
    in_tasks = sum(t["seconds"] for t in dag["tasks"])
    overhead = dag["wall_s"] - direct["wall_s"]
    per_kind = {}
    for kind, d in direct_kinds.items():
        g = dag_kinds.get(kind, {"count": 0, "seconds": float("nan")})
        per_kind[kind] = {"tasks": d["count"], "dag_task_s": round(g["seconds"], 2), "direct_s": round(d["seconds"], 2),
                          "overhead_s_per_task": round((g["seconds"] - d["seconds"]) / d["count"], 2)}
    s = SETTINGS[quick]
    return {
        "benchmark": "pipeline overhead: kfp.local DAG vs the cores called directly",
        "baseline": "the same cores called in one process, same order and arguments (no KFP, no subprocess per task)",
        "recipe": "recipes/tiny.yaml, gate thresholds dropped, evaluation limits cut",
        "max_steps_per_stage": s["steps"], "global_batch_size": s["batch"], "evaluated_after": s["after_stages"],
        "eval_tasks": s["tasks"], "eval_limit": s["limit"], "records_per_source": s["n"] or "recipe default",
        "tasks": n_tasks, "dag_tasks_timed": len(dag["tasks"]),
        "dag_wall_s": round(dag["wall_s"], 2), "direct_wall_s": round(direct["wall_s"], 2),
        "ratio_direct_vs_dag": round(direct["wall_s"] / dag["wall_s"], 3),
        "overhead_s": round(overhead, 2), "overhead_s_per_task": round(overhead / n_tasks, 2),
        "dag_between_tasks_s": round(dag["wall_s"] - in_tasks, 2),
        "per_kind": per_kind,
        "dag_tasks": [{**t, "seconds": round(t["seconds"], 2)} for t in dag["tasks"]],
        "direct_tasks": [{**t, "seconds": round(t["seconds"], 2)} for t in direct["tasks"]],
        "bench_wall_s": round(time.perf_counter() - began, 1),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """The common benchmark protocol (benchmarks/README.md)."""
    raw = measure(quick)
    rows = [{"label": f"whole flow, {raw['tasks']} tasks", "ours": raw["dag_wall_s"], "baseline": raw["direct_wall_s"],
             "notes": f"orchestration adds {raw['overhead_s']:.1f} s = {raw['overhead_s_per_task']:.1f} s/task; "
                      f"{raw['dag_between_tasks_s']:.1f} s of it between tasks"}]
    for kind, k in raw["per_kind"].items():
        rows.append({"label": f"{kind} ({k['tasks']} task{'s' if k['tasks'] > 1 else ''})", "ours": k["dag_task_s"],
                     "baseline": k["direct_s"], "notes": f"{k['overhead_s_per_task']:+.1f} s/task"})
    return {
        "name": "pipeline", "title": "pipeline overhead",
        "measures": "wall seconds of the tiny flow (preflight ... deploy): kfp.local DAG vs direct calls",
        "baseline": "the same component cores called directly in one process, same order and arguments",
        "metric": "s", "higher_is_better": False, "rows": rows,
        "series": {"per_step": {"kind": "bar", "title": "seconds per step kind: kfp.local DAG vs direct calls",
                                "ylabel": "seconds (sum over the kind's tasks)", "x": list(raw["per_kind"]), "log_y": True,
                                "lines": {"DAG (ours)": [k["dag_task_s"] for k in raw["per_kind"].values()],
                                          "direct (baseline)": [k["direct_s"] for k in raw["per_kind"].values()]}}},
        "details": raw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 steps of batch 8 per stage, one evaluation, 200 records "
                                                             "per source")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/pipeline.json"))
    args = parser.parse_args()
    result = measure(args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

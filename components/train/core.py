"""Train one stage of a recipe: torchrun in this pod, or a Kubeflow Trainer TrainJob when it spans nodes.

    python -m components.train.core --recipe recipes/tiny.yaml --stage stage1 \
        --data s3://onevision/runs/tiny/r1/curate/stage1 --out s3://onevision/runs/tiny/r1/stage1

It takes `python -m model.train`'s flags (one definition, model.train.add_stage_arguments) and hands
them on, plus --run-id (names a TrainJob).

One node: `python -m model.train` (one process per GPU through torchrun when the pod has more than one
GPU) in this pod's own process tree. More than one node (`cluster.steps.<stage>.nodes` in the recipe):
a TrainJob on the ClusterTrainingRuntime of infra/platform/base/trainer-runtime.yaml runs the same
command on every node; this step submits it, saves its manifest, streams its logs and waits.
Either way the stage's output is `<out>/hf` (published, manifest last). A stage already published is
not redone, and an interrupted one resumes from its newest complete checkpoint under `<out>/checkpoints`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from onevision import storage
from onevision.recipe import load_recipe
from onevision.cli_exit import run_command


class TrainStepError(RuntimeError):
    """The stage did not produce a published checkpoint; the message says why and how to resume."""


def train_args(recipe_uri: str, stage: str, data_uri: str, out_uri: str, init_uri: str | None,
               work_dir: str | None, mlflow_parent: str | None, holdout: int | None = None,
               summary_path: str | None = None) -> list[str]:
    """The arguments of `model.train`, the same on every node."""
    args = ["--recipe", recipe_uri, "--stage", stage, "--data", data_uri, "--out", out_uri]
    args += ["--init", init_uri] if init_uri else []
    args += ["--work-dir", work_dir] if work_dir else []
    args += ["--mlflow-parent", mlflow_parent] if mlflow_parent else []
    args += ["--holdout", str(holdout)] if holdout is not None else []
    args += ["--summary", summary_path] if summary_path else []
    return args


def train_command(args: list[str], gpus: int) -> list[str]:
    """One pod: torchrun when it trains on several GPUs, else one process (a world of one)."""
    if gpus > 1:
        return ["torchrun", "--standalone", f"--nproc-per-node={gpus}", "-m", "model.train", *args]
    return [sys.executable, "-m", "model.train", *args]


def _published(uri: str) -> dict[str, Any] | None:
    try:
        return storage.read_manifest(uri)["metadata"]
    except storage.ManifestMissingError:
        return None


def trainjob_name(run_id: str, stage: str) -> str:
    """A DNS-1035 label, unique per (pipeline run, stage), so a retried step attaches to its own job.
    At most 40 characters: JobSet refuses pod names (`<name>-node-0-<rank>-<5>`) over 63."""
    run_slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    stage_slug = stage.replace("_", "-")
    if len(run_slug) > 16:  # a KFP run UUID: a readable prefix plus a hash of the whole id keeps it unique
        run_slug = f"{run_slug[:8].strip('-')}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"
    return f"ov-{run_slug}-{stage_slug}"


def run(recipe_uri: str, stage: str, data_uri: str, out_uri: str, init_uri: str | None = None,
        mlflow_parent: str | None = None, work_dir: str | None = None, run_id: str = "local",
        node_selector: dict[str, str] | None = None, tolerations: list[dict[str, Any]] | None = None,
        trainjob_path: str | None = None, timeout_s: float = 7 * 24 * 3600, poll_s: float = 10.0,
        holdout: int | None = None, summary_path: str | None = None) -> dict[str, Any]:
    """Train `stage` and return its published checkpoint's metadata plus `hf_uri` and how it ran (`mode`).
    `holdout` goes to model.train (its default when None); `summary_path` gets the stage summary: the
    trainer's own in this pod, else (already published, or a TrainJob) the published metadata + `hf_uri`."""
    hf_uri = storage.join(out_uri, "hf")
    done = _published(hf_uri)
    if done is not None:  # a rerun of a finished step costs one manifest read, not a trainer start-up
        print(f"[train] {stage}: already published at {hf_uri}", flush=True)
        _write_summary(summary_path, {**done, "hf_uri": hf_uri})
        return {**done, "hf_uri": hf_uri, "mode": "published"}

    recipe = load_recipe(recipe_uri)
    resources = recipe.cluster.resources(stage)
    if resources.nodes > 1:
        mode = "trainjob"
        _run_trainjob(recipe_uri, stage, data_uri, out_uri, init_uri, mlflow_parent, run_id, recipe, node_selector,
                      tolerations, trainjob_path, timeout_s, poll_s, holdout)
    else:
        mode = "local"
        cmd = train_command(train_args(recipe_uri, stage, data_uri, out_uri, init_uri, work_dir, mlflow_parent,
                                       holdout, summary_path), resources.gpus)
        env = dict(os.environ)
        if not resources.gpus:
            env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed probes CUDA otherwise
        code = subprocess.run(cmd, env=env).returncode
        if code != 0:
            raise TrainStepError(f"{stage}: training exited with {code}; rerun the step (same --out) to resume "
                                 f"from the newest complete checkpoint under {storage.join(out_uri, 'checkpoints')}")
    done = _published(hf_uri)
    if done is None:
        raise TrainStepError(f"{stage}: training ended but {hf_uri} is not published")
    if mode == "trainjob":  # the trainer wrote its summary on the node
        _write_summary(summary_path, {**done, "hf_uri": hf_uri})
    return {**done, "hf_uri": hf_uri, "mode": mode}


def _write_summary(path: str | None, summary: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(summary, indent=1, default=str))


def _run_trainjob(recipe_uri: str, stage: str, data_uri: str, out_uri: str, init_uri: str | None,
                  mlflow_parent: str | None, run_id: str, recipe: Any, node_selector: dict[str, str] | None,
                  tolerations: list[dict[str, Any]] | None, trainjob_path: str | None, timeout_s: float,
                  poll_s: float, holdout: int | None) -> None:
    from components import PROJECT_IMAGE
    from components.train.trainjob import run_trainjob, trainjob_manifest

    resources = recipe.cluster.resources(stage)
    # every node runs model.train under the runtime's torchrun; scratch on the node's own disk
    args = train_args(recipe_uri, stage, data_uri, out_uri, init_uri, "/scratch", mlflow_parent, holdout)
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI",
                                      "ONEVISION_PIPELINE_RUN_ID", "ONEVISION_MLFLOW_EXPERIMENT") if k in os.environ}
    manifest = trainjob_manifest(
        # the step pod's own namespace (downward API), where the pipeline's service account may create TrainJobs
        name=trainjob_name(run_id, stage), namespace=os.environ.get("ONEVISION_NAMESPACE", recipe.cluster.namespace),
        image=PROJECT_IMAGE, train_args=args, nodes=resources.nodes, gpus_per_node=resources.gpus,
        cpu=resources.cpu, memory=resources.memory,
        node_selector=node_selector if node_selector is not None else dict(resources.node_selector),
        tolerations=tolerations if tolerations is not None else
        [t.model_dump(exclude_none=True) for t in resources.tolerations],
        s3_secret=recipe.cluster.s3_secret, env=env)
    if trainjob_path:
        Path(trainjob_path).parent.mkdir(parents=True, exist_ok=True)
        Path(trainjob_path).write_text(json.dumps(manifest, indent=1))
    run_trainjob(manifest, timeout_s=timeout_s, poll_s=poll_s, log=lambda line: print(line, flush=True))


def build_parser() -> argparse.ArgumentParser:
    """model.train's own flags (one definition: model.train.add_stage_arguments), plus --run-id."""
    from model.train import add_stage_arguments

    parser = argparse.ArgumentParser(prog="python -m components.train.core", description=__doc__.split("\n\n")[0])
    add_stage_arguments(parser)
    parser.add_argument("--run-id", default="local", help="the pipeline run id (names a TrainJob)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"train-{args.stage}-") as scratch:
        # --work-dir: model.train's scratch in this pod (a TrainJob's nodes use their own /scratch)
        result = run(args.recipe, args.stage, args.data, args.out, args.init, args.mlflow_parent,
                     work_dir=args.work_dir or scratch, run_id=args.run_id, holdout=args.holdout,
                     summary_path=args.summary)
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(run_command("train-step", main))

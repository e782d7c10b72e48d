"""The train step as a KFP v2 component: a thin wrapper over `components.train.core.run`.

    tr = train_stage(recipe_uri=recipe_uri, stage="stage1", data_uri=cur.outputs["shards_uri"], init_uri="",
                     out_uri=f"{run_uri}/stage1", mlflow_parent=parent, run_id=run_id,
                     node_selector=gpu_node_selector, tolerations=gpu_tolerations)
    tr.outputs["hf_uri"]     # s3://.../stage1/hf: the merged checkpoint, the next stage's init_uri
    tr.outputs["trainjob"]   # the TrainJob manifest (JSON) when the stage spans nodes
    tr.outputs["metrics"]    # steps, train loss, held-out loss before/after

`node_selector` / `tolerations` reach the TrainJob's pods (multi-node); the step's own pod is placed by
kfp-kubernetes in the pipeline. `init_uri=""` starts from the recipe's model sources.
No `from __future__ import annotations`: KFP reads the real annotation objects.
"""

from typing import NamedTuple

from kfp import dsl

from components import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def train_stage(
    recipe_uri: str,
    stage: str,
    data_uri: str,
    init_uri: str,
    out_uri: str,
    mlflow_parent: str,
    run_id: str,
    node_selector: dict,
    tolerations: list,
    trainjob: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("Outputs", [("hf_uri", str)]):
    """Train one stage of the recipe from init_uri on data_uri; publish the checkpoint under out_uri/hf."""
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from components.train.core import run

    Path(trainjob.path).parent.mkdir(parents=True, exist_ok=True)
    Path(trainjob.path).write_text("{}")  # replaced by the TrainJob manifest when the stage spans nodes
    with tempfile.TemporaryDirectory(prefix=f"train-{stage}-") as scratch:  # checkpoints go to out_uri
        result = run(recipe_uri, stage, data_uri, out_uri, init_uri or None, mlflow_parent or None,
                     work_dir=scratch, run_id=run_id, node_selector=node_selector, tolerations=tolerations,
                     trainjob_path=trainjob.path)
    trainjob.metadata.update({"mode": result["mode"], "stage": stage})
    for name in ("steps", "train_loss", "eval_loss_before", "eval_loss_after"):
        if isinstance(result.get(name), (int, float)):
            metrics.log_metric(name, float(result[name]))
    return namedtuple("Outputs", ["hf_uri"])(result["hf_uri"])

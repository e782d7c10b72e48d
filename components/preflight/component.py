"""The preflight step as a KFP v2 component: a thin wrapper over `components.preflight.core.run`.

    pre = preflight(recipe_uri=recipe_uri, runs_root=runs_root, data_root=data_root, run_id=run_id,
                    kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, overrides={"stage1.lr": stage1_learning_rate})
    pre.outputs["run_uri"]        # s3://onevision/runs/<recipe>/<run id>: every step writes below it
    pre.outputs["recipe_uri"]     # the pinned recipe (overrides applied) every later step reads
    pre.outputs["mlflow_parent"]  # the pipeline's parent MLflow run
    pre.outputs["stage1_data_recipe"], pre.outputs["stage1_data_uri"]   # what the cached curate step takes

`run_id=""` takes the KFP run's own id, so a cluster run needs no id; a local rerun passes its id to resume.
No `from __future__ import annotations`: KFP reads the real annotation objects.
"""

from typing import NamedTuple

from kfp import dsl

from components import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def preflight(recipe_uri: str, runs_root: str, data_root: str, run_id: str, kfp_run_id: str, overrides: dict
              ) -> NamedTuple("Outputs", [("run_id", str), ("run_uri", str), ("recipe_uri", str), ("mlflow_parent", str),
                                          ("stage1_data_recipe", str), ("stage1_data_uri", str),
                                          ("stage1_5_data_recipe", str), ("stage1_5_data_uri", str),
                                          ("stage2_si_data_recipe", str), ("stage2_si_data_uri", str),
                                          ("stage2_ov_data_recipe", str), ("stage2_ov_data_uri", str)]):
    """Check S3, MLflow, the registry and credentials; pin the recipe with the run's parameters and each
    stage's data recipe with its content-addressed prefix (empty for a disabled stage)."""
    from collections import namedtuple

    from components.preflight.core import run
    from onevision.recipe import STAGE_NAMES

    result = run(recipe_uri, runs_root, run_id or kfp_run_id, overrides, data_root)
    data = {f"{stage}_{key}": result["data"].get(stage, {}).get(key, "") for stage in STAGE_NAMES
            for key in ("data_recipe", "data_uri")}
    fields = ["run_id", "run_uri", "recipe_uri", "mlflow_parent", *data]
    return namedtuple("Outputs", fields)(result["run_id"], result["run_uri"], result["recipe_uri"],
                                         result["mlflow_parent"], *data.values())

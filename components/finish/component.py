"""The pipeline's exit handler as a KFP v2 component: a thin wrapper over `components.finish.core`.

    finish = finish_pipeline_run(recipe_uri=recipe_uri, runs_root=runs_root, run_id=run_id,
                                 kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    with dsl.ExitHandler(finish, name="pipeline-run"):
        ...every other task...

An exit task takes only pipeline parameters (no other task's output), so it finds the parent MLflow run
the way every step does, by the run id (`run_id=""`: the KFP run's own id, as preflight resolves it), and
the experiment from the recipe's name. KFP fills `status` with the DAG's final state.
No `from __future__ import annotations`: KFP reads the real annotation objects.
"""

from kfp import dsl

from components import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def finish_pipeline_run(recipe_uri: str, runs_root: str, run_id: str, kfp_run_id: str,
                        status: dsl.PipelineTaskFinalStatus):
    """End the pipeline run's parent MLflow run: summary metrics, timeline.png, FINISHED or FAILED."""
    from components.finish.core import finish_pipeline_run as finish

    finish(recipe_uri, runs_root, run_id or kfp_run_id, status.state)

"""The LLaVA-OneVision Kubeflow Pipelines v2 DAG, built from a recipe.

    onevision compile --recipe recipes/ov-7b.yaml -o pipelines/compiled/ov-7b.yaml   # for the KFP UI
    onevision run --recipe recipes/tiny.yaml                                          # the same DAG, kfp.local

    preflight -> curate(stage) ... -> stage1 -> stage1_5 -> stage2_si -> evaluate(SI) -> stage2_ov
              -> evaluate(OV) -> [gate passed] export -> register -> [gitops_repo set] deploy
                                 [gate failed] stop_on_failed_gate (the run fails, naming the gate's reasons)
    finish (the exit handler, after all of them whatever happened): ends the parent MLflow run

Curation fans out when `curation.partitions` > 1: per stage a ParallelFor of partition pods, then one
merge (curate_tasks). The recipe gives the DAG's shape (which stages, which are evaluated, GPUs per step, which stage spans
nodes) and the pipeline parameters' defaults; the parameters (typed, prefixed by step) override it per
run, and preflight pins the result as the run's recipe. One compiled pipeline fits any GPU pool: node
selector and tolerations are JSON parameters. Credentials come from Kubernetes Secrets by name; the
in-cluster endpoints from the `onevision-endpoints` ConfigMap (infra/platform). Export runs before
register so that the registered version already names its Triton repository and manifests.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's real annotation objects.
from collections.abc import Callable
from typing import Any

from kfp import dsl, kubernetes

from components.curate.component import curate, curate_partition
from components.evaluate.component import evaluate, stop_on_failed_gate
from components.export.component import export
from components.finish.component import finish_pipeline_run
from components.preflight.component import preflight
from components.register.component import deploy_endpoint, register_model
from components.train.component import train_stage
from components.train.trainjob import QUEUE, QUEUE_LABEL
from onevision.recipe import STAGE_NAMES, Recipe

# KFP parameter suffix -> StageSpec field (preflight applies them as `<stage>.<field>` overrides)
STAGE_PARAMETERS = {"learning_rate": "lr", "vision_tower_learning_rate": "vision_tower_lr",
                    "global_batch_size": "global_batch_size", "epochs": "epochs", "max_steps": "max_steps"}
# (timeout seconds, retries): training retries are cheap (resume from the newest complete checkpoint);
# preflight never retries (its failure is a configuration error); the rest retry transient faults once.
STEP_POLICY = {"preflight": (600, 0), "curate": (12 * 3600, 1), "train": (7 * 24 * 3600, 2),
               "evaluate": (12 * 3600, 1), "stop": (300, 0), "export": (2 * 3600, 1), "register": (600, 2),
               "deploy": (600, 2), "finish": (600, 2)}
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}  # infra/platform/base
ENDPOINTS_CONFIGMAP = "onevision-endpoints"
ENDPOINT_KEYS = {"s3_endpoint": "AWS_ENDPOINT_URL", "mlflow_tracking_uri": "MLFLOW_TRACKING_URI"}
# MLflow's client retries a dead server for minutes by default; a step should fail in about a minute and
# let the step's own retry policy decide (preflight and steps check /health first anyway)
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
GITOPS_SECRET = "onevision-gitops"  # key .git-credentials (git's credential store format)
GITOPS_MOUNT = "/var/run/secrets/onevision/gitops"
# /dev/shm of a GPU step: a container gets 64 MiB by default, too little for torchrun's DataLoader workers
# and NCCL's shared-memory transport between 8 local ranks. Memory-backed, like the Trainer runtime's
# (infra/platform/base/trainer-runtime.yaml); it counts against the step's memory limit.
SHM_VOLUME, SHM_PATH, SHM_SIZE = "dshm", "/dev/shm", "16Gi"


def parameter_defaults(recipe: Recipe) -> dict[str, Any]:
    """The pipeline parameters and their defaults from the recipe (0 stands for the recipe's None)."""
    defaults: dict[str, Any] = {"curate_workers": recipe.curation.workers,
                                "evaluate_batch_size": recipe.evaluation.batch_size,
                                "training_seed": recipe.training.seed}
    for name, stage in recipe.stages.enabled():
        for suffix, field in STAGE_PARAMETERS.items():
            value = getattr(stage, field)
            defaults[f"{name}_{suffix}"] = value if value is not None else (0.0 if field.endswith("lr") else 0)
    gpu_steps = [recipe.cluster.resources(s) for s in (*STAGE_NAMES, "evaluate") if recipe.cluster.resources(s).gpus]
    defaults["gpu_node_selector"] = dict(gpu_steps[0].node_selector) if gpu_steps else {}
    defaults["gpu_tolerations"] = [t.model_dump(exclude_none=True) for t in gpu_steps[0].tolerations] if gpu_steps else []
    return defaults


def _overrides(params: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """Pipeline parameters -> preflight's dotted recipe overrides."""
    overrides = {"curation.workers": params["curate_workers"], "evaluation.batch_size": params["evaluate_batch_size"],
                 "training.seed": params["training_seed"]}
    for name, _ in recipe.stages.enabled():
        overrides.update({f"{name}.{field}": params[f"{name}_{suffix}"] for suffix, field in STAGE_PARAMETERS.items()})
    return overrides


def _place(task: dsl.PipelineTask, step: str, recipe: Recipe, params: dict[str, Any], policy: str,
           cache: bool = False, launcher: bool = False) -> dsl.PipelineTask:
    """Resources, GPU pool placement, credentials, timeout, retries and caching of one task. A launcher
    (the pod of a multi-node stage, which only submits and watches its TrainJob) stays small and off the GPUs."""
    resources = recipe.cluster.resources(step)
    task.set_caching_options(cache)
    task.set_cpu_limit("1" if launcher else resources.cpu).set_memory_limit("2Gi" if launcher else resources.memory)
    if resources.gpus and not launcher:
        task.set_accelerator_type(resources.accelerator_type or "nvidia.com/gpu").set_accelerator_limit(resources.gpus)
        kubernetes.add_node_selector_json(task, params["gpu_node_selector"])
        kubernetes.add_toleration_json(task, params["gpu_tolerations"])
        kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME, mount_path=SHM_PATH, medium="Memory",
                                   size_limit=SHM_SIZE)
        # Kueue's pod integration holds the pod (scheduling gate) until the ClusterQueue has its GPUs; the
        # same LocalQueue as the TrainJobs, so one quota covers both (infra/platform/base/quota.yaml)
        kubernetes.add_pod_label(task, QUEUE_LABEL, QUEUE)
    kubernetes.use_secret_as_env(task, recipe.cluster.s3_secret, S3_SECRET_KEYS)
    kubernetes.use_config_map_as_env(task, ENDPOINTS_CONFIGMAP, ENDPOINT_KEYS)
    for name, value in MLFLOW_CLIENT_ENV.items():
        task.set_env_variable(name, value)
    timeout_s, retries = STEP_POLICY[policy]
    kubernetes.set_timeout(task, timeout_s)
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0)
    return task


def curate_tasks(stage: str, data_recipe: Any, out_uri: Any, workers: Any, partitions: int,
                 place: Callable[[dsl.PipelineTask, bool], dsl.PipelineTask] = lambda task, cache: task
                 ) -> dsl.PipelineTask:
    """The task whose `shards_uri` is `stage`'s curated data. One `curate` task; with `partitions` > 1, a
    dsl.ParallelFor of `curate_partition` tasks (one pod per slice of every source), then `curate`
    merging their collected partition URIs. `place(task, cache)` sets resources and credentials."""
    if partitions == 1:
        single = curate(data_recipe=data_recipe, out_uri=out_uri, workers=workers)
        return place(single.set_display_name(f"curate {stage}"), True)
    with dsl.ParallelFor(items=list(range(partitions)), name=f"curate-{stage}-partitions".replace("_", "-")) as index:
        part = curate_partition(data_recipe=data_recipe, out_uri=out_uri, partition=index, partitions=partitions,
                                workers=workers).set_display_name(f"curate {stage} partition")
        # not cached: the merge removes spent partitions, so a cache hit would name files that are gone;
        # a partition pod whose stage is already published returns at once anyway
        place(part, False)
    merged = curate(data_recipe=data_recipe, out_uri=out_uri, workers=workers,
                    partition_uris=dsl.Collected(part.outputs["partition_uri"]))
    return place(merged.set_display_name(f"curate {stage} merge"), True)


def build_pipeline(recipe: Recipe, recipe_uri: str, runs_root: str = "s3://onevision/runs",
                   data_root: str = "s3://onevision/curated") -> Callable[..., Any]:
    """The KFP pipeline for `recipe`; `recipe_uri` is what pods read (a path in the image, or s3://)."""
    enabled = [name for name, _ in recipe.stages.enabled()]
    if enabled != list(STAGE_NAMES):
        raise ValueError(f"recipe {recipe.name}: the pipeline chains all of {list(STAGE_NAMES)}; enabled: {enabled}")
    final = enabled[-1]
    if final not in recipe.evaluation.after_stages:
        raise ValueError(f"recipe {recipe.name}: evaluation.after_stages must include {final} (it gates register)")
    d = parameter_defaults(recipe)

    @dsl.pipeline(name=f"onevision-{recipe.name}".replace("_", "-").replace(".", "-"),
                  description=f"LLaVA-OneVision ({recipe.name}): curate, four training stages, LMMs-Eval, "
                              "gate, export, register, deploy.")
    def onevision(
        run_id: str = "",
        recipe_uri: str = recipe_uri,
        runs_root: str = runs_root,
        data_root: str = data_root,
        curate_workers: int = d["curate_workers"],
        stage1_learning_rate: float = d["stage1_learning_rate"],
        stage1_vision_tower_learning_rate: float = d["stage1_vision_tower_learning_rate"],
        stage1_global_batch_size: int = d["stage1_global_batch_size"],
        stage1_epochs: float = d["stage1_epochs"],
        stage1_max_steps: int = d["stage1_max_steps"],
        stage1_5_learning_rate: float = d["stage1_5_learning_rate"],
        stage1_5_vision_tower_learning_rate: float = d["stage1_5_vision_tower_learning_rate"],
        stage1_5_global_batch_size: int = d["stage1_5_global_batch_size"],
        stage1_5_epochs: float = d["stage1_5_epochs"],
        stage1_5_max_steps: int = d["stage1_5_max_steps"],
        stage2_si_learning_rate: float = d["stage2_si_learning_rate"],
        stage2_si_vision_tower_learning_rate: float = d["stage2_si_vision_tower_learning_rate"],
        stage2_si_global_batch_size: int = d["stage2_si_global_batch_size"],
        stage2_si_epochs: float = d["stage2_si_epochs"],
        stage2_si_max_steps: int = d["stage2_si_max_steps"],
        stage2_ov_learning_rate: float = d["stage2_ov_learning_rate"],
        stage2_ov_vision_tower_learning_rate: float = d["stage2_ov_vision_tower_learning_rate"],
        stage2_ov_global_batch_size: int = d["stage2_ov_global_batch_size"],
        stage2_ov_epochs: float = d["stage2_ov_epochs"],
        stage2_ov_max_steps: int = d["stage2_ov_max_steps"],
        training_seed: int = d["training_seed"],
        evaluate_batch_size: int = d["evaluate_batch_size"],
        gpu_node_selector: dict = d["gpu_node_selector"],
        gpu_tolerations: list = d["gpu_tolerations"],
        deploy_env: str = "dev",
        gitops_repo: str = "",
        canary_percent: int = 0,
    ) -> None:
        """LLaVA-OneVision: curate -> Stage-1 -> Stage-1.5 -> Stage-2 SI -> eval -> Stage-2 OV -> eval -> gate
        -> export -> register -> deploy. Defaults come from the recipe the pipeline was compiled from.

        Args:
            run_id: Run id; outputs go to <runs_root>/<recipe>/<run_id>. Empty: the KFP run's id. Reuse an id to resume.
            recipe_uri: The recipe every step reads (a path inside the project image, or s3://).
            runs_root: S3 prefix under which runs are written.
            data_root: S3 prefix of curated data, content-addressed (<data_root>/<recipe>/<stage>/<data recipe hash>) and shared by every run with the same data.
            curate_workers: Decode/validate processes per curation step (0: one per CPU core).
            stage1_learning_rate: Stage-1 (alignment, projector only) peak learning rate.
            stage1_vision_tower_learning_rate: Stage-1 vision tower learning rate (0 while the tower is frozen).
            stage1_global_batch_size: Stage-1 global batch size (samples per optimizer step).
            stage1_epochs: Stage-1 epochs over the curated data.
            stage1_max_steps: Stage-1 step cap (0: epochs decide).
            stage1_5_learning_rate: Stage-1.5 (high-quality knowledge, full model) peak learning rate.
            stage1_5_vision_tower_learning_rate: Stage-1.5 vision tower learning rate (0 while the tower is frozen).
            stage1_5_global_batch_size: Stage-1.5 global batch size.
            stage1_5_epochs: Stage-1.5 epochs.
            stage1_5_max_steps: Stage-1.5 step cap (0: epochs decide).
            stage2_si_learning_rate: Stage-2 single-image instruction tuning peak learning rate.
            stage2_si_vision_tower_learning_rate: Stage-2 SI vision tower learning rate (0 while the tower is frozen).
            stage2_si_global_batch_size: Stage-2 SI global batch size.
            stage2_si_epochs: Stage-2 SI epochs.
            stage2_si_max_steps: Stage-2 SI step cap (0: epochs decide).
            stage2_ov_learning_rate: Stage-2 OneVision (single-image, multi-image, video) peak learning rate.
            stage2_ov_vision_tower_learning_rate: Stage-2 OV vision tower learning rate (0 while the tower is frozen).
            stage2_ov_global_batch_size: Stage-2 OV global batch size.
            stage2_ov_epochs: Stage-2 OV epochs.
            stage2_ov_max_steps: Stage-2 OV step cap (0: epochs decide).
            training_seed: Seed of data order, sampling and initialisation.
            evaluate_batch_size: LMMs-Eval batch size (the paper's protocol is 1).
            gpu_node_selector: JSON node selector of the GPU steps, e.g. {"onevision/pool": "gpu"} (only labels the Terraform pool templates carry: the autoscaler scales from zero on them).
            gpu_tolerations: JSON list of tolerations of the GPU steps, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists"}].
            deploy_env: Non-production environment the gated model is deployed to (its GitOps overlay and MLflow alias).
            gitops_repo: GitOps repository URL the deploy step pushes a branch to (empty: no deploy step).
            canary_percent: Canary traffic percent of the deployment (0: the recipe's).
        """
        params = dict(locals())
        # the parent MLflow run spans the pipeline run: this exit task ends it, whatever happened inside
        finish = finish_pipeline_run(recipe_uri=recipe_uri, runs_root=runs_root, run_id=run_id,
                                     kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        _place(finish.set_display_name("finish"), "finish", recipe, params, "finish")
        with dsl.ExitHandler(finish, name="pipeline-run"):
            pre = preflight(recipe_uri=recipe_uri, runs_root=runs_root, data_root=data_root, run_id=run_id,
                            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, overrides=_overrides(params, recipe))
            _place(pre, "preflight", recipe, params, "preflight")
            run_uri, pinned, parent = pre.outputs["run_uri"], pre.outputs["recipe_uri"], pre.outputs["mlflow_parent"]

            init, previous, evaluations = "", None, {}
            data_uris, checkpoints = {}, {}
            for stage in enabled:
                # nothing run-specific in: a run with the same data recipe hits the cache (or the published prefix)
                cur = curate_tasks(stage, pre.outputs[f"{stage}_data_recipe"], pre.outputs[f"{stage}_data_uri"],
                                   curate_workers, recipe.curation.partitions,
                                   lambda task, cache: _place(task, "curate", recipe, params, "curate", cache=cache))
                multi_node = recipe.cluster.resources(stage).nodes > 1
                train = train_stage(recipe_uri=pinned, stage=stage, data_uri=cur.outputs["shards_uri"], init_uri=init,
                                    out_uri=f"{run_uri}/{stage}", mlflow_parent=parent, run_id=pre.outputs["run_id"],
                                    node_selector=gpu_node_selector, tolerations=gpu_tolerations)
                _place(train.set_display_name(stage), stage, recipe, params, "train", launcher=multi_node)
                kubernetes.use_field_path_as_env(train, "ONEVISION_NAMESPACE", "metadata.namespace")  # the TrainJob's
                if previous is not None:
                    train.after(previous)  # Stage-2 OV waits for the SI evaluation (GPUs are the scarce resource)
                init = train.outputs["hf_uri"]
                data_uris[stage], checkpoints[stage] = cur.outputs["shards_uri"], init
                previous = train
                if stage in recipe.evaluation.after_stages:
                    ev = evaluate(recipe_uri=pinned, stage=stage, model_uri=init, out_uri=f"{run_uri}/evaluate/{stage}",
                                  mlflow_parent=parent).set_display_name(f"evaluate {stage}")
                    _place(ev, "evaluate", recipe, params, "evaluate")
                    evaluations[stage] = previous = ev

            gate = evaluations[final]
            with dsl.If(gate.outputs["passed"] == True, name="gate-passed"):  # noqa: E712 - a KFP condition
                exported = export(recipe_uri=pinned, model_uri=init, out_uri=f"{run_uri}/export")
                _place(exported, "export", recipe, params, "export")
                registered = register_model(recipe_uri=pinned, model_uri=init, evaluation_uri=gate.outputs["results_uri"],
                                            export_uri=f"{run_uri}/export", pipeline_run_id=pre.outputs["run_id"],
                                            data_uris=data_uris, checkpoints=checkpoints)
                registered.after(exported)  # the version names the published export
                _place(registered, "register", recipe, params, "register")
                with dsl.If(gitops_repo != "", name="gitops-repo-set"):
                    deployed = deploy_endpoint(name=registered.outputs["name"], version=registered.outputs["version"],
                                               env=deploy_env, gitops_repo=gitops_repo, canary_percent=canary_percent)
                    _place(deployed, "deploy", recipe, params, "deploy")
                    kubernetes.use_secret_as_volume(deployed, GITOPS_SECRET, GITOPS_MOUNT, optional=True)
                    deployed.set_env_variable("GIT_CONFIG_COUNT", "1").set_env_variable(
                        "GIT_CONFIG_KEY_0", "credential.helper").set_env_variable(
                        "GIT_CONFIG_VALUE_0", f"store --file={GITOPS_MOUNT}/.git-credentials")
            with dsl.Else(name="gate-failed"):
                stop = stop_on_failed_gate(stage=final, reasons=gate.outputs["reasons"], results_uri=gate.outputs["results_uri"])
                _place(stop, "register", recipe, params, "stop")

    return onevision

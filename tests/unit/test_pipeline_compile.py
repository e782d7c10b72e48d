"""The compiled pipelines under pipelines/compiled/: no drift, strict KFP IR, cluster placement, no secrets.

Every preset is recompiled here and compared with the committed YAML (after changing a component, a recipe
or the DAG: `onevision compile --all`). Both documents parse strictly (a misspelt field fails) into the KFP
`PipelineSpec` and the kfp-kubernetes `KubernetesExecutorConfig` of the `PlatformSpec`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from onevision.recipe import STAGE_NAMES as STAGES
from onevision.recipe import load_recipe
from pipelines.compile import compile_pipeline, preset_paths
from pipelines.onevision import STEP_POLICY, parameter_defaults

PRESETS = {recipe.stem: (recipe, compiled) for recipe, compiled in preset_paths().items()}


def load_compiled(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(path.read_text())
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # strict: unknown fields raise
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    for executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        json_format.ParseDict(executor, kubernetes_executor_config_pb2.KubernetesExecutorConfig())
    return spec, platform


def executors_of(spec: dict[str, Any], component: str) -> list[str]:
    """Executor labels of every task instance of a component (train-stage, train-stage-2, ...)."""
    return sorted(c["executorLabel"] for name, c in spec["components"].items()
                  if re.fullmatch(rf"comp-{component}(-\d+)?", name))


def all_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def test_every_preset_has_a_committed_pipeline() -> None:
    assert set(PRESETS) == {"tiny", "ov-0.5b", "ov-7b", "ov-72b"}
    for recipe, compiled in PRESETS.values():
        assert compiled.exists(), f"{compiled} missing: run `onevision compile --all`"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_committed_pipeline_matches_a_fresh_compile(preset: str, tmp_path: Path) -> None:
    recipe, committed = PRESETS[preset]
    fresh = compile_pipeline(recipe, tmp_path / committed.name)
    # parsed, not text: the header comment prints dict defaults in protobuf map order, which varies
    assert list(yaml.safe_load_all(fresh.read_text())) == list(yaml.safe_load_all(committed.read_text())), \
        f"{committed} drifted from the code/recipe: run `onevision compile --all` and commit"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameters_are_typed_documented_and_default_to_the_recipe(preset: str) -> None:
    recipe_path, compiled = PRESETS[preset]
    spec, _ = load_compiled(compiled)
    params = spec["root"]["inputDefinitions"]["parameters"]
    defaults = parameter_defaults(load_recipe(recipe_path))
    for name, value in defaults.items():
        assert params[name]["defaultValue"] == value, name
        assert params[name]["description"], f"{name} has no description in the KFP UI"
    assert params["stage2_si_learning_rate"]["parameterType"] == "NUMBER_DOUBLE"
    assert params["stage1_global_batch_size"]["parameterType"] == "NUMBER_INTEGER"
    assert params["gpu_node_selector"]["parameterType"] == "STRUCT"
    assert params["gpu_tolerations"]["parameterType"] == "LIST"
    assert params["recipe_uri"]["defaultValue"] == f"recipes/{recipe_path.name}"  # a path in the image


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dag_order_gate_and_caching(preset: str) -> None:
    spec, _ = load_compiled(PRESETS[preset][1])
    tasks = all_tasks(spec)
    deps = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    trains = sorted(n for n in tasks if n.startswith("train-stage"))
    assert len(trains) == len(STAGES)
    partitions = load_recipe(PRESETS[preset][0]).curation.partitions
    for name, task in tasks.items():
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (name.startswith("curate") and not name.startswith("curate-partition")), \
            f"{name}: caching {cached}"
    # curation can hit KFP's cache across runs: its inputs are preflight's pinned data recipe and content-addressed
    # prefix and the worker count, nothing that differs between two runs with the same data
    for number, stage in enumerate(STAGES, 1):
        name = "curate" if number == 1 else f"curate-{number}"
        params = tasks[name]["inputs"]["parameters"]
        assert set(params) == {"data_recipe", "out_uri", "workers"} | ({"partition_uris"} if partitions > 1 else set())
        assert params["data_recipe"]["taskOutputParameter"] == {"producerTask": "preflight",
                                                                "outputParameterKey": f"{stage}_data_recipe"}
        assert params["out_uri"]["taskOutputParameter"] == {"producerTask": "preflight",
                                                            "outputParameterKey": f"{stage}_data_uri"}
        # inside the exit handler's DAG a pipeline parameter arrives as its channel
        assert params["workers"] == {"componentInputParameter": "pipelinechannel--curate_workers"}
        if partitions > 1:  # the merge collects the partition URIs of its stage's ParallelFor
            loop = params["partition_uris"]["taskOutputParameter"]["producerTask"]
            assert loop in deps[name]
            assert json.loads(tasks[loop]["parameterIterator"]["items"]["raw"]) == list(range(partitions))
            (part,) = spec["components"][tasks[loop]["componentRef"]["name"]]["dag"]["tasks"].values()
            assert part["componentRef"]["name"].startswith("comp-curate-partition")
            assert part["inputs"]["parameters"]["partitions"]["runtimeValue"]["constant"] == partitions
            assert part["inputs"]["parameters"]["data_recipe"] == {
                "componentInputParameter": f"pipelinechannel--preflight-{stage}_data_recipe"}
    # tasks are numbered in creation order: stage1 is train-stage, stage1_5 train-stage-2, ...; SI's eval is evaluate
    assert {"preflight", "curate"} <= deps["train-stage"]
    assert {"train-stage", "curate-2"} <= deps["train-stage-2"]
    assert {"train-stage-2", "curate-3"} <= deps["train-stage-3"]
    assert {"train-stage-3"} <= deps["evaluate"]
    assert {"train-stage-3", "evaluate", "curate-4"} <= deps["train-stage-4"]  # OV waits for the SI evaluation
    assert {"train-stage-4"} <= deps["evaluate-2"]
    # register and deploy sit under the gate's `passed == true` branch; the else branch stops the run
    conditions = {name: task["triggerPolicy"]["condition"] for name, task in tasks.items()
                  if "condition" in task.get("triggerPolicy", {})}
    passed = [c for n, c in conditions.items() if n.startswith("condition") and "evaluate-2-passed" in c and "!" not in c]
    failed = [c for n, c in conditions.items() if n.startswith("condition") and "evaluate-2-passed" in c and "!" in c]
    assert passed and failed, conditions
    gate_branch = next(c for c in spec["components"].values()
                       if "register-model" in c.get("dag", {}).get("tasks", {}))
    assert "export" in gate_branch["dag"]["tasks"]
    assert "stop-on-failed-gate" not in gate_branch["dag"]["tasks"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_exit_handler_ends_the_run_whatever_happened(preset: str) -> None:
    spec, _ = load_compiled(PRESETS[preset][1])
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "finish-pipeline-run"}  # every other task sits inside the handler
    inside = spec["components"][root["exit-handler-1"]["componentRef"]["name"]]["dag"]["tasks"]
    assert {"preflight", "train-stage", "evaluate-2"} <= set(inside)
    finish = root["finish-pipeline-run"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # runs after a failure too
    assert finish["dependentTasks"] == ["exit-handler-1"]
    params = finish["inputs"]["parameters"]
    assert params["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    # an exit task takes no other task's output: it finds the parent run from the run id and the recipe
    assert all("taskOutputParameter" not in p for p in params.values()), params
    assert params["run_id"] == {"componentInputParameter": "run_id"}
    assert params["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


@pytest.mark.parametrize("preset", ["ov-0.5b", "ov-7b", "ov-72b"])
def test_gpu_steps_carry_accelerator_pool_and_secret_references(preset: str) -> None:
    recipe_path, compiled = PRESETS[preset]
    recipe = load_recipe(recipe_path)
    spec, platform = load_compiled(compiled)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    containers = spec["deploymentSpec"]["executors"]
    single_node = [s for s in STAGES if recipe.cluster.resources(s).nodes == 1 and recipe.cluster.resources(s).gpus]
    gpu_execs = executors_of(spec, "evaluate")
    train_execs = executors_of(spec, "train-stage")  # in stage order: train-stage, -2, -3, -4
    order = {label: i for i, label in enumerate(sorted(train_execs, key=lambda x: (len(x), x)))}
    for label, index in order.items():
        stage = STAGES[index]
        (gpu_execs if stage in single_node else []).append(label)
        if recipe.cluster.resources(stage).nodes > 1:  # a launcher: small, off the GPU pool
            assert "accelerator" not in containers[label]["container"]["resources"], label
            assert "nodeSelector" not in k8s[label], label
    assert gpu_execs
    for label in gpu_execs:
        accel = containers[label]["container"]["resources"]["accelerator"]
        assert accel["resourceType"] == "nvidia.com/gpu" and int(accel["resourceCount"]) >= 1, label
        # the pipeline parameters, as the exit handler's DAG passes them on (KFP resolves them in the parent DAG)
        assert k8s[label]["nodeSelector"] == {
            "nodeSelectorJson": {"componentInputParameter": "pipelinechannel--gpu_node_selector"}}
        assert k8s[label]["tolerations"] == [
            {"tolerationJson": {"componentInputParameter": "pipelinechannel--gpu_tolerations"}}]
    for label, config in k8s.items():  # every step: credentials by Secret reference, a deadline
        (secret,) = config["secretAsEnv"]
        assert secret["secretName"] == recipe.cluster.s3_secret
        assert {e["envVar"] for e in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert int(config["activeDeadlineSeconds"]) in {t for t, _ in STEP_POLICY.values()}
    retried = [t for t in all_tasks(spec).values() if t.get("retryPolicy", {}).get("maxRetryCount")]
    assert any(t["taskInfo"]["name"].startswith("stage") for t in retried)  # training retries (it resumes)


def test_no_secret_value_anywhere_in_the_compiled_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = "s3cr3t-value-that-must-never-leak-7f3a"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLELEAK0000")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    for preset, (recipe, _) in PRESETS.items():
        text = compile_pipeline(recipe, tmp_path / f"{preset}.yaml").read_text()
        assert secret not in text and "AKIAEXAMPLELEAK0000" not in text
    for _, compiled in PRESETS.values():
        text = compiled.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text)
        assert not re.search(r"(?i)(password|secret_?key|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{12,}", text)


def test_multi_node_stage_runs_a_trainjob_and_its_pod_stays_small() -> None:
    recipe = load_recipe(PRESETS["ov-7b"][0])
    assert recipe.cluster.resources("stage2_si").nodes > 1  # the case this test is about
    spec, _ = load_compiled(PRESETS["ov-7b"][1])
    body = spec["deploymentSpec"]["executors"]["exec-train-stage-3"]["container"]
    assert "from components.train.core import run" in body["command"][-1]
    assert body["resources"]["resourceCpuLimit"] == "1"


def test_the_cluster_provides_what_the_steps_reference() -> None:
    """The ConfigMap the steps read their endpoints from, the Secret keys, and the service account that
    may create TrainJobs all exist in infra/platform/base, in the namespace pipeline runs use."""
    from pipelines.onevision import ENDPOINT_KEYS, ENDPOINTS_CONFIGMAP, S3_SECRET_KEYS
    from pipelines.submit import submit_pipeline
    import inspect

    base = Path(__file__).resolve().parents[2] / "infra/platform/base"
    docs = [d for f in sorted(base.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ENDPOINTS_CONFIGMAP]
    assert set(config["data"]) == set(ENDPOINT_KEYS)
    account = inspect.signature(submit_pipeline).parameters["service_account"].default
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == account]
    assert role["metadata"]["namespace"] == config["metadata"]["namespace"]
    assert any("trainjobs" in rule["resources"] and "create" in rule["verbs"] for rule in role["rules"])
    assert set(S3_SECRET_KEYS) <= set((base / "kustomization.yaml").read_text().split("keys:")[1].split("(")[0]
                                      .replace(",", " ").split())


def test_compile_cli_names_a_bad_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onevision_cli.main import main

    broken = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
    outside = tmp_path / "tiny.yaml"
    outside.write_text(broken.read_text().replace("lr: 1.0e-3", "lr: -1", 1))
    assert main(["compile", "--recipe", str(outside), "-o", str(tmp_path / "x.yaml")]) == 1
    assert "stages.stage1.lr" in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()
    outside.write_text(broken.read_text())  # valid, but not in the repository: the image cannot carry it
    assert main(["compile", "--recipe", str(outside), "-o", str(tmp_path / "x.yaml")]) == 1
    assert "upload one to S3" in capsys.readouterr().err


def _memory_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", quantity).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** ("KMGT".index(unit[0]) + 1 if unit else 0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_gpu_step_has_a_memory_backed_dev_shm(preset: str) -> None:
    """8-GPU torchrun in a KFP pod: the container's default /dev/shm is 64 MiB (DataLoader workers and NCCL's
    shared-memory transport need GiBs). Every GPU executor mounts a Memory emptyDir there, inside its memory
    limit; CPU steps and multi-node launchers do not hold node memory for it."""
    from pipelines.onevision import SHM_PATH

    spec, platform = load_compiled(PRESETS[preset][1])
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu_execs = 0
    for label, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"].get("resources", {})
        mounts = [m for m in k8s.get(label, {}).get("emptyDirMounts", []) if m["mountPath"] == SHM_PATH]
        if "accelerator" not in resources:
            assert not mounts, f"{label}: a CPU step with a memory-backed /dev/shm"
            continue
        gpu_execs += 1
        assert len(mounts) == 1 and mounts[0]["medium"] == "Memory", (label, mounts)
        assert 1 << 30 <= _memory_bytes(mounts[0]["sizeLimit"]) < _memory_bytes(resources["resourceMemoryLimit"])
    recipe = load_recipe(PRESETS[preset][0])
    assert bool(gpu_execs) == any(r.gpus and r.nodes == 1 for r in recipe.cluster.steps.values())

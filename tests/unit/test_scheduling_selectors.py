"""Every node selector we ship can scale a GPU pool up from zero (issue 20, point 5).

The cluster autoscaler decides whether a new node would fit a pending pod from the pool's node template,
before any node exists. That template holds only what the pool's own configuration declares: on GKE the
`node_config.labels` of the node pool, on EKS the `k8s.io/cluster-autoscaler/node-template/label/<label>`
tags of the Auto Scaling group (cluster-autoscaler's AWS provider docs, "Auto-Discovery Setup"). Labels
that a daemon adds after boot (GPU feature discovery's `nvidia.com/gpu.product`, NFD's `feature.node...`)
are never in it, so a pod selecting them stays Pending at zero nodes for ever.

Here the pool labels are parsed from infra/terraform/{gke,eks} with python-hcl2 and every node selector of
the recipes (recipes/*.yaml), of the TrainJobs the train step submits (components/train/trainjob.py merged
into the ClusterTrainingRuntime's pod template) and of the compiled pipelines (pipelines/compiled/*.yaml,
kfp-kubernetes platform spec, resolved through the pipeline parameters' defaults) is checked against them on
both clouds. A GPU workload must also select the GPU pool itself and tolerate the pool's taint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.train.trainjob import trainjob_manifest
from onevision.recipe import load_recipe
from pipelines.compile import preset_paths
from tests.unit.test_terraform import (K8S_EFFECT, block, gpu_pool, gpu_taints_and_labels, load_module, locals_of,
                                       tolerates, variables)

ROOT = Path(__file__).resolve().parents[2]
CA_LABEL = "k8s.io/cluster-autoscaler/node-template/label/"
GPU_POOL = {"onevision/pool": "gpu"}  # what every GPU workload selects (infra/terraform/README.md)
PRESETS = preset_paths()  # recipes/<x>.yaml -> pipelines/compiled/<x>.yaml


def _var_default(mod: dict[str, list[Any]], value: Any) -> Any:
    """`${var.x}` -> the variable's default (the value a plain `terraform apply` gives the template)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\$\{var\.(\w+)\}", value)
        if match:
            return variables(mod)[match.group(1)]["default"]
    return value


def template_labels(cloud: str) -> dict[str, str]:
    """Labels the autoscaler sees on the GPU pool's node template at zero nodes."""
    mod = load_module(cloud)
    _, labels = gpu_taints_and_labels(cloud, mod)
    if cloud == "gke":  # GKE's autoscaler builds the template from the node pool's config
        return {k: _var_default(mod, v) for k, v in labels.items()}
    # EKS: only the ASG's node-template tags reach the autoscaler; a node label without its tag is seen only
    # once a node runs. The value must agree with the label the node really gets.
    tags = locals_of(mod)["cluster_autoscaler_tags"]
    seen = {k[len(CA_LABEL):]: _var_default(mod, v) for k, v in tags.items() if k.startswith(CA_LABEL)}
    return {k: v for k, v in seen.items() if _var_default(mod, labels.get(k)) == v}


def pool_taints(cloud: str) -> list[dict[str, str]]:
    taints, _ = gpu_taints_and_labels(cloud, load_module(cloud))
    return taints


POOLS = {cloud: template_labels(cloud) for cloud in ("gke", "eks")}


def check_selector(where: str, selector: dict[str, str], tolerations: list[dict[str, Any]] | None) -> None:
    """A GPU workload's selector: the GPU pool, and only labels both clouds' templates carry."""
    assert selector, f"{where}: a GPU workload with no nodeSelector (it would not pick the GPU pool)"
    for key, value in GPU_POOL.items():
        assert selector.get(key) == value, f"{where}: does not select the GPU pool ({key}={value}): {selector}"
    for cloud, labels in POOLS.items():
        unknown = {k: v for k, v in selector.items() if labels.get(k) != v}
        assert not unknown, (f"{where}: {unknown} is not on the {cloud} GPU pool's node template "
                             f"({labels}); the autoscaler could not scale that pool up from zero for it")
    if tolerations is not None:
        for cloud in POOLS:
            for taint in pool_taints(cloud):
                assert tolerates(tolerations, taint), f"{where}: does not tolerate the {cloud} pool taint {taint}"


# ---------------------------------------------------------------------------------------------- the pools
def test_both_pools_template_the_gpu_pool_label() -> None:
    for cloud, labels in POOLS.items():
        assert {k: labels.get(k) for k in GPU_POOL} == GPU_POOL, cloud


def test_an_eks_label_without_its_autoscaler_tag_is_not_in_the_template() -> None:
    # the parser must not take node-group labels at face value: drop a tag and the label disappears
    mod = load_module("eks")
    tags = dict(locals_of(mod)["cluster_autoscaler_tags"])
    assert f"{CA_LABEL}onevision/pool" in tags and "onevision/pool" in POOLS["eks"]
    assert gpu_pool("eks", mod)["labels"] == "${local.gpu_node_labels}"


def test_the_checker_rejects_a_feature_discovery_label() -> None:
    gfd = {**GPU_POOL, "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    with pytest.raises(AssertionError, match="node template"):
        check_selector("sample", gfd, None)
    with pytest.raises(AssertionError, match="GPU pool"):
        check_selector("sample", {"nvidia.com/gpu.present": "true"}, None)
    with pytest.raises(AssertionError, match="taint"):
        check_selector("sample", dict(GPU_POOL), [])
    check_selector("sample", dict(GPU_POOL), [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    assert K8S_EFFECT[pool_taints("gke")[0]["effect"]] == "NoSchedule"
    assert block(gpu_pool("gke", load_module("gke")), "node_config")  # the GKE labels' holder


# ---------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe_path", sorted(PRESETS), ids=lambda p: p.stem)
def test_recipe_selectors_are_on_the_pool_templates(recipe_path: Path) -> None:
    recipe = load_recipe(recipe_path)
    for step, resources in recipe.cluster.steps.items():
        tolerations = [t.model_dump(exclude_none=True) for t in resources.tolerations]
        if resources.gpus:
            check_selector(f"{recipe_path.name}: cluster.steps.{step}", dict(resources.node_selector), tolerations)
        else:  # a CPU step selecting the GPU pool would keep an expensive node from scaling down
            assert not resources.node_selector, f"{recipe_path.name}: CPU step {step} selects {resources.node_selector}"


# ---------------------------------------------------------------------------------------------- TrainJobs
def runtime_pod_spec() -> dict[str, Any]:
    (runtime,) = [d for d in yaml.safe_load_all((ROOT / "infra/platform/base/trainer-runtime.yaml").read_text())
                  if d and d["kind"] == "ClusterTrainingRuntime"]
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return job["template"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("recipe_path", sorted(PRESETS), ids=lambda p: p.stem)
def test_trainjob_selectors_are_on_the_pool_templates(recipe_path: Path) -> None:
    recipe = load_recipe(recipe_path)
    runtime = runtime_pod_spec()
    check_selector("trainer-runtime.yaml", runtime["nodeSelector"], runtime["tolerations"])
    selector, tolerations = compiled_gpu_placement(PRESETS[recipe_path])
    for stage, resources in recipe.cluster.steps.items():
        if resources.nodes < 2:
            continue
        # what the train step submits with the compiled pipeline's defaults (its node_selector/tolerations inputs)
        manifest = trainjob_manifest(
            name=f"ov-r1-{stage.replace('_', '-')}", namespace="onevision", image="img", nodes=resources.nodes,
            train_args=["--stage", stage], gpus_per_node=resources.gpus, cpu=resources.cpu, memory=resources.memory,
            node_selector=selector, tolerations=tolerations, s3_secret=recipe.cluster.s3_secret, env={})
        (patch,) = manifest["spec"]["runtimePatches"]
        (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        pod = job["template"]["spec"]["template"]["spec"]
        merged = {**runtime["nodeSelector"], **pod.get("nodeSelector", {})}  # a map merge, as the Trainer does
        check_selector(f"{recipe_path.name}: TrainJob of {stage}", merged, pod.get("tolerations", runtime["tolerations"]))


# ---------------------------------------------------------------------------------------------- compiled pipelines
def load_compiled(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _root_default(spec: dict[str, Any], reference: dict[str, Any]) -> Any:
    """A `componentInputParameter` reference -> the pipeline parameter's default (sub-DAGs prefix
    `pipelinechannel--`)."""
    name = reference["componentInputParameter"].removeprefix("pipelinechannel--")
    return spec["root"]["inputDefinitions"]["parameters"][name]["defaultValue"]


def compiled_gpu_placement(path: Path) -> tuple[dict[str, str], list[dict[str, Any]]]:
    spec, _ = load_compiled(path)
    params = spec["root"]["inputDefinitions"]["parameters"]
    return params["gpu_node_selector"]["defaultValue"], params["gpu_tolerations"]["defaultValue"]


@pytest.mark.parametrize("recipe_path", sorted(PRESETS), ids=lambda p: p.stem)
def test_compiled_pipeline_selectors_are_on_the_pool_templates(recipe_path: Path) -> None:
    spec, executors = load_compiled(PRESETS[recipe_path])
    containers = spec["deploymentSpec"]["executors"]
    gpu_steps = 0
    for label, config in executors.items():
        selectors: list[dict[str, str]] = []
        if "nodeSelector" in config:
            chosen = config["nodeSelector"]
            selectors.append(_root_default(spec, chosen["nodeSelectorJson"]) if "nodeSelectorJson" in chosen
                             else chosen.get("labels", {}))
        tolerations: list[dict[str, Any]] = []
        for entry in config.get("tolerations", []):
            tolerations.extend(_root_default(spec, entry["tolerationJson"]) if "tolerationJson" in entry else [entry])
        gpu = "accelerator" in containers[label]["container"].get("resources", {})
        gpu_steps += gpu
        if gpu:
            assert selectors, f"{recipe_path.name}: GPU executor {label} selects no pool"
        elif selectors:  # a CPU step on the GPU pool keeps a GPU node up
            pytest.fail(f"{recipe_path.name}: CPU executor {label} has a nodeSelector {selectors}")
        for selector in selectors:
            check_selector(f"{recipe_path.name}: {label}", selector, tolerations)
    recipe = load_recipe(recipe_path)
    assert bool(gpu_steps) == any(r.gpus and r.nodes == 1 for r in recipe.cluster.steps.values()), gpu_steps
    if not any(r.gpus for r in recipe.cluster.steps.values()):
        return  # a CPU recipe (tiny): the train step's node_selector input is empty and unused
    # the train step's own node_selector input reaches its TrainJob: the same parameter
    for task in [t for c in [spec["root"], *spec["components"].values()] for t in c.get("dag", {}).get("tasks", {}).values()]:
        inputs = task.get("inputs", {}).get("parameters", {})
        if "node_selector" in inputs:
            check_selector(f"{recipe_path.name}: {task['taskInfo']['name']} node_selector",
                           _root_default(spec, inputs["node_selector"]), _root_default(spec, inputs["tolerations"]))

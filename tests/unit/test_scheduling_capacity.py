"""Quotas, Kueue queues and GPU pools that fit the recipes (issue 20, point 11).

For every shipped recipe, its largest stage (nodes x GPUs per node, and the CPU and memory of those nodes)
must fit, in the environment the recipe trains in:
- the namespace's ResourceQuota (`requests.nvidia.com/gpu`) of the rendered platform overlay;
- the Kueue ClusterQueue's nominal quota (cpu, memory, nvidia.com/gpu) of the same overlay: Kueue admits a
  TrainJob only when all of its nodes fit at once (gang admission), so a stage larger than the quota would
  wait for ever;
- the Terraform GPU pool's maximum (max nodes x GPUs of the machine type), on GKE and on EKS, and each node's
  requests must fit one machine.
The Kueue objects are validated against the CRD schemas vendored from Kueue v0.19.2 (infra/schemas/kueue),
since `kubernetes-validate` (tests/unit/test_infra.py) has no schema for custom kinds and only warns.

Which environment a recipe trains in is not a recipe field; RECIPE_ENV below is the mapping (the platform
overlays are one cluster each: local = kind/k3d without GPUs, dev = one 8-GPU node, prod = the fleet).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from components.train.trainjob import QUEUE, QUEUE_LABEL, trainjob_manifest
from onevision.recipe import Recipe, load_recipe
from pipelines.compile import preset_paths
from tests.unit.test_infra_crds import strict_schema
from tests.unit.test_scheduling_selectors import POOLS, pool_taints
from tests.unit.test_terraform import K8S_EFFECT, load_module, variables

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / ".venv/bin/kubectl"
KUEUE_SCHEMAS = ROOT / "infra/schemas/kueue"
KUEUE_CRDS = {"ClusterQueue": "kueue.x-k8s.io_clusterqueues.yaml", "LocalQueue": "kueue.x-k8s.io_localqueues.yaml",
              "ResourceFlavor": "kueue.x-k8s.io_resourceflavors.yaml"}
PIPELINE_NAMESPACE = "onevision"  # infra/platform/base/namespaces.yaml: pipeline runs and TrainJobs

# recipe -> the platform overlay (cluster) it trains in
RECIPE_ENV = {"tiny": "local", "ov-0.5b": "dev", "ov-7b": "prod", "ov-72b": "prod"}

# GPU machine types of the Terraform pools: GPUs, vCPUs, memory (GiB). Google Cloud "Accelerator-optimized
# machine family", A3 High: a3-highgpu-8g = 8 x H100 80GB, 208 vCPU, 1872 GB
# (https://cloud.google.com/compute/docs/accelerator-optimized-machines#a3-high-vms); AWS "Amazon EC2 P5
# instances": p5.48xlarge = 8 x H100 80GB, 192 vCPU, 2048 GiB (https://aws.amazon.com/ec2/instance-types/p5/).
MACHINES = {"a3-highgpu-8g": {"gpus": 8, "cpu": 208, "memory_gib": 1872 * 10**9 / 2**30},
            "p5.48xlarge": {"gpus": 8, "cpu": 192, "memory_gib": 2048}}

_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 10**-3}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ('1600Gi', '64', '500m') as a number (bytes, cores)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


# ---------------------------------------------------------------------------------------------- sources
def overlay(env: str) -> list[dict[str, Any]]:
    done = subprocess.run([str(KUBECTL), "kustomize", str(ROOT / "infra/platform/overlays" / env)],
                          capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(done.stdout) if o]


OVERLAYS = {env: overlay(env) for env in ("local", "dev", "prod")}


def the(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def env_capacity(env: str) -> dict[str, float]:
    """GPUs of the ResourceQuota, and cpu/memory/GPUs of the ClusterQueue of LocalQueue `QUEUE`."""
    objects = OVERLAYS[env]
    quota = [o for o in objects if o["kind"] == "ResourceQuota" and o["metadata"]["namespace"] == PIPELINE_NAMESPACE]
    (hard,) = [q["spec"]["hard"] for q in quota if "requests.nvidia.com/gpu" in q["spec"]["hard"]]
    local = the(objects, "LocalQueue", QUEUE)
    queue = the(objects, "ClusterQueue", local["spec"]["clusterQueue"])
    nominal: dict[str, float] = {}
    for group in queue["spec"]["resourceGroups"]:
        for flavor in group["flavors"]:
            for resource in flavor["resources"]:
                nominal[resource["name"]] = nominal.get(resource["name"], 0) + quantity(resource["nominalQuota"])
    return {"quota_gpus": quantity(hard["requests.nvidia.com/gpu"]), "gpus": nominal.get("nvidia.com/gpu", 0),
            "cpu": nominal.get("cpu", 0), "memory": nominal.get("memory", 0)}


def pool_max(cloud: str) -> dict[str, Any]:
    """The GPU pool at its Terraform defaults: machine type, GPUs per node, max nodes."""
    var = variables(load_module(cloud))
    if cloud == "gke":
        machine, gpus, nodes = var["machine_type"]["default"], var["gpu_count"]["default"], var["max_nodes"]["default"]
    else:
        (machine,) = var["instance_types"]["default"]
        gpus, nodes = var["gpus_per_node"]["default"], var["max_size"]["default"]
    assert machine in MACHINES, f"{cloud}: {machine}: add it to MACHINES (with its GPU count and a source)"
    assert gpus == MACHINES[machine]["gpus"], f"{cloud}: {gpus} GPUs per node, but {machine} has {MACHINES[machine]['gpus']}"
    return {"machine": machine, "gpus_per_node": gpus, "nodes": nodes, "gpus": nodes * gpus}


def largest_stage(recipe: Recipe) -> dict[str, Any]:
    steps = [(name, r) for name, r in recipe.cluster.steps.items() if r.gpus]
    if not steps:
        return {"step": None, "nodes": 0, "gpus_per_node": 0, "gpus": 0, "cpu": 0.0, "memory": 0.0}
    name, r = max(steps, key=lambda item: item[1].nodes * item[1].gpus)
    return {"step": name, "nodes": r.nodes, "gpus_per_node": r.gpus, "gpus": r.nodes * r.gpus,
            "cpu": r.nodes * quantity(r.cpu), "memory": r.nodes * quantity(r.memory),
            "node_cpu": quantity(r.cpu), "node_memory": quantity(r.memory)}


def misfits(stage: dict[str, Any], capacity: dict[str, float], pools: dict[str, dict[str, Any]]) -> list[str]:
    """Why a stage does not fit an environment (empty: it fits)."""
    out = []
    for key, what in (("quota_gpus", "ResourceQuota GPUs"), ("gpus", "ClusterQueue GPUs"), ("cpu", "ClusterQueue cpu"),
                      ("memory", "ClusterQueue memory")):
        if stage[key if key != "quota_gpus" else "gpus"] > capacity[key]:
            out.append(f"{what}: needs {stage[key if key != 'quota_gpus' else 'gpus']:g}, has {capacity[key]:g}")
    for cloud, pool in pools.items():
        if stage["gpus"] > pool["gpus"]:
            out.append(f"{cloud} pool: needs {stage['gpus']} GPUs, max {pool['nodes']} x {pool['gpus_per_node']}")
        if stage["gpus"]:
            machine = MACHINES[pool["machine"]]
            if stage["gpus_per_node"] > machine["gpus"] or stage["node_cpu"] > machine["cpu"] \
                    or stage["node_memory"] > machine["memory_gib"] * 2**30:
                out.append(f"{cloud}: one node of the stage does not fit a {pool['machine']}")
    return out


POOL_MAX = {cloud: pool_max(cloud) for cloud in ("gke", "eks")}
PRESETS = preset_paths()


# ---------------------------------------------------------------------------------------------- capacity
def test_every_shipped_recipe_has_an_environment() -> None:
    assert set(RECIPE_ENV) == {p.stem for p in PRESETS}


@pytest.mark.parametrize("recipe_path", sorted(PRESETS), ids=lambda p: p.stem)
def test_largest_stage_fits_its_environment(recipe_path: Path) -> None:
    env = RECIPE_ENV[recipe_path.stem]
    stage = largest_stage(load_recipe(recipe_path))
    assert misfits(stage, env_capacity(env), POOL_MAX) == [], (recipe_path.name, env, stage)


@pytest.mark.parametrize("env", sorted(OVERLAYS))
def test_quota_and_cluster_queue_agree_and_the_pools_can_deliver_them(env: str) -> None:
    capacity = env_capacity(env)
    assert capacity["gpus"] == capacity["quota_gpus"], capacity
    for cloud, pool in POOL_MAX.items():
        # Kueue must not admit what the pool can never hold: its pods would start part way and wait
        assert capacity["gpus"] <= pool["gpus"], (env, cloud, capacity, pool)
        nodes = capacity["gpus"] / pool["gpus_per_node"]
        machine = MACHINES[pool["machine"]]
        assert capacity["cpu"] <= nodes * machine["cpu"] and capacity["memory"] <= nodes * machine["memory_gib"] * 2**30, \
            (env, cloud, capacity)


def test_the_checker_refuses_a_stage_larger_than_the_quota() -> None:
    stage = largest_stage(load_recipe(ROOT / "recipes/ov-72b.yaml"))
    doubled = {**stage, "nodes": stage["nodes"] * 2, "gpus": stage["gpus"] * 2, "cpu": stage["cpu"] * 2,
               "memory": stage["memory"] * 2}
    problems = misfits(doubled, env_capacity("prod"), POOL_MAX)
    assert any("ClusterQueue GPUs" in p for p in problems) and any("ResourceQuota" in p for p in problems)
    assert misfits(largest_stage(load_recipe(ROOT / "recipes/ov-7b.yaml")), env_capacity("dev"), POOL_MAX)
    fat = {**stage, "node_memory": quantity("4Ti")}  # one node's requests larger than any machine
    assert any("does not fit" in p for p in misfits(fat, env_capacity("prod"), POOL_MAX))


# ---------------------------------------------------------------------------------------------- Kueue objects
def kueue_schema(kind: str, api_version: str) -> dict[str, Any]:
    crd = yaml.safe_load((KUEUE_SCHEMAS / KUEUE_CRDS[kind]).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return strict_schema(served["schema"]["openAPIV3Schema"])


def test_vendored_kueue_schemas_name_their_source() -> None:
    for name in KUEUE_CRDS.values():
        head = (KUEUE_SCHEMAS / name).read_text().split("---", 1)[0]
        assert "github.com/kubernetes-sigs/kueue" in head and re.search(r"version: v\d+\.\d+\.\d+", head)
        assert re.search(r"commit:\s+[0-9a-f]{40}", head), name


@pytest.mark.parametrize("env", sorted(OVERLAYS))
def test_kueue_objects_match_the_vendored_crds(env: str) -> None:
    kueue = [o for o in OVERLAYS[env] if o["apiVersion"].startswith("kueue.x-k8s.io/")]
    assert sorted(o["kind"] for o in kueue) == sorted(KUEUE_CRDS)
    for obj in kueue:
        errors = sorted(e.message for e in jsonschema.Draft7Validator(kueue_schema(obj["kind"], obj["apiVersion"]))
                        .iter_errors(obj))
        assert errors == [], (obj["kind"], errors)


def test_kueue_schema_validation_catches_mistakes() -> None:
    queue = the(OVERLAYS["dev"], "ClusterQueue", QUEUE)
    schema = kueue_schema("ClusterQueue", queue["apiVersion"])
    broken = yaml.safe_load(yaml.safe_dump(queue))
    broken["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]["nominalQuota"] = "lots"
    broken["spec"]["queueingStrategy"] = "Fastest"
    broken["spec"]["resourceGroup"] = []  # a typo of resourceGroups
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) >= 3


@pytest.mark.parametrize("env", sorted(OVERLAYS))
def test_flavor_is_the_terraform_gpu_pool_and_queues_point_at_the_pipeline_namespace(env: str) -> None:
    objects = OVERLAYS[env]
    local = the(objects, "LocalQueue", QUEUE)
    assert local["metadata"]["namespace"] == PIPELINE_NAMESPACE
    queue = the(objects, "ClusterQueue", local["spec"]["clusterQueue"])
    assert queue["spec"]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": PIPELINE_NAMESPACE}}
    (group,) = queue["spec"]["resourceGroups"]
    assert set(group["coveredResources"]) == {"cpu", "memory", "nvidia.com/gpu"}  # everything our pods request
    for flavor_ref in group["flavors"]:
        flavor = the(objects, "ResourceFlavor", flavor_ref["name"])
        for cloud, labels in POOLS.items():  # Kueue writes these into the pods' nodeSelector: template labels only
            assert flavor["spec"]["nodeLabels"].items() <= labels.items(), (cloud, flavor["spec"]["nodeLabels"])
            taints = [{"key": t["key"], "value": t["value"], "effect": K8S_EFFECT[t["effect"]]} for t in pool_taints(cloud)]
            assert flavor["spec"]["nodeTaints"] == taints, cloud


# ---------------------------------------------------------------------------------------------- queue labels
def test_trainjobs_carry_the_queue_label_and_their_pods_do_not() -> None:
    manifest = trainjob_manifest(name="ov-r1-stage2-si", namespace=PIPELINE_NAMESPACE, image="img",
                                 train_args=["--stage", "stage2_si"], nodes=8, gpus_per_node=8, cpu="64",
                                 memory="900Gi", node_selector={"onevision/pool": "gpu"}, tolerations=[],
                                 s3_secret="onevision-s3", env={})
    assert manifest["metadata"]["labels"][QUEUE_LABEL] == QUEUE
    (patch,) = manifest["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    # Kueue manages the TrainJob as one workload; a label on its pods would queue each pod a second time
    assert QUEUE_LABEL not in job["template"]["spec"]["template"]["metadata"]["labels"]
    assert QUEUE_LABEL not in trainjob_manifest(**{**_args(), "queue": None})["metadata"]["labels"]
    with pytest.raises(ValueError, match="queue"):
        trainjob_manifest(**{**_args(), "queue": "Not A Label"})


def _args() -> dict[str, Any]:
    return {"name": "ov-r1-stage1", "namespace": PIPELINE_NAMESPACE, "image": "img", "train_args": ["--stage", "stage1"],
            "nodes": 2, "gpus_per_node": 8, "cpu": "64", "memory": "900Gi", "node_selector": {}, "tolerations": [],
            "s3_secret": "onevision-s3", "env": {}}


@pytest.mark.parametrize("recipe_path", sorted(PRESETS), ids=lambda p: p.stem)
def test_gpu_steps_of_the_compiled_pipelines_carry_the_queue_label(recipe_path: Path) -> None:
    spec, platform = yaml.safe_load_all(PRESETS[recipe_path].read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    labelled = 0
    for label, executor in spec["deploymentSpec"]["executors"].items():
        labels = executors.get(label, {}).get("podMetadata", {}).get("labels", {})
        if "accelerator" in executor["container"].get("resources", {}):
            assert labels.get(QUEUE_LABEL) == QUEUE, label
            labelled += 1
        else:  # CPU steps and multi-node launchers stay outside the GPU queue's quota
            assert QUEUE_LABEL not in labels, label
    recipe = load_recipe(recipe_path)
    assert bool(labelled) == any(r.gpus and r.nodes == 1 for r in recipe.cluster.steps.values())
    assert the(OVERLAYS["prod"], "LocalQueue", QUEUE)  # the queue the label names exists

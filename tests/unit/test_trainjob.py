"""The TrainJob of a multi-node stage, checked offline: against the vendored Trainer CRD schema (strictly:
a misspelt field fails) and field by field against the kubeflow_trainer_api models; agreement with the
ClusterTrainingRuntime it references; no credential values; and the strict validator itself."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from components import PROJECT_IMAGE
from components.train.crd_schema import validate_against_crd
from components.train.trainjob import S3_SECRET_KEYS, TRAIN_COMMAND, trainjob_manifest
from onevision.recipe import load_recipe
from tests.unit.test_infra_crds import check_trainer

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "infra/crds/trainer.kubeflow.org_trainjob_v1alpha1.json"
RUNTIME = ROOT / "infra/platform/base/trainer-runtime.yaml"
STAGE = "stage2_si"
ENV = {"AWS_ENDPOINT_URL": "http://minio.onevision-system.svc:9000",
       "MLFLOW_TRACKING_URI": "http://mlflow.onevision-system.svc:5000", "ONEVISION_PIPELINE_RUN_ID": "r1"}


def stage_args(stage: str = STAGE) -> list[str]:
    return ["--recipe", "recipes/ov-7b.yaml", "--stage", stage, "--data", f"s3://onevision/runs/r1/curate/{stage}",
            "--out", f"s3://onevision/runs/r1/{stage}", "--init", "s3://onevision/runs/r1/stage1_5/hf",
            "--work-dir", "/scratch"]


def ov7b_manifest(stage: str = STAGE, **overrides: Any) -> dict[str, Any]:
    """What the train step builds for a multi-node stage of recipes/ov-7b.yaml."""
    recipe = load_recipe(ROOT / "recipes/ov-7b.yaml")
    res = recipe.cluster.resources(stage)
    kwargs: dict[str, Any] = {
        "name": f"ov-r1-{stage.replace('_', '-')}", "namespace": "onevision", "image": PROJECT_IMAGE,
        "train_args": stage_args(stage), "nodes": res.nodes, "gpus_per_node": res.gpus, "cpu": res.cpu,
        "memory": res.memory, "node_selector": res.node_selector,
        "tolerations": [t.model_dump(exclude_none=True) for t in res.tolerations],
        "s3_secret": recipe.cluster.s3_secret, "env": ENV}
    return trainjob_manifest(**{**kwargs, **overrides})


def pod_patch(manifest: dict[str, Any]) -> dict[str, Any]:
    (patch,) = manifest["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return job["template"]["spec"]["template"]


def runtime_node() -> dict[str, Any]:
    runtime = yaml.safe_load(RUNTIME.read_text())
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return job


@pytest.mark.parametrize("stage", ["stage1_5", "stage2_si", "stage2_ov"])
def test_multinode_stages_of_ov7b_validate_strictly(stage: str) -> None:
    recipe = load_recipe(ROOT / "recipes/ov-7b.yaml")
    assert recipe.cluster.resources(stage).nodes > 1  # these are the stages that run as a TrainJob
    manifest = ov7b_manifest(stage)
    assert validate_against_crd(manifest, SCHEMA) == []
    assert check_trainer(json.loads(json.dumps(manifest))) == []


def test_manifest_carries_the_stage_resources_placement_and_labels() -> None:
    res = load_recipe(ROOT / "recipes/ov-7b.yaml").cluster.resources(STAGE)
    manifest = ov7b_manifest()
    trainer = manifest["spec"]["trainer"]
    assert res.nodes > 1 and res.gpus >= 1 and res.node_selector and res.tolerations
    assert trainer["numNodes"] == res.nodes and trainer["numProcPerNode"] == res.gpus
    assert trainer["resourcesPerNode"]["limits"] == {"memory": res.memory, "nvidia.com/gpu": str(res.gpus)}
    assert trainer["resourcesPerNode"]["requests"] == {"cpu": res.cpu, "memory": res.memory,
                                                       "nvidia.com/gpu": str(res.gpus)}
    assert trainer["image"] == PROJECT_IMAGE and trainer["args"] == stage_args()
    pod = pod_patch(manifest)
    assert pod["spec"]["nodeSelector"] == res.node_selector
    assert pod["spec"]["tolerations"] == [t.model_dump(exclude_none=True) for t in res.tolerations]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    for labels in (manifest["metadata"]["labels"], pod["metadata"]["labels"]):
        assert labels["onevision/stage"] == STAGE and labels["onevision/pipeline-run"] == "r1"
    # nothing to patch: the runtime's own placement stays (tolerations are an atomic list: a patch replaces)
    bare = pod_patch(ov7b_manifest(node_selector={}, tolerations=[]))
    assert "nodeSelector" not in bare["spec"] and "tolerations" not in bare["spec"]


def test_manifest_agrees_with_the_runtime_it_references() -> None:
    runtime = yaml.safe_load(RUNTIME.read_text())
    manifest = ov7b_manifest()
    assert manifest["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": runtime["kind"],
                                              "name": runtime["metadata"]["name"]}
    node = runtime_node()
    (container,) = node["template"]["spec"]["template"]["spec"]["containers"]
    assert pod_patch(manifest) and node["name"] == "node" and container["name"] == "node"
    assert manifest["spec"]["trainer"]["command"] == container["command"] == TRAIN_COMMAND
    # the runtime's Secret keys are the ones the TrainJob asks for
    runtime_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    job_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in manifest["spec"]["trainer"]["env"] if "valueFrom" in e}
    assert job_refs == runtime_refs == {k: {"name": "onevision-s3", "key": v} for k, v in S3_SECRET_KEYS.items()}
    # every argument is a model.train flag
    flags = set(re.findall(r'add_argument\("(--[a-z-]+)"', (ROOT / "model/train.py").read_text()))
    assert {a for a in manifest["spec"]["trainer"]["args"] if a.startswith("--")} <= flags


def test_no_credential_values_in_the_manifest() -> None:
    manifest = ov7b_manifest()
    for env in manifest["spec"]["trainer"]["env"]:
        if re.search(r"(?i)secret|password|token|key_id|access", env["name"]):
            assert set(env) == {"name", "valueFrom"} and set(env["valueFrom"]) == {"secretKeyRef"}, env
    assert {e["name"]: e["value"] for e in manifest["spec"]["trainer"]["env"] if "value" in e} == ENV
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY looks like a credential"):
        ov7b_manifest(env={**ENV, "AWS_SECRET_ACCESS_KEY": "not-here"})
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_TOKEN looks like a credential"):
        ov7b_manifest(env={"MLFLOW_TRACKING_TOKEN": "x"})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"name": "OV-r1"}, "name: 'OV-r1' is not a DNS-1035 label"),
    ({"name": "1-stage"}, "name: '1-stage' is not a DNS-1035 label"),
    ({"name": "ov_r1"}, "name: 'ov_r1' is not a DNS-1035 label"),
    ({"name": "a" * 64}, "is not a DNS-1035 label"),
    ({"name": "a" * 49, "nodes": 4}, r"too long for 4 nodes: its pods are named like .*use at most 48"),
    ({"namespace": "One"}, "namespace: 'One' is not a DNS-1123 label"),
    ({"memory": "900GB"}, "memory: '900GB' is not a Kubernetes quantity"),
    ({"gpus_per_node": 0}, "gpus_per_node: 0 < 1"),
    ({"train_args": ["--recipe", "r.yaml"]}, "train_args: no '--stage <stage>'"),
])
def test_invalid_inputs_fail_naming_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ov7b_manifest(**overrides)
    assert validate_against_crd(ov7b_manifest(name="a" * 48, nodes=4), SCHEMA) == []  # the longest name for 4 nodes


def test_strict_validator_catches_misspelt_fields_and_wrong_types() -> None:
    manifest = ov7b_manifest()
    typo = copy.deepcopy(manifest)
    typo["spec"]["trainer"]["numNode"] = typo["spec"]["trainer"].pop("numNodes")
    assert validate_against_crd(typo, SCHEMA) == ["spec.trainer: unknown field 'numNode' (did you mean 'numNodes'?)"]

    deep = copy.deepcopy(manifest)  # inside runtimePatches, down to a toleration
    pod_patch(deep)["spec"]["tolerations"][0]["efect"] = pod_patch(deep)["spec"]["tolerations"][0].pop("effect")
    (error,) = validate_against_crd(deep, SCHEMA)
    assert error.endswith(".template.spec.tolerations.0: unknown field 'efect' (did you mean 'effect'?)")

    wrong = copy.deepcopy(manifest)
    wrong["spec"]["trainer"]["numNodes"] = "4"
    wrong["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] = "eight"  # int-or-string + pattern
    type_error, pattern_error = validate_against_crd(wrong, SCHEMA)
    assert type_error == "spec.trainer.numNodes: '4' is not of type 'integer'"
    assert pattern_error.startswith("spec.trainer.resourcesPerNode.limits.nvidia.com/gpu: 'eight' does not match '^(")
    ints = copy.deepcopy(manifest)  # x-kubernetes-int-or-string: an integer quantity is fine too
    ints["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] = 8
    assert validate_against_crd(ints, SCHEMA) == []

    missing = copy.deepcopy(manifest)
    del missing["spec"]["runtimeRef"]
    assert validate_against_crd(missing, SCHEMA) == ["spec: 'runtimeRef' is a required property"]

    nulls = copy.deepcopy(manifest)  # pruned like the API server does
    nulls["spec"]["trainer"]["numProcPerNode"] = None
    assert validate_against_crd(nulls, SCHEMA) == []

    other = copy.deepcopy(manifest)
    other["kind"] = "TrainingRuntime"
    assert validate_against_crd(other, SCHEMA)[0].startswith("<root>: apiVersion/kind")


def test_strict_closing_keeps_open_what_kubernetes_keeps_open(tmp_path: Path) -> None:
    """preserve-unknown-fields stays open, maps keep their additionalProperties, int-or-string without anyOf."""
    schema = {"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
        "spec": {"type": "object", "properties": {
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
                "inner": {"type": "object", "properties": {"a": {"type": "string"}}}}},
            "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"b": {"type": "integer"}}}},
            "port": {"x-kubernetes-int-or-string": True}}}}}
    path = tmp_path / "example.com_widget_v1.json"
    path.write_text(json.dumps(schema))
    obj = {"apiVersion": "example.com/v1", "kind": "Widget",
           "spec": {"free": {"anything": 1, "inner": {"a": "x"}}, "map": {"k": {"b": 1}}, "port": "http"}}
    assert validate_against_crd(obj, path) == []
    obj["spec"]["free"]["inner"]["z"] = 1  # declared children of an open node are still closed
    obj["spec"]["map"]["k"]["c"] = 2
    obj["spec"]["port"] = 1.5
    assert validate_against_crd(obj, path) == [
        "spec.free.inner: unknown field 'z'",
        "spec.map.k: unknown field 'c'",
        "spec.port: 1.5 is not valid under any of the given schemas"]


def test_vendored_schema_names_its_source() -> None:
    readme = (ROOT / "infra/crds/README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith(f"| `{SCHEMA.name}`"))
    assert "kubeflow/trainer" in row and re.search(r"`[0-9a-f]{40}`", row)
    assert f"{SCHEMA.stat().st_size:,}" in row

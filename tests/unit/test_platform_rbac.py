"""The pipeline ServiceAccount can run KFP v2 steps (issue 20, point 6).

KFP v2 runs each step as an Argo Workflow pod under the run's ServiceAccount (ours: onevision-pipeline). The
pod's driver, launcher and Argo executor call the Kubernetes API with it. The reference is KFP's own
`pipeline-runner` Role, vendored from KFP 2.17.0 (infra/schemas/kfp/pipeline-runner-role.yaml). Every
(apiGroup, resource, verb) it grants must be granted by our rendered Role, or narrowed to named objects, or
listed in NOT_GRANTED with the reason. Each list entry must still match an upstream grant and must really
be withheld. The calls KFP 2.17's backend/src/v2 and Argo's executor make are listed in KFP_V2_CALLS and
must all be granted, workflowtaskresults create + patch among them.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAYS = sorted(p.name for p in (ROOT / "infra/platform/overlays").iterdir())
UPSTREAM = ROOT / "infra/schemas/kfp/pipeline-runner-role.yaml"
SA, NAMESPACE = "onevision-pipeline", "onevision"
# what `verbs: ['*']` stands for on a namespaced resource
ALL_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")

Grant = tuple[str, str, str]  # (apiGroup, resource, verb)

# The API calls a KFP v2 step pod makes under the run's ServiceAccount (KFP tag 2.17.0, Argo >= 3.4).
KFP_V2_CALLS: dict[Grant, str] = {
    ("argoproj.io", "workflowtaskresults", "create"): "Argo executor records outputs (argo docs/workflow-rbac.md)",
    ("argoproj.io", "workflowtaskresults", "patch"): "Argo executor records outputs (argo docs/workflow-rbac.md)",
    ("argoproj.io", "workflows", "get"): "backend/src/v2/cmd/driver/main.go getCurrentWorkflowMetadata",
    ("", "configmaps", "get"): "backend/src/v2/config/env.go reads kfp-launcher",
    ("", "pods", "get"): "component/launcher_v2.go retryIndexFromPodAnnotation, driver/k8s.go",
    ("", "secrets", "get"): "objectstore/object_store.go reads the artifact store credential",
    ("", "persistentvolumeclaims", "create"): "driver/k8s.go CreatePvc",
    ("", "persistentvolumeclaims", "get"): "driver/k8s.go DeletePvc looks the claim up",
    ("", "persistentvolumeclaims", "delete"): "driver/k8s.go DeletePvc",
}

# What our own steps do (components/train/trainjob.py, components/register/promote.py).
OUR_CALLS: set[Grant] = {
    ("trainer.kubeflow.org", "trainjobs", "create"), ("trainer.kubeflow.org", "trainjobs", "get"),
    ("", "pods", "list"), ("", "pods/log", "get"),
    ("serving.kserve.io", "inferenceservices", "get"), ("serving.kserve.io", "inferenceservices", "create"),
    ("serving.kserve.io", "inferenceservices", "patch"),
}

# Upstream grants given only for named objects: {grant: (resourceNames, reason)}.
NARROWED: dict[Grant, tuple[frozenset[str], str]] = {
    ("", "secrets", "get"): (frozenset({"mlpipeline-minio-artifact", "onevision-s3"}),
                             "the launcher reads one Secret by name: KFP's default artifact store credential, or "
                             "ours when kfp-launcher points the pipeline root at our MinIO; every other Secret "
                             "(onevision-s3-serving, the database's) stays out of the steps' reach"),
}

_WRITE = ("create", "update", "patch", "delete", "deletecollection")
_ALL_BUT_READ_PVC = ("watch", "update", "patch", "deletecollection")
# Upstream grants deliberately not given: (apiGroup, resource, verbs) -> reason.
NOT_GRANTED: dict[tuple[str, str, tuple[str, ...]], str] = {
    ("", "persistentvolumes", ALL_VERBS): "cluster-scoped: a namespaced Role cannot grant it, and claims bind "
                                          "volumes through the provisioner, not the step",
    ("", "persistentvolumeclaims", _ALL_BUT_READ_PVC): "the driver only creates, gets and deletes claims "
                                                       "(KFP's own ml-pipeline-executor-plugin-role gives the same)",
    ("snapshot.storage.k8s.io", "volumesnapshots", ("create", "delete", "get")): "no step snapshots volumes",
    ("argoproj.io", "workflows", ("update", "patch")): "v2 steps only read their Workflow; writes served v1 "
                                                       "ResourceOps and Argo resource templates, which v2 lacks",
    ("", "pods", _WRITE): "Argo's controller creates and deletes step pods under its own account; a step "
                          "never writes pods",
    ("", "pods/exec", ALL_VERBS): "no step execs into another pod",
    ("", "pods/log", _WRITE): "logs are read-only",
    ("", "services", ALL_VERBS): "no step creates Services (KServe makes the endpoints' own)",
    ("", "deployments", ALL_VERBS): "no step manages Deployments",
    ("", "replicasets", ALL_VERBS): "no step manages ReplicaSets",
    ("apps", "deployments", ALL_VERBS): "no step manages Deployments",
    ("apps", "replicasets", ALL_VERBS): "no step manages ReplicaSets",
    ("extensions", "deployments", ALL_VERBS): "removed API group",
    ("extensions", "replicasets", ALL_VERBS): "removed API group",
    ("kubeflow.org", "*", ALL_VERBS): "training-operator v1 jobs (PyTorchJob...): we train through Trainer v2 "
                                      "TrainJobs (trainer.kubeflow.org), granted by name",
    ("batch", "jobs", ALL_VERBS): "no step creates Jobs (the Trainer's JobSet does, under its own account)",
    ("machinelearning.seldon.io", "seldondeployments", ALL_VERBS): "we serve with KServe, not Seldon",
    ("mlflow.kubeflow.org", "experiments", ("get", "list", "create", "update")): "KFP's MLflow plugin; we run "
                                                                                  "our own MLflow server",
}


def expand(rules: list[dict[str, Any]]) -> dict[Grant, frozenset[str] | None]:
    """{(group, resource, verb): resourceNames (None = every object)} granted by a list of Role rules."""
    out: dict[Grant, frozenset[str] | None] = {}
    for rule in rules:
        names = frozenset(rule["resourceNames"]) if rule.get("resourceNames") else None
        verbs = ALL_VERBS if "*" in rule["verbs"] else rule["verbs"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in verbs:
                    key = (group, resource, verb)
                    if key in out and (out[key] is None or names is None):
                        out[key] = None
                    else:
                        out[key] = names if key not in out else out[key] | names
    return out


def upstream() -> dict[Grant, frozenset[str] | None]:
    (role,) = [d for d in yaml.safe_load_all(UPSTREAM.read_text())
               if d and d["kind"] == "Role" and d["metadata"]["name"] == "pipeline-runner"]
    return expand(role["rules"])


def not_granted() -> dict[Grant, str]:
    return {(g, r, v): why for (g, r, verbs), why in NOT_GRANTED.items() for v in verbs}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    done = subprocess.run([str(BIN / "kubectl"), "kustomize", str(ROOT / "infra/platform/overlays" / request.param)],
                          capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def ours(objects: list[dict[str, Any]]) -> dict[Grant, frozenset[str] | None]:
    (role,) = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == SA]
    assert role["metadata"]["namespace"] == NAMESPACE
    return expand(role["rules"])


def test_the_vendored_role_is_kfp_2_17_pipeline_runner() -> None:
    header = UPSTREAM.read_text().split("apiVersion", 1)[0]
    assert "tag 2.17.0" in header and "4a3592cb2dd0a91a4652ab93893ec8beda1f3158" in header
    grants = upstream()
    assert ("argoproj.io", "workflowtaskresults", "create") in grants and len(grants) > 100


def test_every_upstream_grant_is_given_narrowed_or_listed_with_a_reason(rendered: list[dict[str, Any]]) -> None:
    granted, reference, withheld = ours(rendered), upstream(), not_granted()
    unaccounted = []
    for grant in reference:
        if grant in NARROWED:
            names, _ = NARROWED[grant]
            assert granted.get(grant, "missing") == names, (grant, granted.get(grant))
        elif grant in withheld:
            assert grant not in granted, f"{grant} is listed as not granted, but the Role grants it"
        elif granted.get(grant, "missing") is not None:
            unaccounted.append(grant)
    assert unaccounted == [], "upstream grants neither given nor listed in NOT_GRANTED"
    # no stale entries: each listed grant is one the upstream Role really makes
    assert set(withheld) <= set(reference), set(withheld) - set(reference)
    assert set(NARROWED) <= set(reference)
    assert all(reason.strip() for reason in NOT_GRANTED.values())


def test_kfp_v2_and_our_steps_calls_are_granted(rendered: list[dict[str, Any]]) -> None:
    granted = ours(rendered)
    missing = [g for g in [*KFP_V2_CALLS, *OUR_CALLS] if g not in granted]
    assert missing == []
    assert granted[("argoproj.io", "workflowtaskresults", "create")] is None
    assert granted[("argoproj.io", "workflowtaskresults", "patch")] is None


def test_the_role_grants_nothing_beyond_kfp_and_our_steps(rendered: list[dict[str, Any]]) -> None:
    """Least privilege: a grant that is neither upstream KFP's nor one of our steps' needs is a mistake."""
    granted = ours(rendered)
    ours_too = {(g, r) for g, r, _ in OUR_CALLS} | {("", "events")}  # events: read with the pods, for diagnosis
    extra = [g for g in granted if g not in upstream() and (g[0], g[1]) not in ours_too]
    assert extra == []
    assert not any(v in ("*",) or r == "*" for _, r, v in granted)


def test_the_role_is_bound_to_the_account_runs_and_trainer_pods_use(rendered: list[dict[str, Any]]) -> None:
    from pipelines.submit import submit_pipeline

    assert inspect.signature(submit_pipeline).parameters["service_account"].default == SA
    (binding,) = [o for o in rendered if o["kind"] == "RoleBinding" and o["metadata"]["name"] == SA]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SA}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SA, "namespace": NAMESPACE}]
    (runtime,) = [o for o in rendered if o["kind"] == "ClusterTrainingRuntime"]
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["template"]["spec"]["template"]["spec"]["serviceAccountName"] == SA

"""NetworkPolicies evaluated path by path (issue 20, point 4), over what a cluster would hold: the platform
overlay built with `kubectl kustomize` plus a promoted endpoint's GitOps overlay (onevision-prod), built the
same way. Platform pods carry the labels of their rendered pod templates; the endpoint namespace carries the
labels the Argo CD ApplicationSet gives the namespaces it creates. The evaluator (tests/netpol.py) is tested
on hand-made policies first, so that a vacuous evaluator cannot pass the path table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.netpol import Cluster, Pod

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = str(Path(sys.executable).parent / "kubectl")
OVERLAYS = sorted(p.name for p in (ROOT / "infra/platform/overlays").iterdir())


def kustomize(folder: Path) -> list[dict[str, Any]]:
    done = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(done.stdout) if o]


# --- the evaluator on hand-made policies --------------------------------------------------------------------

def policy(namespace: str, spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


WEB, DB = Pod("shop", {"app": "web"}), Pod("shop", {"app": "db"})
OTHER_WEB, MONITOR = Pod("other", {"app": "web"}), Pod("ops", {"app": "monitor"})
DB_INGRESS = {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}


def test_evaluator_without_policies_allows_everything() -> None:
    assert Cluster([]).connects(WEB, DB, 5432) and Cluster([]).connects(OTHER_WEB, MONITOR, 1, "UDP")


def test_evaluator_isolation_applies_only_to_selected_pods_and_directions() -> None:
    cluster = Cluster([policy("shop", DB_INGRESS)])  # no rules: db accepts nothing
    assert not cluster.connects(WEB, DB, 5432)
    assert cluster.connects(DB, WEB, 8080)  # web is not selected; db's egress is not isolated
    shop_only = {"podSelector": {}, "egress": [{"to": [{"podSelector": {}}]}]}
    egress_only = Cluster([policy("shop", {**shop_only, "policyTypes": ["Egress"]})])
    assert egress_only.connects(WEB, DB, 1) and not egress_only.connects(WEB, OTHER_WEB, 1)
    assert egress_only.connects(OTHER_WEB, WEB, 1)  # ingress of shop is still open
    # without policyTypes a policy is Ingress too (plus Egress, as it has an egress section): no ingress rules
    defaulted = Cluster([policy("shop", shop_only)])
    assert not defaulted.connects(WEB, DB, 1) and not defaulted.connects(OTHER_WEB, WEB, 1)


def test_evaluator_peer_selectors_and_within_a_peer_or_across_peers() -> None:
    both = {"namespaceSelector": {"matchLabels": {"team": "ops"}}, "podSelector": {"matchLabels": {"app": "monitor"}}}
    anded = Cluster([policy("shop", {**DB_INGRESS, "ingress": [{"from": [both]}]})], {"ops": {"team": "ops"}})
    assert anded.connects(MONITOR, DB, 5432)
    assert not anded.connects(Pod("ops", {"app": "web"}), DB, 5432)       # right namespace, wrong pod
    assert not anded.connects(Pod("other", {"app": "monitor"}), DB, 5432)  # right pod, wrong namespace
    split = [{"namespaceSelector": both["namespaceSelector"]}, {"podSelector": both["podSelector"]}]
    ored = Cluster([policy("shop", {**DB_INGRESS, "ingress": [{"from": split}]})], {"ops": {"team": "ops"}})
    assert ored.connects(Pod("ops", {"app": "web"}), DB, 5432)            # any pod of namespace ops
    assert ored.connects(Pod("shop", {"app": "monitor"}), DB, 5432)       # podSelector alone: the policy's namespace
    assert not ored.connects(Pod("other", {"app": "monitor"}), DB, 5432)
    by_name = Cluster([policy("shop", {**DB_INGRESS, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}}}]}]})])
    assert by_name.connects(OTHER_WEB, DB, 5432) and not by_name.connects(MONITOR, DB, 5432)
    ip_only = Cluster([policy("shop", {**DB_INGRESS, "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]})])
    assert not ip_only.connects(WEB, DB, 5432)


@pytest.mark.parametrize(("operator", "values", "admitted"), [
    ("In", ["web", "api"], {"web"}), ("NotIn", ["web"], {"batch", None}),
    ("Exists", None, {"web", "batch"}), ("DoesNotExist", None, {None})])
def test_evaluator_match_expressions(operator: str, values: list[str] | None, admitted: set[str | None]) -> None:
    expression = {"key": "app", "operator": operator, **({"values": values} if values else {})}
    cluster = Cluster([policy("shop", {**DB_INGRESS, "ingress": [
        {"from": [{"podSelector": {"matchExpressions": [expression]}}]}]})])
    for app in ("web", "batch", None):
        source = Pod("shop", {"app": app} if app else {"role": "x"})
        assert cluster.connects(source, DB, 5432) is (app in admitted), (operator, app)


def test_evaluator_ports_protocols_ranges_and_union_of_policies() -> None:
    ports = [{"protocol": "UDP", "port": 53}, {"port": 8000, "endPort": 8010}, {"protocol": "TCP", "port": "metrics"}]
    target = Pod("shop", {"app": "db"}, ports={"metrics": 9100})
    cluster = Cluster([policy("shop", {**DB_INGRESS, "ingress": [{"from": [{"podSelector": {}}], "ports": ports}]})])
    assert cluster.connects(WEB, target, 53, "UDP") and not cluster.connects(WEB, target, 53, "TCP")
    assert cluster.connects(WEB, target, 8005) and not cluster.connects(WEB, target, 8011)
    assert cluster.connects(WEB, target, 9100) and not cluster.connects(WEB, target, 9101)
    second = policy("shop", {**DB_INGRESS, "ingress": [{"ports": [{"port": 8011}]}]}, name="q")  # any peer
    union = Cluster([*cluster.policies, second])
    assert union.connects(OTHER_WEB, target, 8011) and not union.connects(OTHER_WEB, target, 8005)


# --- the platform's paths -------------------------------------------------------------------------------------

MODEL, ENDPOINT = "llava-onevision-ov-0.5b", "ov-0-5b"


def template_labels(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, str]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj["spec"]["template"]["metadata"]["labels"]


@pytest.fixture(scope="module")
def endpoint_overlay(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """`onevision promote` output for the ov-0.5b endpoint in prod, built with kubectl kustomize."""
    from components.register.promote import overlay

    (isvc,) = yaml.safe_load_all((ROOT / f"infra/serving/ov-0.5b/{ENDPOINT}.yaml").read_text())
    account = yaml.safe_load((ROOT / "infra/serving/ov-0.5b/serviceaccount-onevision.yaml").read_text())
    folder = tmp_path_factory.mktemp("overlay") / "infra/gitops/endpoints/prod" / MODEL
    folder.mkdir(parents=True)
    for name, text in overlay(isvc, "s3://onevision/models/ov/v3/hf", None, "onevision-prod", account).items():
        (folder / name).write_text(text)
    return kustomize(folder)


def endpoint_namespace_labels() -> dict[str, str]:
    """What the ApplicationSet puts on the namespaces it creates."""
    (appset,) = [o for o in kustomize(ROOT / "infra/argocd") if o["kind"] == "ApplicationSet"]
    sync = appset["spec"]["template"]["spec"]["syncPolicy"]
    assert "CreateNamespace=true" in sync["syncOptions"]
    return sync["managedNamespaceMetadata"]["labels"]


@pytest.fixture(scope="module", params=OVERLAYS)
def world(request: pytest.FixtureRequest, endpoint_overlay: list[dict[str, Any]]) -> tuple[Cluster, dict[str, Pod]]:
    platform = kustomize(ROOT / "infra/platform/overlays" / request.param)
    cluster = Cluster(platform + endpoint_overlay, {"onevision-prod": endpoint_namespace_labels()})
    (isvc,) = [o for o in endpoint_overlay if o["kind"] == "InferenceService"]
    predictor = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"], "component": "predictor"}
    system = "onevision-system"
    pods = {
        "minio": Pod(system, template_labels(platform, "Deployment", "minio")),
        "mlflow": Pod(system, template_labels(platform, "Deployment", "mlflow")),
        "postgres": Pod(system, template_labels(platform, "StatefulSet", "mlflow-postgres")
                        if any(o["kind"] == "StatefulSet" for o in platform)
                        else template_labels(platform, "Deployment", "mlflow-postgres")),
        "minio-setup": Pod(system, template_labels(platform, "Job", "minio-setup")),
        "pipeline": Pod("onevision", {"pipelines.kubeflow.org/v2_component": "true"}),
        "kfp-standalone": Pod("kubeflow", {"pipelines.kubeflow.org/v2_component": "true"}),
        "rank": Pod("onevision", {"trainer.kubeflow.org/trainjob-name": "r1-stage1"}),
        "predictor-prod": Pod("onevision-prod", predictor),
        "predictor": Pod("onevision", {**predictor, "serving.kserve.io/inferenceservice": "ov-0-5b"}),
        "other-prod": Pod("onevision-prod", {"app": "debug"}),
        "predictor-elsewhere": Pod("team-x", predictor),
        "activator": Pod("knative-serving", {"app": "activator"}),
        "autoscaler": Pod("knative-serving", {"app": "autoscaler"}),
        "gateway": Pod("istio-system", {"istio": "ingressgateway", "app": "istio-ingressgateway"}),
        "prometheus": Pod("monitoring", {"app.kubernetes.io/name": "prometheus"}),
        "dns": Pod("kube-system", {"k8s-app": "kube-dns"}),
        "default": Pod("default", {"app": "curl"}),
    }
    return cluster, pods


PATHS = [  # (source, destination, port, protocol, expected)
    ("pipeline", "minio", 9000, "TCP", True), ("pipeline", "mlflow", 5000, "TCP", True),
    ("kfp-standalone", "minio", 9000, "TCP", True), ("kfp-standalone", "mlflow", 5000, "TCP", True),
    ("rank", "rank", 29500, "TCP", True), ("mlflow", "postgres", 5432, "TCP", True),
    ("mlflow", "minio", 9000, "TCP", True), ("minio-setup", "minio", 9000, "TCP", True),
    ("predictor-prod", "minio", 9000, "TCP", True), ("predictor", "minio", 9000, "TCP", True),
    ("activator", "predictor-prod", 8012, "TCP", True), ("activator", "predictor", 8012, "TCP", True),
    ("gateway", "predictor-prod", 8012, "TCP", True), ("gateway", "predictor", 8012, "TCP", True),
    ("autoscaler", "predictor-prod", 9090, "TCP", True), ("autoscaler", "predictor", 9090, "TCP", True),
    ("prometheus", "predictor-prod", 9091, "TCP", True), ("prometheus", "predictor", 9091, "TCP", True),
    ("predictor-prod", "dns", 53, "UDP", True), ("predictor-prod", "dns", 53, "TCP", True),
    ("predictor", "dns", 53, "UDP", True),
    # must not
    ("default", "minio", 9000, "TCP", False), ("default", "mlflow", 5000, "TCP", False),
    ("default", "predictor-prod", 8012, "TCP", False), ("default", "predictor", 8012, "TCP", False),
    ("predictor-prod", "postgres", 5432, "TCP", False), ("predictor", "postgres", 5432, "TCP", False),
    ("predictor-prod", "mlflow", 5000, "TCP", False), ("predictor", "mlflow", 5000, "TCP", False),
    ("predictor-prod", "pipeline", 8080, "TCP", False), ("pipeline", "postgres", 5432, "TCP", False),
    ("prometheus", "minio", 9000, "TCP", False), ("prometheus", "mlflow", 5000, "TCP", False),
    ("activator", "mlflow", 5000, "TCP", False), ("activator", "minio", 9000, "TCP", False),
    ("activator", "predictor-prod", 8080, "TCP", False), ("gateway", "predictor-prod", 9091, "TCP", False),
    ("prometheus", "predictor-prod", 8012, "TCP", False), ("autoscaler", "predictor-prod", 8012, "TCP", False),
    ("pipeline", "minio", 9001, "TCP", False),  # the console: port-forward only
    ("other-prod", "minio", 9000, "TCP", False), ("predictor-elsewhere", "minio", 9000, "TCP", False),
]


@pytest.mark.parametrize(("source", "destination", "port", "protocol", "expected"), PATHS,
                         ids=[f"{s}->{d}:{p}/{q}" for s, d, p, q, _ in PATHS])
def test_path(world: tuple[Cluster, dict[str, Pod]], source: str, destination: str, port: int, protocol: str,
              expected: bool) -> None:
    cluster, pods = world
    assert cluster.connects(pods[source], pods[destination], port, protocol) is expected


def test_every_platform_pod_and_endpoint_pod_is_isolated_for_ingress(world: tuple[Cluster, dict[str, Pod]]) -> None:
    """No open door left: every server of ours is selected by an Ingress policy; predictors for Egress too."""
    cluster, pods = world
    stranger = Pod("default", {})
    for name in ("minio", "mlflow", "postgres", "minio-setup", "pipeline", "predictor", "predictor-prod"):
        assert not cluster.allows("Ingress", pods[name], stranger, 12345, "TCP"), name
    for name in ("predictor", "predictor-prod"):
        assert not cluster.allows("Egress", pods[name], stranger, 443, "TCP"), name

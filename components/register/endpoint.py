"""What an endpoint namespace needs besides the InferenceService, carried by its GitOps endpoint overlay.

Argo CD creates `onevision-<env>` empty (CreateNamespace=true), so each overlay brings, for its endpoint:
  ServiceAccount   the export's `onevision-serving` account (serving.manifests.service_account), renamed per
                   endpoint and naming the endpoint's Secret
  ExternalSecret   External Secrets Operator materialises that Secret from ClusterSecretStore `onevision-secrets`,
                   remote key `onevision/<the recipe's serving Secret>`, with the key names KServe reads
  NetworkPolicy    the predictor pods accept only the Knative activator, the Istio ingress gateway, the Knative
                   autoscaler and Prometheus, and reach only DNS and MinIO

Names are per endpoint, not the namespace-wide `onevision-serving` / `onevision-s3-serving`: every endpoint
overlay is its own Argo CD Application, and two Applications owning one object fight over it (Argo CD's
SharedResourceWarning; pruning one endpoint would delete the account the others still use).

What KServe reads (kserve/kserve pkg/credentials/service_account_credentials.go and pkg/credentials/s3/
{s3_secret.go,utils.go}, at v0.20.0 = 1fb781055dd1567164358233e1125142ca6ef1fe and master
aaac4e294dae2c7b1aa1886447793f3aa1c30912): the storage initializer's credentials come from the Secrets the
predictor's ServiceAccount lists (`secrets:`); a Secret is taken as S3 when it holds the key
`credentials.s3.s3SecretAccessKeyName` of the inferenceservice-config ConfigMap (config/configmap/
inferenceservice.yaml: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); the `serving.kserve.io/s3-*` annotations
(endpoint, usehttps, region, ...) are read from that *Secret's* annotations, and from the ServiceAccount's only
when it carries the EKS IRSA annotation. So the ExternalSecret's template copies them onto the Secret.
"""

from __future__ import annotations

from typing import Any

SECRET_STORE = "onevision-secrets"  # ClusterSecretStore, installed out of band per installation
KSERVE_S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # inferenceservice-config credentials.s3 defaults
S3_ANNOTATION_PREFIX = "serving.kserve.io/s3-"
PREDICTOR_LABEL = "serving.kserve.io/inferenceservice"  # KServe's label on every pod of an InferenceService
# Set on onevision-<env> by the ApplicationSet (managedNamespaceMetadata); MinIO's policy admits predictors from
# namespaces carrying it (a namespace selector cannot match a name pattern).
ENDPOINT_NAMESPACE_LABEL = ("onevision/role", "endpoints")
# Argo CD syncs lower waves first and waits for them to be healthy (its ExternalSecret health check waits for
# the Secret): the predictor pod must find its account and Secret when it is admitted, as KServe injects the
# storage credentials only then.
BEFORE_ENDPOINT = {"argocd.argoproj.io/sync-wave": "-1"}

# Knative Serving (knative/serving pkg/networking/constants.go, knative-v1.23.0-5-g98e5ef90): queue-proxy
# serves HTTP/1 on 8012 (BackendHTTPPort), the autoscaler's metrics on 9090, users' metrics on 9091; KServe's
# `enable-prometheus-scraping` points prometheus.io/port at 9091 (pkg/constants DefaultPodPrometheusPort; 9088
# only with metric aggregation, off by default).
QUEUE_PROXY_HTTP, AUTOSCALER_METRICS, USER_METRICS = 8012, 9090, 9091
MINIO = {"namespace": "onevision-system", "labels": {"app": "minio"}, "port": 9000}


def _ns(name: str) -> dict[str, Any]:
    return {"matchLabels": {"kubernetes.io/metadata.name": name}}


def _tcp(port: int) -> dict[str, Any]:
    return {"protocol": "TCP", "port": port}


def names(endpoint: str) -> dict[str, str]:
    return {"service_account": f"onevision-serving-{endpoint}", "secret": f"onevision-s3-serving-{endpoint}"}


def service_account(exported: dict[str, Any], endpoint: str, namespace: str) -> dict[str, Any]:
    """The export's ServiceAccount (serving.manifests.service_account), this endpoint's name and Secret."""
    annotations = {k: v for k, v in exported["metadata"].get("annotations", {}).items()}
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": names(endpoint)["service_account"], "namespace": namespace,
                         "annotations": {**annotations, **BEFORE_ENDPOINT}},
            "secrets": [{"name": names(endpoint)["secret"]}]}


def external_secret(exported: dict[str, Any], endpoint: str, namespace: str) -> dict[str, Any]:
    """Materialises the endpoint's Secret from the store entry of the recipe's serving Secret."""
    (remote,) = [s["name"] for s in exported["secrets"]]
    s3 = {k: v for k, v in exported["metadata"].get("annotations", {}).items() if k.startswith(S3_ANNOTATION_PREFIX)}
    return {"apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
            "metadata": {"name": names(endpoint)["secret"], "namespace": namespace, "annotations": dict(BEFORE_ENDPOINT)},
            "spec": {"refreshInterval": "1h",
                     "secretStoreRef": {"kind": "ClusterSecretStore", "name": SECRET_STORE},
                     # no template data: the fetched keys are the Secret's data; the template adds the annotations
                     "target": {"name": names(endpoint)["secret"], "creationPolicy": "Owner",
                                "template": {"metadata": {"annotations": s3}}},
                     "data": [{"secretKey": key, "remoteRef": {"key": f"onevision/{remote}", "property": key}}
                              for key in KSERVE_S3_KEYS]}}


def network_policy(endpoint: str, namespace: str) -> dict[str, Any]:
    """The endpoint's pods: in from Knative and Prometheus on queue-proxy's ports only, out to DNS and MinIO."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"onevision-endpoint-{endpoint}", "namespace": namespace,
                         "annotations": dict(BEFORE_ENDPOINT)},
            "spec": {"podSelector": {"matchLabels": {PREDICTOR_LABEL: endpoint}},
                     "policyTypes": ["Ingress", "Egress"],
                     "ingress": [
                         {"from": [{"namespaceSelector": _ns("knative-serving"),
                                    "podSelector": {"matchLabels": {"app": "activator"}}},
                                   {"namespaceSelector": _ns("istio-system"),
                                    "podSelector": {"matchLabels": {"istio": "ingressgateway"}}}],
                          "ports": [_tcp(QUEUE_PROXY_HTTP)]},
                         {"from": [{"namespaceSelector": _ns("knative-serving"),
                                    "podSelector": {"matchLabels": {"app": "autoscaler"}}}],
                          "ports": [_tcp(AUTOSCALER_METRICS)]},
                         {"from": [{"namespaceSelector": _ns("monitoring"),
                                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
                          "ports": [_tcp(USER_METRICS)]}],
                     "egress": [
                         {"to": [{"namespaceSelector": _ns("kube-system"),
                                  "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                          "ports": [{"protocol": "UDP", "port": 53}, _tcp(53)]},
                         {"to": [{"namespaceSelector": _ns(MINIO["namespace"]),
                                  "podSelector": {"matchLabels": MINIO["labels"]}}],
                          "ports": [_tcp(MINIO["port"])]}]}}

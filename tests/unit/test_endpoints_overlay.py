"""Endpoint namespaces get what they need (issue 20, points 2, 3 and 8).

- Every InferenceService the platform produces (serving.manifests.render for every recipe, and the GitOps
  endpoint overlay `onevision promote` writes) names a ServiceAccount of its own namespace, and that account's
  Secret exists with exactly the key names KServe's storage initializer reads: as an ExternalSecret target in
  the overlay (with KServe's s3 annotations on the Secret, where KServe reads them), or documented as created
  out of band for the platform namespace.
- The overlay's ExternalSecret validates against the External Secrets Operator CRD (vendored, v2.9.0), with
  unknown fields rejected; Argo CD's AppProject admits every kind the overlay holds.
- Traffic: a rollback and a first deployment carry no canaryTrafficPercent (KServe then routes 100% to the
  latest ready revision); a promotion over a deployed endpoint carries the canary. The GitOps repository's
  default branch decides "deployed", checked with a real git repository.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from components.register import endpoint
from components.register.promote import OVERLAY_ROOT, overlay, traffic, write_overlay
from onevision.recipe import load_recipe
from serving.manifests import check_manifest, render

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = str(Path(sys.executable).parent / "kubectl")
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
ES_CRD = ROOT / "infra/schemas/external-secrets/externalsecret-crd.extract.yaml"
# kserve/kserve config/configmap/inferenceservice.yaml (v0.20.0, 1fb781055dd1567164358233e1125142ca6ef1fe):
# credentials.s3.s3AccessKeyIDName / s3SecretAccessKeyName, the keys the storage initializer's env is read from
KSERVE_S3_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
STORE_KEY = "onevision/onevision-s3-serving"


def kustomize(folder: Path) -> list[dict[str, Any]]:
    done = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def rendered(recipe: str) -> list[dict[str, Any]]:
    files = render(load_recipe(ROOT / "recipes" / recipe), "s3://onevision/runs/r1/stage2_ov/hf",
                   "s3://onevision/runs/r1/export/triton")
    return [o for objects in files.values() for o in objects]


def custom_predictor(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What promote takes from an export: the custom-predictor InferenceService and its ServiceAccount."""
    (isvc,) = [o for o in objects if o["kind"] == "InferenceService" and "containers" in o["spec"]["predictor"]]
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"
                  and o["metadata"]["namespace"] == isvc["metadata"]["namespace"]]
    return isvc, account


def build(files: dict[str, str], folder: Path) -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return kustomize(folder)


def promoted(recipe: str, tmp_path: Path, canary: int | None = None, env: str = "prod") -> list[dict[str, Any]]:
    isvc, account = custom_predictor(rendered(recipe))
    files = overlay(isvc, "s3://onevision/models/m/v7/hf", canary, f"onevision-{env}", account)
    return build(files, tmp_path / recipe / env)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


# --- the vendored ExternalSecret schema ---------------------------------------------------------------------

def strict_schema(schema: Any) -> Any:
    """Unknown fields rejected (the API server's strict field validation): every object schema that lists
    properties and neither maps nor preserves unknown fields is closed."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k in ("items", "additionalProperties") else v for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: strict_schema(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def es_errors(obj: dict[str, Any]) -> list[str]:
    crd = yaml.safe_load(ES_CRD.read_text())
    (version,) = crd["spec"]["versions"]
    assert obj["apiVersion"] == f"{crd['spec']['group']}/{version['name']}" and obj["kind"] == crd["spec"]["names"]["kind"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is the API server's, not in the CRD
    validator = jsonschema.Draft7Validator(strict_schema(schema))
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(obj))


def test_vendored_external_secret_schema_names_its_source() -> None:
    head = ES_CRD.read_text().split("apiVersion:", 1)[0]
    assert "external-secrets/external-secrets" in head and "config/crds/bases/external-secrets.io_externalsecrets.yaml" in head
    assert re.search(r"commit:\s+[0-9a-f]{40}\b", head) and "v2.9.0" in head


@pytest.mark.parametrize("recipe", RECIPES)
def test_overlay_external_secret_matches_the_crd(recipe: str, tmp_path: Path) -> None:
    (secret,) = by_kind(promoted(recipe, tmp_path), "ExternalSecret")
    assert es_errors(secret) == []


def test_schema_validation_catches_typos_and_wrong_values(tmp_path: Path) -> None:
    (secret,) = by_kind(promoted("tiny.yaml", tmp_path), "ExternalSecret")
    secret["spec"]["data"][0]["remoteRef"]["propery"] = secret["spec"]["data"][0]["remoteRef"].pop("property")
    secret["spec"]["target"]["creationPolicy"] = "Own"
    secret["spec"]["secretStoreRef"]["kind"] = "ClusterStore"
    errors = es_errors(secret)
    assert len(errors) == 3, errors
    assert any("propery" in e for e in errors) and any("'Own' is not one of" in e for e in errors)
    assert any("'ClusterStore' is not one of" in e for e in errors)


# --- point 2: every InferenceService's account and Secret resolve ---------------------------------------------

def test_kserve_reads_the_key_names_every_s3_secret_uses() -> None:
    from pipelines.onevision import S3_SECRET_KEYS

    assert set(endpoint.KSERVE_S3_KEYS) == KSERVE_S3_KEYS == set(S3_SECRET_KEYS.values())


@pytest.mark.parametrize("recipe", RECIPES)
def test_rendered_inference_services_resolve_their_account(recipe: str) -> None:
    """serving.manifests output: the account is in the same files and namespace; its Secret is the recipe's
    serving Secret, created out of band (documented with KServe's key names) where no overlay brings it."""
    objects = rendered(recipe)
    accounts = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in by_kind(objects, "ServiceAccount")}
    docs = (ROOT / "infra/platform/base/kustomization.yaml").read_text()
    secret = load_recipe(ROOT / "recipes" / recipe).cluster.serving_s3_secret
    assert re.search(rf"#\s+{re.escape(secret)}\s", docs) and all(k in docs for k in KSERVE_S3_KEYS)
    isvcs = by_kind(objects, "InferenceService")
    assert isvcs
    for isvc in isvcs:
        key = (isvc["metadata"]["namespace"], isvc["spec"]["predictor"]["serviceAccountName"])
        assert key in accounts, key
        assert [s["name"] for s in accounts[key]["secrets"]] == [secret]


@pytest.mark.parametrize("recipe", RECIPES)
def test_gitops_overlay_brings_account_and_secret_kserve_can_read(recipe: str, tmp_path: Path) -> None:
    objects = promoted(recipe, tmp_path)
    for obj in objects:
        assert obj["metadata"]["namespace"] == "onevision-prod", obj["kind"]
        if obj["kind"] in ("InferenceService", "ServiceAccount"):
            assert check_manifest(obj) == [], obj["kind"]
    (isvc,) = by_kind(objects, "InferenceService")
    (account,) = [a for a in by_kind(objects, "ServiceAccount")
                  if a["metadata"]["name"] == isvc["spec"]["predictor"]["serviceAccountName"]]
    targets = {e["spec"]["target"]["name"]: e for e in by_kind(objects, "ExternalSecret")}
    assert account["secrets"] and all(s["name"] in targets for s in account["secrets"])
    for ref in account["secrets"]:
        spec = targets[ref["name"]]["spec"]
        assert spec["secretStoreRef"] == {"kind": "ClusterSecretStore", "name": "onevision-secrets"}
        assert {d["secretKey"] for d in spec["data"]} == KSERVE_S3_KEYS and len(spec["data"]) == 2
        assert {(d["remoteRef"]["key"], d["remoteRef"]["property"]) for d in spec["data"]} == {
            (STORE_KEY, k) for k in KSERVE_S3_KEYS}
        assert "data" not in spec["target"].get("template", {})  # the fetched keys stay the Secret's data
        # KServe reads the s3-* annotations from the Secret (pkg/credentials/service_account_credentials.go)
        annotations = spec["target"]["template"]["metadata"]["annotations"]
        assert annotations["serving.kserve.io/s3-endpoint"] == "minio.onevision-system.svc:9000"
        assert annotations["serving.kserve.io/s3-usehttps"] == "0"
    assert not by_kind(objects, "Secret")  # never a literal


def test_two_endpoints_in_one_namespace_share_no_object(tmp_path: Path) -> None:
    """Each overlay is its own Argo CD Application: two owning one object would fight over it."""
    first, second = promoted("ov-0.5b.yaml", tmp_path), promoted("ov-7b.yaml", tmp_path)
    ids = lambda objects: {(o["kind"], o["metadata"]["name"]) for o in objects}  # noqa: E731
    assert ids(first) and not ids(first) & ids(second)
    policies = by_kind(first, "NetworkPolicy") + by_kind(second, "NetworkPolicy")
    assert [p["spec"]["podSelector"]["matchLabels"][endpoint.PREDICTOR_LABEL] for p in policies] == ["ov-0-5b", "ov-7b"]


def test_endpoint_objects_sync_before_the_inference_service(tmp_path: Path) -> None:
    """KServe adds the storage credentials when the predictor pod is admitted: account and Secret come first."""
    for obj in promoted("tiny.yaml", tmp_path):
        wave = int(obj["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))
        assert wave == (0 if obj["kind"] == "InferenceService" else -1), obj["kind"]


def test_appproject_admits_every_kind_of_the_overlay(tmp_path: Path) -> None:
    (project,) = [o for o in kustomize(ROOT / "infra/argocd") if o["kind"] == "AppProject"]
    allowed = {(g["group"], g["kind"]) for g in project["spec"]["namespaceResourceWhitelist"]}
    kinds = {(o["apiVersion"].rpartition("/")[0], o["kind"]) for o in promoted("tiny.yaml", tmp_path)}
    assert kinds == {("serving.kserve.io", "InferenceService"), ("", "ServiceAccount"),
                     ("external-secrets.io", "ExternalSecret"), ("networking.k8s.io", "NetworkPolicy")}
    assert kinds <= allowed
    assert ("", "Secret") not in allowed  # Secrets are the operator's, never the GitOps repository's


# --- point 8: traffic of a first deployment, a promotion and a rollback ---------------------------------------

@pytest.mark.parametrize(("verb", "requested", "deployed", "expected"), [
    ("promote", None, True, 20), ("promote", 5, True, 5), ("deploy", None, True, 20),
    ("promote", None, False, None), ("promote", 5, False, None), ("deploy", None, False, None),
    ("rollback", None, True, None), ("rollback", None, False, None)])
def test_traffic(verb: str, requested: int | None, deployed: bool, expected: int | None) -> None:
    assert traffic(verb, requested, 20, deployed) == expected


@pytest.mark.parametrize("canary", [None, 10])
def test_overlay_carries_exactly_the_canary_it_is_given(canary: int | None, tmp_path: Path) -> None:
    isvc, account = custom_predictor(rendered("tiny.yaml"))
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 20  # the export carries the recipe's
    files = overlay(isvc, "s3://onevision/models/m/v7/hf", canary, "onevision-prod", account)
    (built,) = by_kind(build(files, tmp_path), "InferenceService")
    assert built["spec"]["predictor"].get("canaryTrafficPercent") == canary
    assert {"name": "STORAGE_URI", "value": "s3://onevision/models/m/v7/hf"} in built["spec"]["predictor"]["containers"][0]["env"]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def test_first_deployment_is_what_the_default_branch_lacks(tmp_path: Path) -> None:
    """write_overlay reads the default branch (what Argo CD syncs): no overlay there = a first deployment."""
    repo = tmp_path / "gitops.git"
    git("init", "-q", "--bare", str(repo))
    seen: list[bool] = []

    def make(deployed: bool) -> tuple[dict[str, str], str]:
        seen.append(deployed)
        return {"kustomization.yaml": f"# {len(seen)}\n"}, f"overlay {len(seen)}"

    first, deployed = write_overlay(str(repo), "m", "prod", make, "promote/m/prod/v1")
    assert (seen, deployed) == ([False], False)
    again, deployed = write_overlay(str(repo), "m", "prod", make, "promote/m/prod/v1")  # a retried step
    assert (again, deployed, seen) == (first, None, [False])
    write_overlay(str(repo), "m", "prod", make, "promote/m/prod/v2")  # the first is not merged yet
    assert seen == [False, False]
    default = git("--git-dir", str(repo), "symbolic-ref", "HEAD")
    git("--git-dir", str(repo), "update-ref", default, first)  # the pull request merged
    _, deployed = write_overlay(str(repo), "m", "prod", make, "promote/m/prod/v3")
    assert seen[-1] is True and deployed is True
    _, deployed = write_overlay(str(repo), "m", "dev", make, "promote/m/dev/v3")  # another environment
    assert deployed is False
    listing = git("--git-dir", str(repo), "ls-tree", "-r", "--name-only", "promote/m/prod/v3")
    assert listing.splitlines() == [f"{OVERLAY_ROOT}/prod/m/kustomization.yaml"]

"""Promote a gated model version to an environment, or roll back, through the registry and GitOps.

    onevision promote llava-onevision-tiny --version 3 --env prod --canary 10 --gitops-repo ../gitops
    onevision rollback llava-onevision-tiny --env prod --gitops-repo ../gitops

Promote refuses a version whose evaluation gate failed, moves alias `champion` to it (the former champion
becomes `previous-champion`, the rollback target), and writes the endpoint's overlay as a commit on a new
branch of the GitOps repository (a local path or any git remote), ready for a pull request:

    infra/gitops/endpoints/<env>/<model>/inferenceservice.yaml   the exported InferenceService (our predictor)
    infra/gitops/endpoints/<env>/<model>/serviceaccount.yaml     its storage ServiceAccount  } what the empty
    infra/gitops/endpoints/<env>/<model>/externalsecret.yaml     its S3 Secret, via ESO      } namespace needs
    infra/gitops/endpoints/<env>/<model>/networkpolicy.yaml      who may reach it, what it may reach   (endpoint.py)
    infra/gitops/endpoints/<env>/<model>/kustomization.yaml      patches: storage URI -> this version, canary

Argo CD (an ApplicationSet over infra/gitops/endpoints/*/*) syncs the merged overlay. Rollback swaps `champion` and
`previous-champion` and writes the overlay of the restored version the same way. `deploy` is the
pipeline's step for a non-production environment: the same overlay, alias named after the environment.
Traffic (`traffic`): a promotion over a deployed endpoint is a canary (`--canary`, else the recipe's
canary_percent); a first deployment and a rollback take 100% at once.
"""

from __future__ import annotations

import copy
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from components.register import endpoint
from components.register.core import CHAMPION, PREVIOUS, TAG_EXPORT, TAG_GATE, TAG_GATE_REASONS, RegistryError
from onevision import tracking
from onevision import storage

OVERLAY_ROOT = Path("infra/gitops/endpoints")  # in the GitOps repository; infra/argocd's ApplicationSet reads it


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RegistryError(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def _exported(version: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The custom-predictor InferenceService and its ServiceAccount from the version's export (manifests/)."""
    export = version.tags.get(TAG_EXPORT)
    if not export:
        raise RegistryError(f"version {version.version} has no {TAG_EXPORT} tag: export it before promoting")
    files = [u for u in storage.list_uris(storage.join(export, "manifests")) if u.endswith(".yaml")]
    objects = [obj for uri in sorted(files) for obj in yaml.safe_load_all(storage.read_bytes(uri)) if obj]
    isvc = next((o for o in objects if o.get("kind") == "InferenceService" and "containers" in o["spec"]["predictor"]),
                None)
    if isvc is None:
        raise RegistryError(f"{export}/manifests holds no InferenceService for the KServe predictor")
    account = next((o for o in objects if o.get("kind") == "ServiceAccount"
                    and o["metadata"]["name"] == isvc["spec"]["predictor"].get("serviceAccountName")
                    and o["metadata"].get("namespace") == isvc["metadata"].get("namespace")), None)
    if account is None:
        raise RegistryError(f"{export}/manifests holds no ServiceAccount "
                            f"{isvc['spec']['predictor'].get('serviceAccountName')!r} for {isvc['metadata']['name']}")
    return isvc, account


def _default_account(namespace: str) -> dict[str, Any]:
    """What serving.manifests renders for a recipe with the default cluster settings."""
    from types import SimpleNamespace

    from onevision.recipe import ClusterSpec
    from serving.manifests import service_account

    return service_account(SimpleNamespace(cluster=ClusterSpec()), namespace)  # it reads recipe.cluster only


def overlay(isvc: dict[str, Any], storage_uri: str, canary: int | None, namespace: str,
            account: dict[str, Any] | None = None) -> dict[str, str]:
    """{file name: content} of the endpoint overlay. `canary`: the new version's share of traffic, None for all
    of it at once (KServe: no canaryTrafficPercent routes 100% to the latest ready revision). `account`: the
    export's ServiceAccount; the overlay brings it, its Secret (ExternalSecret) and the endpoint's NetworkPolicy."""
    name = isvc["metadata"]["name"]
    account = account or _default_account(namespace)
    base = copy.deepcopy(isvc)
    base["spec"]["predictor"].pop("canaryTrafficPercent", None)  # the recipe's canary applies only when asked for
    container = base["spec"]["predictor"]["containers"][0]
    env_index = next(i for i, e in enumerate(container["env"]) if e["name"] == "STORAGE_URI")
    patch = [{"op": "replace", "path": f"/spec/predictor/containers/0/env/{env_index}/value", "value": storage_uri},
             {"op": "add", "path": "/spec/predictor/serviceAccountName",
              "value": endpoint.names(name)["service_account"]}]
    if canary is not None:
        patch.append({"op": "add", "path": "/spec/predictor/canaryTrafficPercent", "value": canary})
    objects = {"serviceaccount.yaml": endpoint.service_account(account, name, namespace),
               "externalsecret.yaml": endpoint.external_secret(account, name, namespace),
               "networkpolicy.yaml": endpoint.network_policy(name, namespace)}
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "namespace": namespace, "resources": [*objects, "inferenceservice.yaml"],
                     "patches": [{"target": {"kind": "InferenceService", "name": name},
                                  "patch": yaml.safe_dump(patch, sort_keys=False)}]}
    return {**{file: yaml.safe_dump(obj, sort_keys=False) for file, obj in objects.items()},
            "inferenceservice.yaml": yaml.safe_dump(base, sort_keys=False),
            "kustomization.yaml": yaml.safe_dump(kustomization, sort_keys=False)}


def traffic(verb: str, requested: int | None, recipe_canary: int | None, deployed: bool) -> int | None:
    """canaryTrafficPercent of the overlay, None for 100% at once. A rollback takes all traffic at once (a canary
    would leave most of it on the version being rolled back); so does a first deployment (no previous revision to
    share with). Otherwise the requested canary, else the recipe's."""
    if verb == "rollback" or not deployed:
        return None
    return requested if requested is not None else recipe_canary


def write_overlay(gitops_repo: str, name: str, env: str,
                  make: Callable[[bool], tuple[dict[str, str], str]], branch: str) -> tuple[str, bool | None]:
    """Commit the overlay on a new branch of the GitOps repository and push it; returns (commit, deployed).
    `make(deployed)` gives the files and the commit message; `deployed`: the default branch (what Argo CD syncs)
    already holds this endpoint's overlay. A retried step finds its branch pushed: (that commit, None)."""
    pushed = subprocess.run(["git", "ls-remote", "--heads", gitops_repo, branch], capture_output=True, text=True)
    if pushed.returncode == 0 and pushed.stdout.strip():  # a retried step: this overlay is already up for review
        return pushed.stdout.split()[0], None
    with tempfile.TemporaryDirectory(prefix="gitops-") as tmp:
        work = Path(tmp) / "repo"
        done = subprocess.run(["git", "clone", "--quiet", gitops_repo, str(work)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RegistryError(f"cannot clone the GitOps repository {gitops_repo}: {done.stderr.strip()}")
        folder = work / OVERLAY_ROOT / env / name
        deployed = (folder / "kustomization.yaml").is_file()
        files, message = make(deployed)
        _git(work, "checkout", "-q", "-b", branch)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.yaml"):  # the overlay is rewritten whole
            stale.unlink()
        for file_name, content in files.items():
            (folder / file_name).write_text(content)
        _git(work, "add", "-A", str(folder))
        _git(work, "-c", "user.name=onevision", "-c", "user.email=onevision@localhost", "commit", "-q", "-m", message)
        _git(work, "push", "-q", "origin", branch)
        return _git(work, "rev-parse", "HEAD"), deployed


def _apply(name: str, version: Any, env: str, canary: int | None, gitops_repo: str, verb: str) -> dict[str, Any]:
    isvc, account = _exported(version)
    # the environment owns the namespace (the ApplicationSet deploys infra/gitops/endpoints/<env>/* to onevision-<env>)
    namespace = f"onevision-{env}"
    applied: dict[str, int | None] = {}

    def make(deployed: bool) -> tuple[dict[str, str], str]:
        applied["canary"] = traffic(verb, canary, isvc["spec"]["predictor"].get("canaryTrafficPercent"), deployed)
        share = (f" (canary {applied['canary']}%)" if applied["canary"] is not None
                 else " (all traffic)" if deployed else " (first deployment: all traffic)")
        return (overlay(isvc, tracking.weights_uri(version), applied["canary"], namespace, account),
                f"{verb} {name} v{version.version} to {env}{share}")

    branch = f"{verb}/{name}/{env}/v{version.version}"
    commit, deployed = write_overlay(gitops_repo, name, env, make, branch)
    return {"name": name, "version": version.version, "env": env, "branch": branch, "commit": commit,
            "canary": applied.get("canary"), "first_deployment": None if deployed is None else not deployed}


def _gated_version(client: Any, name: str, version: str, doing: str) -> Any:
    target = client.get_model_version(name, version)
    if target.tags.get(TAG_GATE) != "true":
        raise RegistryError(f"{name} v{version} did not pass the evaluation gate "
                            f"({target.tags.get(TAG_GATE_REASONS, 'no gate result recorded')}); not {doing}")
    return target


def promote(name: str, version: str, env: str, gitops_repo: str, canary: int | None = None) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    if canary is not None and not 0 <= canary <= 100:
        raise RegistryError(f"--canary {canary}: a percentage 0-100")
    client = MlflowClient()
    target = _gated_version(client, name, version, "promoting")
    result = _apply(name, target, env, canary, gitops_repo, "promote")  # the overlay first: no alias without it
    current = client.get_registered_model(name).aliases.get(CHAMPION)
    if current is not None and str(current) != str(version):
        client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, version)
    return {**result, "previous_champion": current}


def deploy(name: str, version: str, env: str, gitops_repo: str, canary: int | None = None) -> dict[str, Any]:
    """The pipeline's deploy step: a gated version to a non-production environment. Like promote, but it
    moves the alias named after the environment (e.g. `dev`), never `champion`."""
    from mlflow.tracking import MlflowClient

    if env in ("prod", "production"):
        raise RegistryError(f"deploy to {env!r}: production is reached by `onevision promote` after review")
    client = MlflowClient()
    target = _gated_version(client, name, version, "deploying")
    result = _apply(name, target, env, canary, gitops_repo, "deploy")
    client.set_registered_model_alias(name, env, version)
    return result


def rollback(name: str, env: str, gitops_repo: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    aliases = client.get_registered_model(name).aliases
    if PREVIOUS not in aliases:
        raise RegistryError(f"{name} has no {PREVIOUS}: nothing to roll back to")
    restored = client.get_model_version(name, aliases[PREVIOUS])
    result = _apply(name, restored, env, None, gitops_repo, "rollback")
    client.set_registered_model_alias(name, CHAMPION, restored.version)
    if CHAMPION in aliases:
        client.set_registered_model_alias(name, PREVIOUS, aliases[CHAMPION])
    return {**result, "replaced": aliases.get(CHAMPION)}

"""Promote a gated model version to an environment, or roll back, through the registry and GitOps.

    onevision promote llava-onevision-tiny --version 3 --env prod --canary 10 --gitops-repo ../gitops
    onevision rollback llava-onevision-tiny --env prod --gitops-repo ../gitops

Promote refuses a version whose evaluation gate failed, moves alias `champion` to it (the former champion
becomes `previous-champion`, the rollback target), and writes the endpoint's overlay as a commit on a new
branch of the GitOps repository (a local path or any git remote), ready for a pull request:

    infra/gitops/endpoints/<env>/<model>/inferenceservice.yaml   the exported InferenceService (our predictor)
    infra/gitops/endpoints/<env>/<model>/kustomization.yaml      patches: storage URI -> this version, canary

Argo CD (an ApplicationSet over infra/gitops/endpoints/*/*) syncs the merged overlay. Rollback swaps `champion` and
`previous-champion` and writes the overlay of the restored version the same way. `deploy` is the
pipeline's step for a non-production environment: the same overlay, alias named after the environment.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from components.register.core import CHAMPION, PREVIOUS, TAG_EXPORT, TAG_GATE, TAG_GATE_REASONS, RegistryError
from onevision import storage

OVERLAY_ROOT = Path("infra/gitops/endpoints")  # in the GitOps repository; infra/argocd's ApplicationSet reads it


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RegistryError(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def _exported_isvc(version: Any) -> dict[str, Any]:
    """The custom-predictor InferenceService from the version's export (its manifests/)."""
    export = version.tags.get(TAG_EXPORT)
    if not export:
        raise RegistryError(f"version {version.version} has no {TAG_EXPORT} tag: export it before promoting")
    files = [u for u in storage.list_uris(storage.join(export, "manifests")) if u.endswith(".yaml")]
    for uri in sorted(files):
        for obj in yaml.safe_load_all(storage.read_bytes(uri)):
            if obj and obj.get("kind") == "InferenceService" and "containers" in obj["spec"]["predictor"]:
                return obj
    raise RegistryError(f"{export}/manifests holds no InferenceService for the KServe predictor")


def overlay(isvc: dict[str, Any], storage_uri: str, canary: int | None, namespace: str) -> dict[str, str]:
    """{file name: content} of the endpoint overlay."""
    container = isvc["spec"]["predictor"]["containers"][0]
    env_index = next(i for i, e in enumerate(container["env"]) if e["name"] == "STORAGE_URI")
    patch = [{"op": "replace", "path": f"/spec/predictor/containers/0/env/{env_index}/value", "value": storage_uri}]
    if canary is not None:
        patch.append({"op": "add", "path": "/spec/predictor/canaryTrafficPercent", "value": canary})
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "namespace": namespace, "resources": ["inferenceservice.yaml"],
                     "patches": [{"target": {"kind": "InferenceService", "name": isvc["metadata"]["name"]},
                                  "patch": yaml.safe_dump(patch, sort_keys=False)}]}
    return {"inferenceservice.yaml": yaml.safe_dump(isvc, sort_keys=False),
            "kustomization.yaml": yaml.safe_dump(kustomization, sort_keys=False)}


def write_overlay(gitops_repo: str, name: str, env: str, files: dict[str, str], message: str, branch: str) -> str:
    """Commit the overlay on a new branch of the GitOps repository and push it; returns the commit."""
    pushed = subprocess.run(["git", "ls-remote", "--heads", gitops_repo, branch], capture_output=True, text=True)
    if pushed.returncode == 0 and pushed.stdout.strip():  # a retried step: this overlay is already up for review
        return pushed.stdout.split()[0]
    with tempfile.TemporaryDirectory(prefix="gitops-") as tmp:
        work = Path(tmp) / "repo"
        done = subprocess.run(["git", "clone", "--quiet", gitops_repo, str(work)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RegistryError(f"cannot clone the GitOps repository {gitops_repo}: {done.stderr.strip()}")
        _git(work, "checkout", "-q", "-b", branch)
        folder = work / OVERLAY_ROOT / env / name
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, content in files.items():
            (folder / file_name).write_text(content)
        _git(work, "add", "-A", str(folder))
        _git(work, "-c", "user.name=onevision", "-c", "user.email=onevision@localhost", "commit", "-q", "-m", message)
        _git(work, "push", "-q", "origin", branch)
        return _git(work, "rev-parse", "HEAD")


def _apply(name: str, version: Any, env: str, canary: int | None, gitops_repo: str, verb: str) -> dict[str, Any]:
    isvc = _exported_isvc(version)
    # the environment owns the namespace (the ApplicationSet deploys infra/gitops/endpoints/<env>/* to onevision-<env>)
    files = overlay(isvc, version.source, canary, f"onevision-{env}")
    branch = f"{verb}/{name}/{env}/v{version.version}"
    commit = write_overlay(gitops_repo, name, env, files, f"{verb} {name} v{version.version} to {env}"
                           + (f" (canary {canary}%)" if canary is not None else ""), branch)
    return {"name": name, "version": version.version, "env": env, "branch": branch, "commit": commit}


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

"""infra/README.md's "First deployment" walkthrough says what the shipped files do.

    .venv/bin/python -m pytest tests/unit/test_infra_walkthrough.py -q

An operator copies these commands onto a fresh cluster, so the walkthrough is checked against the artifacts it
installs: the steps in the order that works (Kueue's CRDs before the overlay that holds its queues), a
verification command in every step, every Secret the rendered overlay, the Trainer runtime and the compiled
pipelines read (name, namespace and keys) and no other, the pinned chart versions equal to the values files'
and the vendored schemas', and every object a verification command names present in what is rendered.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from onevision.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "infra/README.md"
KUBECTL = Path(sys.executable).parent / "kubectl"
STEPS = ["Terraform", "GPU operator", "Kueue", "platform overlay", "Argo CD", "first pipeline run",
         "first promotion"]


def walkthrough() -> str:
    text = README.read_text()
    start = text.index("## First deployment")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def steps() -> list[tuple[str, str]]:
    """[(heading, body)] of the walkthrough's numbered steps, in order."""
    parts = re.split(r"^### (\d+\. .+)$", walkthrough(), flags=re.M)
    return list(zip(parts[1::2], parts[2::2]))


def commands(text: str) -> str:
    """The shell in the fenced blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return "\n".join(blocks).replace("\\\n", " ")


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(ROOT / "infra/platform/overlays/prod")],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def secret_refs(obj: Any, namespace: str | None, found: set[tuple[str | None, str, str]]) -> None:
    """(namespace, Secret, key) for every secretKeyRef / kfp-kubernetes secretAsEnv under obj."""
    if isinstance(obj, dict):
        if "secretKeyRef" in obj:
            found.add((namespace, obj["secretKeyRef"]["name"], obj["secretKeyRef"]["key"]))
        if "keyToEnv" in obj and "secretName" in obj:
            found.update((namespace, obj["secretName"], k["secretKey"]) for k in obj["keyToEnv"])
        for value in obj.values():
            secret_refs(value, namespace, found)
    elif isinstance(obj, list):
        for value in obj:
            secret_refs(value, namespace, found)


def created_secrets() -> set[tuple[str, str, str]]:
    """(namespace, Secret, key) of every `kubectl -n NS create secret generic NAME --from-...=KEY=` line."""
    found = set()
    for line in commands(walkthrough()).splitlines():
        m = re.search(r"kubectl -n (\S+) +create secret generic (\S+)(.*)", line)
        if m:
            keys = re.findall(r"--from-(?:literal|file)=([^=\s]+)=", m.group(3))
            assert keys, f"no keys in: {line}"
            found.update((m.group(1), m.group(2), k) for k in keys)
    return found


def test_the_steps_come_in_an_order_that_works(rendered: list[dict[str, Any]]) -> None:
    headings = [h for h, _ in steps()]
    assert [int(h.split(".")[0]) for h in headings] == list(range(1, len(STEPS) + 1))
    for heading, name in zip(headings, STEPS):
        assert name.lower() in heading.lower(), (heading, name)
    # the overlay holds Kueue objects, which the API server rejects before Kueue's CRDs exist
    assert any(d["apiVersion"].startswith("kueue.x-k8s.io/") for d in rendered)
    text = commands(walkthrough())
    assert text.index("helm install kueue") < text.index("kubectl kustomize infra/platform/overlays/")
    # the Profile owns the pipeline namespace before the overlay applies it (the profile controller refuses
    # to adopt a namespace it did not create)
    assert text.index("kind: Profile") < text.index("kubectl kustomize infra/platform/overlays/")


def test_every_step_has_a_command_and_its_check() -> None:
    for heading, body in steps():
        shell = commands(body)
        assert shell.strip(), f"step {heading!r} has no command"
        assert "# ->" in shell or "-> " in body, f"step {heading!r} does not say what its check answers"


def test_the_secrets_are_exactly_those_the_platform_reads(rendered: list[dict[str, Any]]) -> None:
    read: set[tuple[str | None, str, str]] = set()
    for obj in rendered:
        # a ClusterTrainingRuntime is cluster-scoped; its TrainJobs run in the pipeline namespace
        namespace = obj["metadata"].get("namespace") or ("onevision" if obj["kind"] == "ClusterTrainingRuntime"
                                                          else None)
        secret_refs(obj, namespace, read)
    for compiled in sorted((ROOT / "pipelines/compiled").glob("*.yaml")):  # pipeline pods run in the profile
        for doc in yaml.safe_load_all(compiled.read_text()):
            secret_refs(doc, "onevision", read)
    gitops = yaml.safe_load_all((ROOT / "pipelines/compiled/tiny.yaml").read_text())
    mounted = {v["secretName"] for doc in gitops for e in (doc or {}).get("platforms", {}).get("kubernetes", {})
               .get("deploymentSpec", {}).get("executors", {}).values() for v in e.get("secretAsVolume", [])}
    assert mounted == {"onevision-gitops"}
    read.add(("onevision", "onevision-gitops", ".git-credentials"))  # git's credential store file, read by deploy
    assert None not in {ns for ns, _, _ in read}
    assert created_secrets() == read


def test_the_chart_versions_are_the_pinned_ones() -> None:
    text = commands(walkthrough())
    kueue = re.search(r"helm install kueue \S+ --version (\S+)", text).group(1)
    assert f"--version {kueue}" in (ROOT / "infra/kueue/values.yaml").read_text()
    for crd in (ROOT / "infra/schemas/kueue").glob("*.yaml"):
        assert f"version: v{kueue} (tag)" in crd.read_text(), crd.name
    operator = re.search(r"helm install --wait gpu-operator nvidia/gpu-operator .*?--version (\S+)", text).group(1)
    assert f"--version {operator}" in (ROOT / "infra/gpu-operator/values.yaml").read_text()


def test_the_paths_exist() -> None:
    for path in set(re.findall(r"\b((?:infra|recipes)/[\w./-]*[\w-])", walkthrough())):
        if "<" not in path and "gitops/endpoints" not in path:  # the GitOps repository's paths are not here
            assert (ROOT / path).exists(), path


def test_the_checked_objects_are_the_rendered_ones(rendered: list[dict[str, Any]]) -> None:
    text = commands(walkthrough())
    named = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in rendered}
    assert ("Job", "onevision-system", "minio-setup") in named and "job/minio-setup" in text
    assert ("Deployment", "onevision-system", "mlflow") in named and "deploy/mlflow" in text
    assert ("ServiceAccount", "onevision", "onevision-pipeline") in named
    assert "system:serviceaccount:onevision:onevision-pipeline" in text
    assert ("ClusterQueue", None, "onevision") in named and "get clusterqueue onevision" in text
    mlflow = next(d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    host = re.search(r"'Host': '([^']+)'", text).group(1)
    assert host in " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["args"] +
                            mlflow["spec"]["template"]["spec"]["containers"][0].get("command", []))

    # the first promotion: registered model, Argo CD Application and InferenceService names
    recipe = load_recipe(ROOT / "recipes/ov-0.5b.yaml")
    model = recipe.registered_model_name
    assert f"onevision promote {model} " in text
    appset = yaml.safe_load((ROOT / "infra/argocd/applicationset.yaml").read_text())
    app = (appset["spec"]["template"]["metadata"]["name"]
           .replace("{{path.basename}}", model).replace("{{path[3]}}", "prod"))
    assert f"get application {app}" in text
    objects = [o for f in sorted((ROOT / "infra/serving/ov-0.5b").glob("*.yaml"))
               for o in yaml.safe_load_all(f.read_text()) if o]
    isvc = next(o for o in objects if o["kind"] == "InferenceService" and "containers" in o["spec"]["predictor"])
    assert f"get inferenceservice {isvc['metadata']['name']} " in text

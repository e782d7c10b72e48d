"""Serving manifests: the committed templates under infra/serving are what the generator renders, every
field checks against the KServe/Kubernetes SDK models (from the CRDs' OpenAPI), the ServiceAccount
passes `kubernetes-validate --strict`, and no credential value appears anywhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from onevision.recipe import load_recipe
from serving.manifests import check_manifest, render

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("tiny", "ov-0.5b", "ov-7b", "ov-72b")


def rendered(name: str) -> dict[str, list[dict]]:
    return render(load_recipe(ROOT / f"recipes/{name}.yaml"), f"s3://onevision/models/{name}/hf",
                  f"s3://onevision/models/{name}/triton")


@pytest.mark.parametrize("name", RECIPES)
def test_committed_templates_match_the_generator(name: str) -> None:
    folder = ROOT / "infra/serving" / name
    committed = {p.name: list(yaml.safe_load_all(p.read_text())) for p in folder.glob("*.yaml")}
    assert committed == rendered(name), f"regenerate: python -m serving.manifests --recipe recipes/{name}.yaml ..."
    for objects in committed.values():
        for obj in objects:
            assert check_manifest(obj) == [], obj["metadata"]["name"]


def test_variants_carry_gpu_canary_runtime_and_storage() -> None:
    files = rendered("ov-0.5b")
    predictor = files["ov-0-5b.yaml"][0]["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 10 and predictor["serviceAccountName"] == "onevision-serving"
    container = predictor["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "STORAGE_URI", "value": "s3://onevision/models/ov-0.5b/hf"} in container["env"]
    runtime, triton = files["ov-0-5b-triton.yaml"]
    assert runtime["kind"] == "ServingRuntime" and triton["spec"]["predictor"]["model"]["runtime"] == "onevision-triton"
    assert triton["spec"]["predictor"]["model"]["storageUri"] == "s3://onevision/models/ov-0.5b/triton"
    vllm = files["ov-0-5b-vllm.yaml"][0]["spec"]["predictor"]["model"]
    assert vllm["modelFormat"]["name"] == "huggingface" and "--backend=vllm" in vllm["args"]
    cpu = rendered("tiny")["tiny-ov.yaml"][0]["spec"]["predictor"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"]


def test_the_checker_rejects_misspelt_and_mistyped_fields() -> None:
    isvc = rendered("tiny")["tiny-ov.yaml"][0]
    bad = yaml.safe_load(yaml.safe_dump(isvc))
    bad["spec"]["predictor"]["minReplica"] = 1
    bad["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    errors = check_manifest(bad)
    assert any("minReplica: not a field of V1beta1PredictorSpec" in e for e in errors)
    assert any("containerPort: expected int" in e for e in errors)


def test_service_account_is_valid_kubernetes(tmp_path: Path) -> None:
    path = tmp_path / "sa.yaml"
    path.write_text(yaml.safe_dump(rendered("tiny")["serviceaccount-onevision-dev.yaml"][0]))
    done = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_credential_values_in_manifests() -> None:
    text = "\n".join(p.read_text() for p in (ROOT / "infra/serving").rglob("*.yaml"))
    assert not re.search(r"(?i)(secret_?key|password|aws_access_key_id|AKIA[0-9A-Z]{16}|token:)", text)
    assert "secrets:\n- name: onevision-s3-serving" in text  # the Secret is referenced by name only

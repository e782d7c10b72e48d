"""Register -> promote -> rollback against the real MLflow server and a local git repository: the gate
decides `candidate`, promote refuses a failed version, champion/previous-champion move, and each overlay
(committed on its own branch) builds with `kubectl kustomize` into a valid InferenceService with its
ServiceAccount, ExternalSecret and NetworkPolicy. Traffic: the first deployment and a rollback take 100% at
once (no canaryTrafficPercent); a promotion over a deployed (merged) endpoint is a canary."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.export.core import run as export
from components.register.core import CANDIDATE, CHAMPION, PREVIOUS, TAG_GATE, RegistryError, register
from components.register.promote import promote, rollback
from onevision import storage, tracking
from onevision.recipe import dump_recipe
from serving.manifests import check_manifest

KUBECTL = str(Path(sys.executable).parent / "kubectl")


def publish_evaluation(uri: str, model_uri: str, score: float, threshold: float) -> None:
    """The evaluate step's published layout (components/evaluate/core.py) for one gated score."""
    from components.evaluate.core import gate
    from onevision.recipe import EvalTask

    tasks = [EvalTask(name="shapes_color", metric="exact_match", threshold=threshold)]
    verdict = gate({"shapes_color/exact_match": score}, tasks, None)
    files = {"gate.json": json.dumps(verdict), "comparison.md": "# Evaluation\n\n| task | ours |\n|---|---|\n"
             f"| shapes_color | {score} |\n"}
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            Path(folder, name).write_text(text)
        storage.publish_dir(folder, uri, metadata={"model": model_uri, "gate_passed": verdict["passed"],
                                                   "shapes_color/exact_match": score})


@pytest.fixture(scope="module")
def versions(local_stack, tmp_path_factory: pytest.TempPathFactory, tiny_recipe) -> dict:
    from model.builder import build_tiny

    tmp = tmp_path_factory.mktemp("registry")
    name = f"it-reg-{uuid.uuid4().hex[:6]}"
    doc = yaml.safe_load(dump_recipe(tiny_recipe))
    doc["evaluation"]["registered_model"] = name
    prefix = f"s3://onevision/{name}"
    storage.write_bytes(f"{prefix}/recipe.yaml", yaml.safe_dump(doc).encode())
    recipe = f"{prefix}/recipe.yaml"
    model, processor = build_tiny(tiny_recipe)
    model.save_pretrained(tmp / "hf")
    processor.save_pretrained(tmp / "hf")
    out = {"name": name}
    for label, score in (("good", 0.9), ("bad", 0.1), ("better", 0.95)):
        hf = f"{prefix}/{label}/hf"
        storage.publish_dir(tmp / "hf", hf)
        publish_evaluation(f"{prefix}/{label}/evaluate", hf, score, threshold=0.5)
        export(recipe, hf, f"{prefix}/{label}/export")
        out[label] = register(recipe, hf, f"{prefix}/{label}/evaluate", f"run-{label}",
                              export_uri=f"{prefix}/{label}/export", checkpoints={"stage2_ov": hf})
        out[f"{label}_hf"] = hf
    return out


def test_register_tags_card_and_candidate(versions: dict) -> None:
    client = MlflowClient()
    good = client.get_model_version(versions["name"], versions["good"]["version"])
    assert tracking.weights_uri(good) == versions["good_hf"]  # referenced in S3, not re-uploaded
    assert good.source != versions["good_hf"] and good.run_id  # the source is the pyfunc of the register run
    assert good.tags[TAG_GATE] == "true" and good.tags["onevision.eval.shapes_color.exact_match"] == "0.9"
    assert good.tags[tracking.TAG_PIPELINE_RUN] == "run-good" and good.tags[tracking.TAG_RECIPE_HASH]
    assert good.tags["onevision.checkpoint.stage2_ov"] == versions["good_hf"]
    assert "## Evaluation" in good.description and "## Known limits" in good.description
    bad = client.get_model_version(versions["name"], versions["bad"]["version"])
    assert bad.tags[TAG_GATE] == "false" and "below the threshold" in bad.tags["onevision.gate_reasons"]
    assert not versions["bad"]["candidate"] and versions["good"]["candidate"]
    # `candidate` follows the latest version that passed, never a failed one
    assert client.get_registered_model(versions["name"]).aliases[CANDIDATE] == versions["better"]["version"]


def _build_overlay(repo: Path, branch: str, env: str, name: str, tmp: Path) -> dict:
    work = tmp / f"checkout-{uuid.uuid4().hex[:6]}"
    subprocess.run(["git", "clone", "-q", "-b", branch, str(repo), str(work)], check=True)
    built = subprocess.run([KUBECTL, "kustomize", str(work / "infra/gitops/endpoints" / env / name)], capture_output=True,
                           text=True, check=True).stdout
    objects = [o for o in yaml.safe_load_all(built) if o]
    assert sorted(o["kind"] for o in objects) == ["ExternalSecret", "InferenceService", "NetworkPolicy", "ServiceAccount"]
    assert {o["metadata"]["namespace"] for o in objects} == {f"onevision-{env}"}
    (isvc,) = [o for o in objects if o["kind"] == "InferenceService"]
    assert check_manifest(isvc) == []
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    assert isvc["spec"]["predictor"]["serviceAccountName"] == account["metadata"]["name"]
    return isvc


def _merge(repo: Path, branch: str) -> None:
    """The pull request merged: the default branch (what Argo CD syncs) moves to the branch's commit."""
    default = subprocess.run(["git", "--git-dir", str(repo), "symbolic-ref", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
    subprocess.run(["git", "--git-dir", str(repo), "update-ref", default, f"refs/heads/{branch}"], check=True)


def test_promote_refuses_failed_gate_then_promotes_and_rolls_back(versions: dict, tmp_path: Path) -> None:
    repo = tmp_path / "gitops.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    name, client = versions["name"], MlflowClient()

    with pytest.raises(RegistryError, match="did not pass the evaluation gate"):
        promote(name, versions["bad"]["version"], "prod", str(repo))
    assert CHAMPION not in client.get_registered_model(name).aliases

    first = promote(name, versions["good"]["version"], "prod", str(repo), canary=5)
    assert first["first_deployment"] is True and first["canary"] is None  # no previous revision to share with
    isvc = _build_overlay(repo, first["branch"], "prod", name, tmp_path)
    env = isvc["spec"]["predictor"]["containers"][0]["env"]
    assert {"name": "STORAGE_URI", "value": versions["good_hf"]} in env
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    _merge(repo, first["branch"])

    second = promote(name, versions["better"]["version"], "prod", str(repo))
    aliases = client.get_registered_model(name).aliases
    assert (aliases[CHAMPION], aliases[PREVIOUS]) == (versions["better"]["version"], versions["good"]["version"])
    assert second["previous_champion"] == versions["good"]["version"]
    assert (second["first_deployment"], second["canary"]) == (False, 20)  # the recipe's canary_percent
    canary = _build_overlay(repo, second["branch"], "prod", name, tmp_path)
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 20
    _merge(repo, second["branch"])

    back = rollback(name, "prod", str(repo))
    aliases = client.get_registered_model(name).aliases
    assert (aliases[CHAMPION], aliases[PREVIOUS]) == (versions["good"]["version"], versions["better"]["version"])
    assert (back["first_deployment"], back["canary"]) == (False, None)
    restored = _build_overlay(repo, back["branch"], "prod", name, tmp_path)
    assert {"name": "STORAGE_URI", "value": versions["good_hf"]} in restored["spec"]["predictor"]["containers"][0]["env"]
    assert "canaryTrafficPercent" not in restored["spec"]["predictor"]  # 100% to the restored version at once
    branches = subprocess.run(["git", "-C", str(repo), "branch", "--list"], capture_output=True, text=True).stdout
    assert first["branch"] in branches and back["branch"] in branches  # one reviewable branch each


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_register_and_deploy_components_under_kfp_local(versions: dict, kfp_local: Path, tmp_path: Path) -> None:
    from components.register.component import deploy_endpoint, register_model

    name, client = versions["name"], MlflowClient()
    prefix = f"s3://onevision/{name}"
    task = register_model(recipe_uri=f"{prefix}/recipe.yaml", model_uri=versions["good_hf"],
                          evaluation_uri=f"{prefix}/good/evaluate", export_uri=f"{prefix}/good/export",
                          pipeline_run_id="kfp-run")
    assert task.outputs["candidate"] is True and task.outputs["name"] == name
    assert "## Lineage" in Path(task.outputs["model_card"].path).read_text()
    repo = tmp_path / "gitops.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    deployed = deploy_endpoint(name=name, version=task.outputs["version"], env="dev", gitops_repo=str(repo),
                               canary_percent=0)
    assert client.get_registered_model(name).aliases["dev"] == task.outputs["version"]
    isvc = _build_overlay(repo, deployed.outputs["branch"], "dev", name, tmp_path)
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]  # a first deployment: all traffic
    from components.register.promote import deploy

    _merge(repo, deployed.outputs["branch"])
    again = deploy(name, versions["better"]["version"], "dev", str(repo))
    isvc = _build_overlay(repo, again["branch"], "dev", name, tmp_path)
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 20  # the recipe's, when the step sets none
    with pytest.raises(RegistryError, match="production"):
        deploy(name, task.outputs["version"], "prod", str(repo))


def test_register_components_compile(compiled_component) -> None:
    from components.register.component import deploy_endpoint, register_model

    assert "comp-register-model" in compiled_component(register_model)["components"]
    assert "comp-deploy-endpoint" in compiled_component(deploy_endpoint)["components"]


def test_version_loads_as_pyfunc_and_answers_a_chat(versions: dict, tmp_path: Path) -> None:
    """`mlflow.pyfunc.load_model("models:/<name>@candidate")`: its predict answers a chat request with an
    image, as the serving engine does over the same weights; the weights are not copied into MLflow."""
    import base64

    import mlflow
    from mlflow.models import Model

    import random

    from model.shapes_world import png_bytes, render, sample_scene
    from serving.engine import Engine
    from serving.requests import parse_chat_request

    name, client = versions["name"], MlflowClient()
    candidate = client.get_model_version_by_alias(name, CANDIDATE)  # (promotions elsewhere in this module move it)
    weights = tracking.weights_uri(candidate)
    assert weights in (versions["good_hf"], versions["better_hf"])
    local = Path(mlflow.artifacts.download_artifacts(candidate.source, dst_path=str(tmp_path / "pyfunc")))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".safetensors", ".bin", ".pt")]
    assert sum(p.stat().st_size for p in files) < 1 << 20  # code, MLmodel, example, requirements: no weights
    logged = Model.load(str(local))
    assert logged.flavors["python_function"]["config"]["weights_uri"] == weights
    assert logged.signature.inputs.input_names() == ["messages"]
    assert {p.name for p in logged.signature.params.params} == {"max_tokens", "temperature", "top_p", "seed"}
    example = logged.load_input_example(str(local))
    assert example["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")

    image = png_bytes(render(sample_scene(random.Random(0), color="blue")))
    chat = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
        {"type": "text", "text": "What colour is the shape?"}]}]}
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CANDIDATE}")
    (answer,) = model.predict(chat, params={"max_tokens": 6})
    assert answer["object"] == "chat.completion" and answer["model"] == name
    assert answer["choices"][0]["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"] <= 6
    engine = Engine.load(weights)
    (direct,) = engine.generate_batch([parse_chat_request({**chat, "max_tokens": 6}, engine.limits)])
    assert answer["choices"][0]["message"]["content"] == direct.text  # greedy: the same answer as the engine
    assert [a["choices"][0]["message"]["content"] for a in model.predict([chat, chat], params={"max_tokens": 6})] \
        == [direct.text] * 2  # a list of requests: one answer each
    with pytest.raises(Exception, match="messages"):
        model.predict({"messages": []})

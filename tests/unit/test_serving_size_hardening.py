"""Serving at real size and hardened (issue 20, points 7 and 12): the memory estimate counts exactly the
parameters of the model the recipe composes, the shipped endpoints fit and an undersized one is refused,
vLLM's tensor parallel size is the GPUs asked for, Triton runs one instance over all the GPUs, our
predictor picks CUDA/bf16 when it has GPUs (and really serves fp32 and bf16 on a CPU), and every
rendered serving container is non-root, unprivileged, seccomp'd and probed on routes its server
answers without a token."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.routing import Match

from onevision.recipe import load_recipe
from serving import manifests, placement, sizing
from serving.auth import OPEN_PATHS
from serving.manifests import render
from serving.sizing import EndpointTooSmall, check_fits, endpoint_memory, model_params
from serving.triton_repo import build_model_repository, instance_kind_for

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("tiny", "ov-0.5b", "ov-7b", "ov-72b")


def rendered(name: str, recipe: Any = None) -> dict[str, list[dict]]:
    return render(recipe or load_recipe(ROOT / f"recipes/{name}.yaml"), f"s3://onevision/models/{name}/hf",
                  f"s3://onevision/models/{name}/triton")


def with_deploy(name: str, **update: Any) -> Any:
    """The recipe with every deploy target changed by `update`."""
    recipe = load_recipe(ROOT / f"recipes/{name}.yaml")
    return recipe.model_copy(update={"deploy": [t.model_copy(update=update) for t in recipe.deploy]})


# ---- point 7: memory ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RECIPES)
def test_parameter_count_is_the_composed_models(name: str) -> None:
    """The closed-form count equals the parameters of LlavaOnevisionForConditionalGeneration built (on
    the meta device: no memory) from the same shapes, as model.builder composes it."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    recipe = load_recipe(ROOT / f"recipes/{name}.yaml")
    v, t = sizing.model_shapes(recipe)
    vision = SiglipVisionConfig(vision_use_head=False, **{k: v[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")})
    text = Qwen2Config(tie_word_embeddings=False, **{k: t[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads")})
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, tie_word_embeddings=False,
                                  projector_hidden_act="gelu", vision_feature_select_strategy="full")
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    assert model_params(recipe) == sum(p.numel() for p in model.parameters())


def test_shipped_72b_endpoints_fit_on_four_80gb_gpus() -> None:
    recipe = load_recipe(ROOT / "recipes/ov-72b.yaml")
    assert 72e9 < model_params(recipe) < 74e9  # Qwen2-72B + SigLIP-so400m + projector
    for target in recipe.deploy:
        estimate = check_fits(recipe, target)
        assert target.gpus == 4 and target.gpu_memory_gb == 80
        assert 140e9 < estimate.weights < 150e9  # bf16: ~146 GB of weights
        assert estimate.kv_cache > 0 and estimate.need <= estimate.capacity == 4 * 80 * sizing.GIB * 0.9
    for name in RECIPES:  # and every shipped endpoint renders (render raises on any that cannot fit)
        assert rendered(name)


@pytest.mark.parametrize("gpus", [1, 2])
def test_an_undersized_72b_endpoint_is_refused(gpus: int) -> None:
    with pytest.raises(EndpointTooSmall) as refused:
        rendered("ov-72b", with_deploy("ov-72b", gpus=gpus))
    message = str(refused.value)
    assert "'ov-72b'" in message and f"{gpus} x 80 GiB GPU" in message
    need, capacity = (float(x) for x in re.search(r"needs ([\d.]+) GiB.*capacity ([\d.]+) GiB", message).groups())
    assert need > capacity == pytest.approx(gpus * 80 * 0.9, abs=0.1)
    # The per-GPU memory is the target's: two 141 GB H200s hold what two H100s cannot.
    assert rendered("ov-72b", with_deploy("ov-72b", gpus=2, gpu_memory_gb=141))


def test_cpu_endpoints_are_checked_against_their_memory_limit() -> None:
    tiny = load_recipe(ROOT / "recipes/tiny.yaml")
    assert endpoint_memory(tiny, tiny.deploy[0]).weights == model_params(tiny) * 4  # fp32 on a CPU
    with pytest.raises(EndpointTooSmall, match=r"'ov-7b'.*CPU, memory limit 4 GiB"):
        rendered("ov-7b", with_deploy("ov-7b", gpus=0))


# ---- point 7: placement of each runtime ------------------------------------------------------------
@pytest.mark.parametrize("name", RECIPES)
def test_vllm_tensor_parallel_size_is_the_gpus_asked_for(name: str) -> None:
    for objects in rendered(name).values():
        for obj in objects:
            model = obj.get("spec", {}).get("predictor", {}).get("model", {})
            if model.get("modelFormat", {}).get("name") != "huggingface":
                continue
            gpus = int(model["resources"]["limits"]["nvidia.com/gpu"])
            assert [a for a in model["args"] if a.startswith("--tensor-parallel-size")] == \
                [f"--tensor-parallel-size={gpus}"]
            shm = [m for m in model.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert bool(shm) == (gpus > 1)  # NCCL between the tensor-parallel workers needs a real /dev/shm
            if shm:
                volumes = {v["name"]: v for v in obj["spec"]["predictor"]["volumes"]}
                assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"


def test_triton_runs_one_instance_over_all_gpus(tmp_path: Path) -> None:
    assert instance_kind_for(4) == instance_kind_for(1) == "KIND_MODEL" and instance_kind_for(0) == "KIND_CPU"
    folder = build_model_repository("s3://onevision/models/ov-72b/hf", tmp_path, name="ov-72b-triton",
                                    instance_kind=instance_kind_for(4))
    group = re.search(r"instance_group \[(.*?)\n\]", (folder / "config.pbtxt").read_text(), re.S).group(1)
    assert re.search(r"count: 1\b", group) and re.search(r"kind: KIND_MODEL\b", group) and "KIND_GPU" not in group


def test_export_asks_triton_for_one_instance_over_the_targets_gpus(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from components.export import core
    from serving import triton_repo

    asked: dict[str, Any] = {}

    def fake_build(model_uri: str, out_dir: Path, **kwargs: Any) -> Path:
        asked.update(kwargs)
        Path(out_dir, kwargs["name"]).mkdir(parents=True)
        return Path(out_dir, kwargs["name"])

    monkeypatch.setattr(triton_repo, "build_model_repository", fake_build)
    core.run(str(ROOT / "recipes/ov-72b.yaml"), "s3://onevision/models/ov-72b/hf", str(tmp_path / "export"))
    assert asked["instance_kind"] == "KIND_MODEL" and asked["name"] == "ov-72b-triton"


def test_choose_placement() -> None:
    assert placement.choose_placement(False, 0) == (None, torch.float32)
    assert placement.choose_placement(False, 4) == (None, torch.float32)  # GPUs that CUDA cannot use
    assert placement.choose_placement(True, 0) == (None, torch.float32)
    assert placement.choose_placement(True, 1) == ("cuda", torch.bfloat16)
    assert placement.choose_placement(True, 4) == ("auto", torch.bfloat16)
    assert placement.choose_placement(True, 4, bf16_supported=False) == ("auto", torch.float16)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.builder import build_tiny

    model, processor = build_tiny(load_recipe(ROOT / "recipes/tiny.yaml"))
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_engine_load_asks_for_the_gpus_it_sees(tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4-GPU pod (CUDA faked at torch.cuda): the weights are loaded with device_map="auto" in bf16."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from serving.engine import Engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    real = LlavaOnevisionForConditionalGeneration.from_pretrained.__func__
    asked: dict[str, Any] = {}

    def spy(cls: Any, path: str, **kwargs: Any) -> Any:
        asked.update(kwargs)
        return real(cls, path, dtype=kwargs["dtype"])  # loaded on the CPU: this machine has no GPU

    monkeypatch.setattr(LlavaOnevisionForConditionalGeneration, "from_pretrained", classmethod(spy))
    engine = Engine.load(str(tiny_folder))
    assert asked == {"device_map": "auto", "dtype": torch.bfloat16}
    assert next(engine.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_engine_serves_on_the_cpu(tiny_folder: Path, dtype: torch.dtype | None) -> None:
    """The real CPU path (no GPU here: fp32), and the bf16 weights a GPU gets, answering a request."""
    from serving.engine import Engine
    from serving.requests import Limits, parse_chat_request

    engine = Engine.load(str(tiny_folder), dtype=dtype)
    weights = next(engine.model.parameters())
    assert weights.device.type == "cpu" and weights.dtype == (dtype or torch.float32)
    body = {"messages": [{"role": "user", "content": "What colour is the square?"}], "max_tokens": 4}
    [completion] = engine.generate_batch([parse_chat_request(body, Limits())])
    assert completion.completion_tokens >= 1


# ---- point 12: every serving container hardened and probed ------------------------------------------
def pod_containers(obj: dict) -> list[dict]:
    """The containers of the pods an object makes: a ServingRuntime's, an InferenceService predictor's
    own containers, or its `model` (merged by KServe into the runtime's container)."""
    if obj["kind"] == "ServingRuntime":
        return obj["spec"]["containers"]
    if obj["kind"] == "InferenceService":
        predictor = obj["spec"]["predictor"]
        return predictor.get("containers", []) + ([predictor["model"]] if "model" in predictor else [])
    return []


def image_uid(dockerfile: str) -> int:
    users = re.findall(r"^USER (\d+)", (ROOT / "infra/images" / dockerfile).read_text(), re.M)
    return int(users[-1].split(":")[0])


def kserve_routes_serve(path: str) -> bool:
    """Whether KServe's model server (ours and the HF runtime) has a GET route for `path`."""
    from fastapi import FastAPI
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    app = FastAPI()
    register_v1_endpoints(app, None, None)
    register_v2_endpoints(app, None, None)
    scope = {"type": "http", "path": path, "method": "GET", "root_path": ""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)


TRITON_ROUTES = ("/v2/health/ready", "/v2/health/live")  # tritonserver's HTTP health API


@pytest.mark.parametrize("name", RECIPES)
def test_every_serving_container_is_hardened_and_probed(name: str) -> None:
    uids = {manifests.PROJECT_IMAGE: image_uid("Dockerfile"), manifests.TRITON_IMAGE: image_uid("Dockerfile.triton")}
    seen = 0
    for objects in rendered(name).values():
        for obj in objects:
            for container in pod_containers(obj):
                seen += 1
                where = f"{name}/{obj['metadata']['name']}"
                sc = container["securityContext"]
                assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
                assert sc["runAsUser"] > 0 and "privileged" not in sc, where
                image = container.get("image")
                if image is None and obj["kind"] == "InferenceService":  # the runtime supplies the image
                    image = manifests.TRITON_IMAGE if container.get("runtime") == "onevision-triton" else "kserve-hf"
                assert sc["runAsUser"] == uids.get(image, manifests.HF_RUNTIME_UID), where  # the image's USER
                triton = image == manifests.TRITON_IMAGE
                for kind in ("readinessProbe", "livenessProbe"):
                    get = container[kind]["httpGet"]
                    assert get["port"] == manifests.PORT, where  # the serving port (Knative requires it)
                    assert get["path"] in TRITON_ROUTES if triton else kserve_routes_serve(get["path"]), (where, get)
                    assert OPEN_PATHS.match(get["path"]), (where, get)  # kubelet sends no bearer token
                assert container["readinessProbe"]["httpGet"]["path"] != "/v2/health/live", where
                assert container["livenessProbe"]["initialDelaySeconds"] >= 60, where  # the load takes time
    assert seen >= len(load_recipe(ROOT / f"recipes/{name}.yaml").deploy)


def test_liveness_waits_longer_for_a_bigger_model() -> None:
    delay = {name: rendered(name)[f"{load_recipe(ROOT / f'recipes/{name}.yaml').deploy[0].name}.yaml"][0]
             ["spec"]["predictor"]["containers"][0]["livenessProbe"]["initialDelaySeconds"]
             for name in ("tiny", "ov-7b", "ov-72b")}
    assert delay["tiny"] < delay["ov-7b"] < delay["ov-72b"] and delay["ov-72b"] >= 400

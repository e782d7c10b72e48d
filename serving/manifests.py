"""KServe manifests for a model version: what the export step writes and GitOps applies.

    python -m serving.manifests --recipe recipes/ov-0.5b.yaml --storage-uri s3://onevision/runs/r1/stage2_ov/hf \
        --triton-uri s3://onevision/runs/r1/export/triton --out infra/serving/ov-0.5b

One file per recipe `deploy:` target, plus the storage ServiceAccount:
  kserve      InferenceService with our predictor (serving.kserve_server on the project image; the
              storage initializer fetches STORAGE_URI into /mnt/models); GPU variant when `gpus` > 0
  triton      ServingRuntime `onevision-triton` (tritonserver + our Python backend, the project's Triton
              image) and an InferenceService over the Triton model repository in MinIO
  kserve-hf   InferenceService on KServe's Hugging Face runtime (vLLM) for GPU production, tensor
              parallel over every GPU it asks for (`--tensor-parallel-size`), /dev/shm in memory for NCCL
Every target must fit: serving.sizing estimates the memory its model needs (weights in the serving dtype,
KV cache for a full batch at full context, margins) and `render` refuses one whose GPUs (gpus x
gpu_memory_gb) or CPU memory limit cannot hold it (EndpointTooSmall naming target, need and capacity).
Every serving container runs hardened (CONTAINER_SECURITY: non-root with the image's own uid, no
privilege escalation, no capabilities, RuntimeDefault seccomp; set on the container, where Knative
accepts it) with a readiness probe on the model's ready route and a liveness probe on the server's live
route, delayed by the time the model takes to load (load_allowance_s).
Storage credentials: a ServiceAccount carrying the `serving.kserve.io/s3-*` annotations and naming the
S3 Secret (`cluster.s3_secret`): referenced, never inlined. Autoscaling (min/max replicas, concurrency
target) and canary traffic come from the recipe. `check_manifest` validates every field name and type
against the KServe and Kubernetes Python SDKs' models (generated from the CRDs' OpenAPI schemas).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import yaml
import sys

from onevision import PROJECT_IMAGE
from onevision.recipe import DeployTarget, Recipe, load_recipe
from serving.sizing import CPU_MEMORY_LIMIT_GIB, GIB, MemoryEstimate, check_fits
from onevision.cli_exit import run_command

TRITON_IMAGE = PROJECT_IMAGE.replace("/platform:", "/platform-triton:")  # infra/images/Dockerfile.triton
SERVICE_ACCOUNT = "onevision-serving"
# The non-root users the images declare (USER): infra/images/Dockerfile and Dockerfile.triton 10001,
# KServe's huggingfaceserver image 1000. Named here too, so the kubelet can verify runAsNonRoot.
PROJECT_UID, HF_RUNTIME_UID = 10001, 1000
PORT = 8080  # every serving container's HTTP port (Knative probes must target the serving port)


def service_account(recipe: Recipe, namespace: str, s3_endpoint: str = "minio.onevision-system.svc:9000") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": SERVICE_ACCOUNT, "namespace": namespace, "annotations": {
                "serving.kserve.io/s3-endpoint": s3_endpoint, "serving.kserve.io/s3-usehttps": "0",
                "serving.kserve.io/s3-region": "us-east-1", "serving.kserve.io/s3-useanoncredential": "false"}},
            "secrets": [{"name": recipe.cluster.serving_s3_secret}]}


def _resources(target: DeployTarget) -> dict[str, Any]:
    if target.gpus:
        return {"requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": str(target.gpus)},
                "limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": str(target.gpus)}}
    return {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": f"{CPU_MEMORY_LIMIT_GIB:g}Gi"}}


def container_security(uid: int) -> dict[str, Any]:
    """Restricted Pod Security Standard, on the container (Knative takes no pod-level securityContext by default)."""
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def load_allowance_s(estimate: MemoryEstimate) -> int:
    """Seconds before liveness counts: every server opens its port only after loading the model (ours,
    tritonserver, KServe's HF server), which reads the weights from the storage initializer's volume.
    60 s for the runtime plus 3 s per GiB of weights (about 350 MB/s, a network disk): 72B bf16 ~ 8 min."""
    return int(60 + 3 * estimate.weights / GIB)


def probes(ready_path: str, estimate: MemoryEstimate) -> dict[str, Any]:
    """Readiness on the model's ready route (503 while loading), liveness on the server's live route."""
    return {"readinessProbe": {"httpGet": {"path": ready_path, "port": PORT}, "periodSeconds": 10,
                               "timeoutSeconds": 5, "failureThreshold": 3},
            "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": PORT},
                              "initialDelaySeconds": load_allowance_s(estimate), "periodSeconds": 30,
                              "timeoutSeconds": 10, "failureThreshold": 5}}


SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}
SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}  # NCCL between vLLM's tensor-parallel workers


def _metadata(target: DeployTarget, recipe: Recipe) -> dict[str, Any]:
    return {"name": target.name, "namespace": target.namespace,
            "labels": {"app.kubernetes.io/part-of": "onevision", "onevision/recipe": recipe.name},
            "annotations": {"serving.kserve.io/enable-prometheus-scraping": "true"}}


def _predictor_common(target: DeployTarget) -> dict[str, Any]:
    spec: dict[str, Any] = {"serviceAccountName": SERVICE_ACCOUNT, "minReplicas": 1, "maxReplicas": 4,
                            "scaleMetric": "concurrency", "scaleTarget": target.max_batch_size}
    if target.canary_percent:
        spec["canaryTrafficPercent"] = target.canary_percent
    if target.gpus:  # the GPU pool (infra/terraform): tainted nvidia.com/gpu, labelled onevision/pool=gpu
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        spec["nodeSelector"] = {"onevision/pool": "gpu"}
        spec["priorityClassName"] = "onevision-serving"
    return spec


def kserve_predictor(target: DeployTarget, recipe: Recipe, storage_uri: str) -> dict[str, Any]:
    # serving.kserve_server places the model itself (serving.placement): bf16 on the GPUs, spread with
    # device_map="auto" over several; KServe's v1 model route answers 503 until it is loaded.
    container = {"name": "kserve-container", "image": PROJECT_IMAGE,
                 "command": ["python", "-m", "serving.kserve_server"],
                 "args": ["--model", "/mnt/models", "--port", str(PORT), "--host", "0.0.0.0",
                          "--name", target.name, "--max-batch-size", str(target.max_batch_size)],
                 "env": [{"name": "STORAGE_URI", "value": storage_uri}],  # triggers the storage initializer
                 "ports": [{"containerPort": PORT, "protocol": "TCP"}],
                 **probes(f"/v1/models/{target.name}", check_fits(recipe, target)),
                 "securityContext": container_security(PROJECT_UID),
                 "resources": _resources(target)}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": _metadata(target, recipe),
            "spec": {"predictor": {**_predictor_common(target), "containers": [container]}}}


def triton_runtime(target: DeployTarget, recipe: Recipe) -> dict[str, Any]:
    # Triton's own health routes on its HTTP port; the InferenceService repeats them with its own size.
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
            "metadata": {"name": "onevision-triton", "namespace": target.namespace},
            "spec": {"supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": True}],
                     "protocolVersions": ["v2"],
                     "containers": [{"name": "kserve-container", "image": TRITON_IMAGE,
                                     "args": ["tritonserver", "--model-repository=/mnt/models",
                                              f"--http-port={PORT}", "--grpc-port=9000", "--allow-metrics=true"],
                                     "ports": [{"containerPort": PORT, "protocol": "TCP"}],
                                     **probes("/v2/health/ready", check_fits(recipe, target)),
                                     "securityContext": container_security(PROJECT_UID),
                                     "resources": _resources(target)}]}}


def triton_service(target: DeployTarget, recipe: Recipe, repository_uri: str) -> dict[str, Any]:
    # The repository's config.pbtxt (serving.triton_repo.instance_kind_for) asks for one KIND_MODEL
    # instance: one copy of the model over all the GPUs, not one per GPU.
    model = {"modelFormat": {"name": "triton"}, "runtime": "onevision-triton", "storageUri": repository_uri,
             "protocolVersion": "v2", **probes("/v2/health/ready", check_fits(recipe, target)),
             "securityContext": container_security(PROJECT_UID), "resources": _resources(target)}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": _metadata(target, recipe),
            "spec": {"predictor": {**_predictor_common(target), "model": model}}}


def hf_service(target: DeployTarget, recipe: Recipe, storage_uri: str) -> dict[str, Any]:
    # vLLM always runs on GPUs: a target without any gets one. KServe's HF server hands the vLLM engine
    # arguments through (`--tensor-parallel-size`); without it vLLM uses one GPU whatever the pod has.
    target = target.model_copy(update={"gpus": max(1, target.gpus)})
    model: dict[str, Any] = {
        "modelFormat": {"name": "huggingface"}, "storageUri": storage_uri,
        "args": [f"--model_name={target.name}", "--backend=vllm", "--dtype=bfloat16",
                 f"--tensor-parallel-size={target.gpus}"],
        **probes(f"/v1/models/{target.name}", check_fits(recipe, target)),
        "securityContext": container_security(HF_RUNTIME_UID),
        "resources": _resources(target)}
    predictor = {**_predictor_common(target), "model": model}
    if target.gpus > 1:
        model["volumeMounts"] = [SHM_MOUNT]
        predictor["volumes"] = [SHM_VOLUME]
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": _metadata(target, recipe),
            "spec": {"predictor": predictor}}


def render(recipe: Recipe, storage_uri: str, triton_uri: str) -> dict[str, list[dict[str, Any]]]:
    """{file name: [objects]} for every deploy target of the recipe (plus the ServiceAccount).
    EndpointTooSmall (serving.sizing) when a target cannot hold the model."""
    files: dict[str, list[dict[str, Any]]] = {}
    for namespace in sorted({t.namespace for t in recipe.deploy}):
        files[f"serviceaccount-{namespace}.yaml"] = [service_account(recipe, namespace)]
    for target in recipe.deploy:
        if target.kind == "kserve":
            files[f"{target.name}.yaml"] = [kserve_predictor(target, recipe, storage_uri)]
        elif target.kind == "triton":
            files[f"{target.name}.yaml"] = [triton_runtime(target, recipe), triton_service(target, recipe, triton_uri)]
        else:
            files[f"{target.name}.yaml"] = [hf_service(target, recipe, storage_uri)]
    return files


# ---- validation against the SDK models (generated from the CRDs' OpenAPI) -----------------------------
_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
               "ResourceQuantity": (str, int, float), "datetime": str}


def _model_class(name: str) -> Any:
    import kserve
    from kubernetes import client

    return getattr(kserve, name, None) or getattr(client, name, None)


def _check(value: Any, type_name: str, path: str, errors: list[str]) -> None:
    if type_name.startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list")
            return
        for i, item in enumerate(value):
            _check(item, type_name[5:-1], f"{path}[{i}]", errors)
    elif type_name.startswith("dict("):
        inner = re.match(r"dict\(str, (.+)\)$", type_name).group(1)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping")
            return
        for key, item in value.items():
            _check(item, inner, f"{path}.{key}", errors)
    elif type_name in _PRIMITIVES:
        if not isinstance(value, _PRIMITIVES[type_name]) or (type_name == "int" and isinstance(value, bool)):
            errors.append(f"{path}: expected {type_name}, got {type(value).__name__}")
    else:
        cls = _model_class(type_name)
        if cls is None:
            errors.append(f"{path}: unknown type {type_name}")
            return
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a {type_name} object")
            return
        fields = {json_name: attr for attr, json_name in cls.attribute_map.items()}
        for key, item in value.items():
            if key not in fields:
                errors.append(f"{path}.{key}: not a field of {type_name}")
            else:
                _check(item, cls.openapi_types[fields[key]], f"{path}.{key}", errors)


def check_manifest(obj: dict[str, Any]) -> list[str]:
    """Every field name and type checked against the SDK model of its kind; [] when valid."""
    kinds = {("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
             ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
             ("v1", "ServiceAccount"): "V1ServiceAccount"}
    model = kinds.get((obj.get("apiVersion"), obj.get("kind")))
    if model is None:
        return [f"unknown apiVersion/kind {obj.get('apiVersion')}/{obj.get('kind')}"]
    errors: list[str] = []
    _check(obj, model, obj["kind"], errors)
    return errors


def write(files: dict[str, list[dict[str, Any]]], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, objects in files.items():
        for obj in objects:
            errors = check_manifest(obj)
            if errors:
                raise ValueError(f"{name}: invalid {obj['kind']}: {errors}")
        (out / name).write_text(yaml.safe_dump_all(objects, sort_keys=False))
        paths.append(out / name)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--storage-uri", required=True, help="the merged HF folder (s3://)")
    parser.add_argument("--triton-uri", required=True, help="the Triton model repository (s3://)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for path in write(render(load_recipe(args.recipe), args.storage_uri, args.triton_uri), args.out):
        print(path)


if __name__ == "__main__":
    sys.exit(run_command("manifests", main))

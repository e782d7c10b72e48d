"""Custom resources of the platform, checked against real schemas offline.

- Kubeflow Trainer: the ClusterTrainingRuntime of every platform overlay, field by field against the
  `kubeflow_trainer_api` 2.3.0 models (generated from the Trainer CRDs' OpenAPI). Their `from_dict` ignores
  unknown keys, so a strict walker checks every key against the model's fields, recursing through nested
  models, lists and maps by the field annotations; `from_dict` then runs the models' own validators (enums).
- Argo CD: the ApplicationSet and AppProject of infra/argocd against the CRD schemas vendored under
  infra/schemas/argocd (the AppProject CRD whole; the ApplicationSet CRD as an extract holding the document
  head, spec.generators[].git, spec.template and the rest of spec), with jsonschema; unknown fields are
  rejected, as the API server's strict field validation would.
"""

from __future__ import annotations

import copy
import datetime
import fnmatch
import json
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubeflow_trainer_api import models as trainer_api
from pydantic import BaseModel

from components import PROJECT_IMAGE

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAYS = sorted(p.name for p in (ROOT / "infra/platform/overlays").iterdir())
SCHEMAS = ROOT / "infra/schemas/argocd"
RUNTIME = "onevision-torchrun-deepspeed"


def kustomize(folder: Path) -> list[dict[str, Any]]:
    done = subprocess.run([str(BIN / "kubectl"), "kustomize", str(folder)], capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def platform(overlay: str) -> list[dict[str, Any]]:
    return kustomize(ROOT / "infra/platform/overlays" / overlay)


def the(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


# --- strict checker over the kubeflow_trainer_api models ---------------------------------------------------

def _fields(cls: type[BaseModel]) -> dict[str, str]:
    """{JSON name: attribute} of a generated model; its __properties list is the OpenAPI property list."""
    by_json = {(info.alias or attr): attr for attr, info in cls.model_fields.items()}
    declared = getattr(cls, f"_{cls.__name__}__properties", None)
    if declared is not None:
        assert set(declared) == set(by_json), cls.__name__
    return by_json


def _is_one_of(cls: type[BaseModel]) -> bool:
    return "actual_instance" in cls.model_fields  # oneOf wrappers: IntOrString, Quantity


_PRIMITIVE = {str: (str,), int: (int,), float: (int, float), bool: (bool,), bytes: (str,),
              datetime.datetime: (str, datetime.datetime)}


def strict_errors(value: Any, annotation: Any, path: str) -> list[str]:
    """Every key a field of its model, every value of its field's type; [] when valid."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return []
    if origin is typing.Annotated:
        return strict_errors(value, args[0], path)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None:
            return [] if len(options) < len(args) else [f"{path}: null not allowed"]
        if len(options) == 1:
            return strict_errors(value, options[0], path)
        if any(not strict_errors(value, option, path) for option in options):
            return []
        return [f"{path}: {value!r} is none of {options}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in strict_errors(item, args[0], f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {type(value).__name__}"]
        return [e for key, item in value.items()
                for e in ([f"{path}: key {key!r} is not a string"] if not isinstance(key, str) else [])
                + strict_errors(item, args[1], f"{path}.{key}")]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if _is_one_of(annotation):
            try:
                annotation.from_json(json.dumps(value))
            except (ValueError, TypeError) as error:
                return [f"{path}: not a valid {annotation.__name__}: {str(error).splitlines()[0]}"]
            return []
        if not isinstance(value, dict):
            return [f"{path}: expected a {annotation.__name__} object, got {type(value).__name__}"]
        fields = _fields(annotation)
        errors = [f"{path}.{name}: required by {annotation.__name__}" for name, attr in fields.items()
                  if annotation.model_fields[attr].is_required() and name not in value]
        for key, item in value.items():
            if key not in fields:
                errors.append(f"{path}.{key}: not a field of {annotation.__name__}")
            else:
                errors += strict_errors(item, annotation.model_fields[fields[key]].annotation, f"{path}.{key}")
        return errors
    if annotation in _PRIMITIVE:
        ok = isinstance(value, _PRIMITIVE[annotation]) and (annotation is bool or not isinstance(value, bool))
        return [] if ok else [f"{path}: expected {annotation.__name__}, got {type(value).__name__} {value!r}"]
    return [f"{path}: cannot check annotation {annotation!r}"]


TRAINER_KINDS = {("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): trainer_api.TrainerV1alpha1ClusterTrainingRuntime,
                 ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): trainer_api.TrainerV1alpha1TrainingRuntime,
                 ("trainer.kubeflow.org/v1alpha1", "TrainJob"): trainer_api.TrainerV1alpha1TrainJob}


def check_trainer(obj: dict[str, Any]) -> list[str]:
    """Strict walk, then the models' own validation (enums, oneOfs) through from_dict."""
    model = TRAINER_KINDS.get((obj.get("apiVersion"), obj.get("kind")))
    if model is None:
        return [f"unknown apiVersion/kind {obj.get('apiVersion')}/{obj.get('kind')}"]
    errors = strict_errors(obj, model, obj["kind"])
    if not errors:
        try:
            model.from_dict(obj)
        except ValueError as error:
            errors.append(f"{obj['kind']}: {error}")
    return errors


# --- Trainer runtime ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_runtime_matches_the_trainer_api_models_strictly(overlay: str) -> None:
    runtime = the(platform(overlay), "ClusterTrainingRuntime")
    assert runtime["metadata"]["name"] == RUNTIME
    assert check_trainer(runtime) == []


def _node(runtime: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    assert list(jobs) == ["node"]
    job = jobs["node"]["template"]
    return job, job["spec"]["template"]["spec"]


def test_runtime_runs_model_train_with_torchrun_on_the_gpu_pool() -> None:
    objects = platform("dev")
    runtime = the(objects, "ClusterTrainingRuntime")
    assert "namespace" not in runtime["metadata"]  # cluster-scoped
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    policy = runtime["spec"]["mlPolicy"]
    assert policy["torch"] == {} and "mpi" not in policy  # torchrun; processes per node default to `auto`
    job, pod = _node(runtime)
    assert job["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"  # ranks restart together
    assert runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] >= 1  # resumes from checkpoints
    (container,) = pod["containers"]
    assert container["name"] == "node" and container["image"] == PROJECT_IMAGE
    assert container["command"] == ["torchrun", "-m", "model.train"] and "args" not in container
    assert (ROOT / "model/train.py").is_file()
    env = {e["name"]: e for e in container["env"]}
    assert env["DS_ACCELERATOR"]["value"] == "cuda"
    assert any(name.startswith("NCCL_") for name in env)
    # S3 credentials: the pipeline's own MinIO user (read-write), under the key names KServe's storage initializer
    # reads (its credentials.s3 defaults); MinIO itself runs on its root credential, which no client holds.
    minio = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "minio")
    minio_refs = {e["valueFrom"]["secretKeyRef"]["key"]: e["valueFrom"]["secretKeyRef"]["name"]
                  for e in minio["spec"]["template"]["spec"]["containers"][0]["env"] if "valueFrom" in e}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "onevision-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "onevision-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert minio_refs == {"MINIO_ROOT_USER": "onevision-minio-root", "MINIO_ROOT_PASSWORD": "onevision-minio-root"}
    # GPU pool: the taint of the README's node pool, the pool's label.
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"onevision/pool": "gpu"}
    assert "nvidia.com/gpu" in container["resources"]["limits"]
    # NCCL's shared memory: a memory-backed emptyDir on /dev/shm.
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    # References resolve within the platform build.
    assert pod["priorityClassName"] in {o["metadata"]["name"] for o in objects if o["kind"] == "PriorityClass"}
    assert (pod["serviceAccountName"], "onevision") in {(o["metadata"]["name"], o["metadata"]["namespace"])
                                                        for o in objects if o["kind"] == "ServiceAccount"}


def test_a_trainjob_for_a_stage_fits_the_runtime() -> None:
    """The TrainJob a pipeline submits: runtimeRef + the `model.train` arguments of its docstring."""
    train_flags = set(re.findall(r'add_argument\("(--[a-z-]+)"', (ROOT / "model/train.py").read_text()))
    args = ["--recipe", "recipes/tiny.yaml", "--stage", "stage1", "--data", "s3://onevision/runs/r1/curate/stage1",
            "--out", "s3://onevision/runs/r1/stage1", "--work-dir", "/scratch"]
    assert {a for a in args if a.startswith("--")} <= train_flags
    job = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
           "metadata": {"name": "r1-stage1", "namespace": "onevision"},
           "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": RUNTIME},
                    "trainer": {"numNodes": 2, "numProcPerNode": 8, "args": args,
                                "resourcesPerNode": {"limits": {"nvidia.com/gpu": 8}}}}}
    assert check_trainer(job) == []
    runtime = the(platform("dev"), "ClusterTrainingRuntime")
    assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]


def test_strict_checker_catches_what_from_dict_ignores() -> None:
    runtime = the(platform("dev"), "ClusterTrainingRuntime")
    assert check_trainer(runtime) == []

    misspelt = copy.deepcopy(runtime)
    misspelt["spec"]["mlPolicy"]["torch"]["numProcPerNod"] = "auto"
    parsed = trainer_api.TrainerV1alpha1ClusterTrainingRuntime.from_dict(misspelt)  # silently dropped there
    assert "numProcPerNod" not in json.dumps(parsed.to_dict())
    assert check_trainer(misspelt) == [
        "ClusterTrainingRuntime.spec.mlPolicy.torch.numProcPerNod: not a field of TrainerV1alpha1TorchMLPolicySource"]

    legacy = copy.deepcopy(runtime)  # Trainer <= 2.1 put numProcPerNode here; 2.3 moved it to the TrainJob
    legacy["spec"]["mlPolicy"]["torch"]["numProcPerNode"] = "auto"
    assert [e for e in check_trainer(legacy) if "torch.numProcPerNode: not a field" in e]

    wrong_type = copy.deepcopy(runtime)
    wrong_type["spec"]["mlPolicy"]["numNodes"] = "1"
    assert check_trainer(wrong_type) == ["ClusterTrainingRuntime.spec.mlPolicy.numNodes: expected int, got str '1'"]

    deep = copy.deepcopy(runtime)  # through replicatedJobs[] -> Job -> Pod -> containers[]
    _, pod = _node(deep)
    pod["containers"][0]["volumeMount"] = pod["containers"][0].pop("volumeMounts")
    pod["containers"][0]["resources"]["limits"]["memory"] = ["64Gi"]
    container = "ClusterTrainingRuntime.spec.template.spec.replicatedJobs[0].template.spec.template.spec.containers[0]"
    quantity, typo = check_trainer(deep)
    assert quantity.startswith(f"{container}.resources.limits.memory: not a valid IoK8sApimachineryPkgApiResourceQuantity")
    assert typo == f"{container}.volumeMount: not a field of IoK8sApiCoreV1Container"

    enum = copy.deepcopy(runtime)  # the models' own validators run too
    _node(enum)[1]["tolerations"][0]["effect"] = "NoScheduling"
    (error,) = check_trainer(enum)
    assert "NoExecute', 'NoSchedule', 'PreferNoSchedule" in error

    missing = copy.deepcopy(runtime)
    del missing["spec"]["template"]["spec"]["replicatedJobs"][0]["name"]
    assert check_trainer(missing) == [
        "ClusterTrainingRuntime.spec.template.spec.replicatedJobs[0].name: required by JobsetV1alpha2ReplicatedJob"]


# --- Argo CD ------------------------------------------------------------------------------------------------

def crd(name: str) -> dict[str, Any]:
    return yaml.safe_load((SCHEMAS / name).read_text())


def strict_schema(schema: Any) -> Any:
    """The CRD's structural schema with unknown fields rejected (kubectl --validate=strict semantics):
    every object schema that lists properties and neither maps nor preserves unknown fields is closed."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k in ("properties", "items", "additionalProperties") else v
           for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: strict_schema(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def schema_errors(obj: dict[str, Any], crd_file: str) -> list[str]:
    definition = crd(crd_file)
    (version,) = definition["spec"]["versions"]
    if (obj.get("apiVersion"), obj.get("kind")) != (f"{definition['spec']['group']}/{version['name']}",
                                                    definition["spec"]["names"]["kind"]):
        return [f"{obj.get('apiVersion')}/{obj.get('kind')} is not what {crd_file} defines"]
    validator = jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(obj))


ARGOCD_SCHEMAS = {"ApplicationSet": "applicationset-crd.extract.yaml", "AppProject": "appproject-crd.yaml"}


def argocd() -> dict[str, dict[str, Any]]:
    objects = kustomize(ROOT / "infra/argocd")
    assert sorted(o["kind"] for o in objects) == sorted(ARGOCD_SCHEMAS)
    return {o["kind"]: o for o in objects}


def test_vendored_schemas_name_their_source() -> None:
    for name in ARGOCD_SCHEMAS.values():
        head = (SCHEMAS / name).read_text().split("apiVersion:", 1)[0]
        assert "argoproj/argo-cd" in head and "manifests/crds/" in head, name
        assert re.search(r"commit:\s+[0-9a-f]{40}\b", head), name


@pytest.mark.parametrize("kind", sorted(ARGOCD_SCHEMAS))
def test_argocd_objects_match_the_vendored_crd_schemas(kind: str) -> None:
    obj = argocd()[kind]
    assert obj["metadata"]["namespace"] == "argocd"
    assert schema_errors(obj, ARGOCD_SCHEMAS[kind]) == []


def test_schema_validation_catches_typos_and_wrong_types() -> None:
    objects = argocd()
    appset = copy.deepcopy(objects["ApplicationSet"])
    appset["spec"]["template"]["spec"]["syncPolicy"]["automated"]["selfheal"] = True
    appset["spec"]["template"]["spec"]["syncPolicy"]["automated"]["prune"] = "true"
    del appset["spec"]["generators"][0]["git"]["revision"]
    appset["spec"]["goTemplate"] = "false"
    assert schema_errors(appset, ARGOCD_SCHEMAS["ApplicationSet"]) == [
        "spec.generators.0.git: 'revision' is a required property",
        "spec.goTemplate: 'false' is not of type 'boolean'",
        "spec.template.spec.syncPolicy.automated.prune: 'true' is not of type 'boolean'",
        "spec.template.spec.syncPolicy.automated: Additional properties are not allowed ('selfheal' was unexpected)"]
    project = copy.deepcopy(objects["AppProject"])
    project["spec"]["destination"] = project["spec"].pop("destinations")
    project["spec"]["namespaceResourceWhitelist"][0].pop("group")
    assert schema_errors(project, ARGOCD_SCHEMAS["AppProject"]) == [
        "spec.namespaceResourceWhitelist.0: 'group' is a required property",
        "spec: Additional properties are not allowed ('destination' was unexpected)"]


# fasttemplate parameters of a git directories generator (Argo CD docs, Generators-Git): the last path
# segment is only {{path.basename}}; {{path[n]}} covers the segments before it.
FASTTEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
GIT_DIRECTORY_PARAMS = re.compile(r"path|path\.basename|path\.basenameNormalized|path\[\d+\]")


def render(template: Any, directory: str) -> Any:
    """What the ApplicationSet controller makes of the template for one matching directory (fasttemplate)."""
    segments = directory.split("/")
    params = {"path": directory, "path.basename": segments[-1],
              "path.basenameNormalized": re.sub(r"[^a-z0-9-]", "-", segments[-1].lower()),
              **{f"path[{i}]": s for i, s in enumerate(segments[:-1])}}
    if isinstance(template, dict):
        return {k: render(v, directory) for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, directory) for v in template]
    if isinstance(template, str):
        return FASTTEMPLATE.sub(lambda m: params[m.group(1)], template)
    return template


DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


def permitted(project: dict[str, Any], server: str, namespace: str) -> bool:
    """AppProject destination check: any allow pattern matches and no `!` pattern does (Argo CD >= 2.5)."""
    allow = [d for d in project["spec"]["destinations"] if not d["namespace"].startswith("!")]
    deny = [d for d in project["spec"]["destinations"] if d["namespace"].startswith("!")]
    return (any(fnmatch.fnmatchcase(server, d["server"]) and fnmatch.fnmatchcase(namespace, d["namespace"]) for d in allow)
            and not any(fnmatch.fnmatchcase(namespace, d["namespace"][1:]) for d in deny))


def test_applicationset_makes_one_application_per_endpoint_overlay() -> None:
    objects = argocd()
    appset, project = objects["ApplicationSet"], objects["AppProject"]
    spec = appset["spec"]
    assert "goTemplate" not in spec  # fasttemplate: {{path[3]}}, not {{index .path.segments 3}}
    (generator,) = spec["generators"]
    git = generator["git"]
    assert git["directories"] == [{"path": "infra/gitops/endpoints/*/*"}]
    template = spec["template"]
    placeholders = FASTTEMPLATE.findall(yaml.safe_dump(template))
    assert placeholders and all(GIT_DIRECTORY_PARAMS.fullmatch(p) for p in placeholders), placeholders
    assert template["metadata"]["name"] == "{{path.basename}}-{{path[3]}}"
    assert template["spec"]["destination"]["namespace"] == "onevision-{{path[3]}}"
    assert template["spec"]["source"] == {"repoURL": git["repoURL"], "targetRevision": git["revision"], "path": "{{path}}"}
    assert project["spec"]["sourceRepos"] == [git["repoURL"]]
    assert template["spec"]["project"] == project["metadata"]["name"]
    sync = template["spec"]["syncPolicy"]
    assert sync["automated"] == {"prune": True, "selfHeal": True}
    assert "CreateNamespace=true" in sync["syncOptions"]

    for directory in ("infra/gitops/endpoints/prod/llava-onevision-ov-0.5b", "infra/gitops/endpoints/dev/llava-onevision-tiny"):
        assert fnmatch.fnmatchcase(directory, git["directories"][0]["path"])
        app = render(template, directory)
        env, model = directory.split("/")[3:]
        assert app["metadata"]["name"] == f"{model}-{env}"
        assert re.fullmatch(rf"{DNS_LABEL}(\.{DNS_LABEL})*", app["metadata"]["name"]) and len(app["metadata"]["name"]) <= 253
        namespace = app["spec"]["destination"]["namespace"]
        assert namespace == f"onevision-{env}" and re.fullmatch(DNS_LABEL, namespace)
        assert permitted(project, app["spec"]["destination"]["server"], namespace)
        assert "{{" not in json.dumps(app)


def test_promoted_overlay_lands_where_the_applicationset_points() -> None:
    """`onevision promote` output for the tiny recipe (dev): namespace and kinds fit the generated Application."""
    from components.register.promote import overlay

    objects = argocd()
    isvc = yaml.safe_load((ROOT / "infra/serving/tiny/tiny-ov.yaml").read_text())
    namespace = isvc["metadata"].get("namespace") or "onevision-dev"
    files = overlay(isvc, "s3://onevision/models/tiny/v3/hf", 10, namespace)
    app = render(objects["ApplicationSet"]["spec"]["template"], "infra/gitops/endpoints/dev/llava-onevision-tiny")
    assert yaml.safe_load(files["kustomization.yaml"])["namespace"] == app["spec"]["destination"]["namespace"]
    allowed = {(g["group"], g["kind"]) for g in objects["AppProject"]["spec"]["namespaceResourceWhitelist"]}
    kind = yaml.safe_load(files["inferenceservice.yaml"])
    assert (kind["apiVersion"].split("/")[0], kind["kind"]) in allowed


def test_appproject_limits_endpoints_to_serving_kinds_and_onevision_namespaces() -> None:
    project = argocd()["AppProject"]["spec"]
    assert {(g["group"], g["kind"]) for g in project["namespaceResourceWhitelist"]} == {
        ("serving.kserve.io", "InferenceService"), ("serving.kserve.io", "ServingRuntime"), ("", "ServiceAccount"),
        ("external-secrets.io", "ExternalSecret"), ("networking.k8s.io", "NetworkPolicy")}  # never a Secret
    assert project["clusterResourceWhitelist"] == [{"group": "", "kind": "Namespace"}]  # for CreateNamespace=true
    assert {d["namespace"].lstrip("!").split("*")[0] for d in project["destinations"]} <= {"onevision-", "onevision-system"}
    for namespace, expected in [("onevision-prod", True), ("onevision-dev", True), ("onevision-system", False),
                                ("onevision", False), ("kube-system", False), ("default", False)]:
        assert permitted({"spec": project}, "https://kubernetes.default.svc", namespace) is expected, namespace
    # every kind the serving manifests are made of may be synced
    allowed = {(g["group"], g["kind"]) for g in project["namespaceResourceWhitelist"]}
    for path in sorted((ROOT / "infra/serving").glob("*/*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
            assert (group, obj["kind"]) in allowed, path


# --- both ---------------------------------------------------------------------------------------------------

CREDENTIAL = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|"
                        r"(?i:(password|secret_?key|secretkey|access_?key|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{12,})")


def test_no_secrets_and_no_credential_values() -> None:
    builds = [platform(o) for o in OVERLAYS] + [kustomize(ROOT / "infra/argocd")]
    assert not [o for objects in builds for o in objects if o["kind"] == "Secret"]
    _, pod = _node(the(builds[0], "ClusterTrainingRuntime"))
    for env in pod["containers"][0]["env"]:
        if re.search(r"(?i)password|secret|key_id|token|user$", env["name"]):
            assert set(env) == {"name", "valueFrom"} and "secretKeyRef" in env["valueFrom"], env["name"]
    files = [ROOT / "infra/platform/base/trainer-runtime.yaml", *sorted((ROOT / "infra/argocd").glob("*.yaml")),
             *sorted(SCHEMAS.glob("*.yaml"))]
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
            if CREDENTIAL.search(line)]
    assert hits == []

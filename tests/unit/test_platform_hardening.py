"""Hardening of the platform overlay's pods (issue 20, point 12), on the rendered overlays.

Every pod spec (Deployments, StatefulSets, Jobs, the ClusterTrainingRuntime's nested pod template) is walked:
each container runs as non-root, cannot escalate privileges, drops ALL capabilities, and has the RuntimeDefault
seccomp profile (set on the pod or the container). Each long-running container has readiness and liveness probes.
No process gets a credential in its arguments. MinIO's root credential reaches only MinIO and the minio-setup Job.
That Job's policies are parsed and evaluated: the serving user may only read (s3:GetObject / s3:ListBucket) the
model prefixes that the shipped manifests and the pipeline's published layout use.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAYS = sorted(p.name for p in (ROOT / "infra/platform/overlays").iterdir())
LONG_RUNNING = ("Deployment", "StatefulSet", "DaemonSet")
EXPECTED_PODS = {("Deployment", "minio"), ("Deployment", "mlflow"), ("StatefulSet", "mlflow-postgres"),
                 ("Job", "minio-setup"), ("ClusterTrainingRuntime", "onevision-torchrun-deepspeed/node")}
ROOT_SECRET = "onevision-minio-root"
PASSWORDISH = re.compile(r"(?i)pass|secret|token|credential|key")
URL_WITH_CREDENTIALS = re.compile(r"://[^/@\s]+:[^/@\s]*@")


def render(overlay: str) -> list[dict[str, Any]]:
    done = subprocess.run([str(BIN / "kubectl"), "kustomize", str(ROOT / "infra/platform/overlays" / overlay)],
                          capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(done.stdout) if o]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def pod_specs(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(kind, name): pod spec} of every object that carries pods, the Trainer runtime's nested template too."""
    pods = {}
    for o in objects:
        kind, name = o["kind"], o["metadata"]["name"]
        if kind in (*LONG_RUNNING, "Job", "ReplicaSet"):
            pods[(kind, name)] = o["spec"]["template"]["spec"]
        elif kind == "CronJob":
            pods[(kind, name)] = o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif kind in ("ClusterTrainingRuntime", "TrainingRuntime"):
            for job in o["spec"]["template"]["spec"]["replicatedJobs"]:
                pods[(kind, f"{name}/{job['name']}")] = job["template"]["spec"]["template"]["spec"]
        elif kind == "Pod":
            pods[(kind, name)] = o["spec"]
    return pods


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def effective(pod: dict[str, Any], container: dict[str, Any], field: str) -> Any:
    """A securityContext field as the kubelet resolves it: the container's, else the pod's."""
    own = container.get("securityContext", {})
    return own[field] if field in own else pod.get("securityContext", {}).get(field)


def test_every_pod_of_ours_is_walked(objects: list[dict[str, Any]]) -> None:
    assert set(pod_specs(objects)) >= EXPECTED_PODS


def test_every_container_is_locked_down(objects: list[dict[str, Any]]) -> None:
    problems = []
    for (kind, name), pod in pod_specs(objects).items():
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True, name
        for c in containers(pod):
            where = f"{kind}/{name}/{c['name']}"
            own = c.get("securityContext", {})
            if effective(pod, c, "runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot")
            if effective(pod, c, "runAsUser") in (0, None):
                problems.append(f"{where}: no numeric non-root runAsUser")  # runAsNonRoot alone fails on root images
            if own.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation")
            if "ALL" not in own.get("capabilities", {}).get("drop", []) or own.get("capabilities", {}).get("add"):
                problems.append(f"{where}: capabilities")
            if own.get("privileged"):
                problems.append(f"{where}: privileged")
            if (effective(pod, c, "seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile")
    assert problems == []


def test_long_running_containers_have_readiness_and_liveness_probes(objects: list[dict[str, Any]]) -> None:
    missing = [f"{kind}/{name}/{c['name']}: {probe}"
               for (kind, name), pod in pod_specs(objects).items() if kind in LONG_RUNNING
               for c in pod["containers"] for probe in ("readinessProbe", "livenessProbe") if probe not in c]
    assert missing == []


def test_minio_and_postgres_run_as_non_root_on_writable_volumes(objects: list[dict[str, Any]]) -> None:
    pods = pod_specs(objects)
    postgres = pods[("StatefulSet", "mlflow-postgres")]
    assert postgres["securityContext"]["runAsUser"] == 999  # the postgres image's own user
    assert postgres["securityContext"]["fsGroup"] == 999
    (container,) = postgres["containers"]
    pgdata = next(e["value"] for e in container["env"] if e["name"] == "PGDATA")
    assert any(pgdata.startswith(m["mountPath"].rstrip("/") + "/") for m in container["volumeMounts"])
    minio = pods[("Deployment", "minio")]
    (container,) = minio["containers"]
    data = next(m for m in container["volumeMounts"] if container["args"][1] == m["mountPath"])  # `server /data`
    assert data["name"] in {v["name"] for v in minio["volumes"] if "persistentVolumeClaim" in v}
    assert minio["securityContext"]["runAsUser"] != 0 and minio["securityContext"]["fsGroup"] != 0


def _secret_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def test_no_credential_in_any_process_arguments(objects: list[dict[str, Any]]) -> None:
    found = []
    for (kind, name), pod in pod_specs(objects).items():
        for c in containers(pod):
            from_secrets = _secret_env(c)
            words = [*c.get("command", []), *c.get("args", [])]
            for word in words:
                for ref in re.findall(r"\$\((\w+)\)", word):  # the kubelet expands these into argv
                    if ref in from_secrets or PASSWORDISH.search(ref):
                        found.append(f"{kind}/{name}/{c['name']}: $({ref})")
                if URL_WITH_CREDENTIALS.search(word):
                    found.append(f"{kind}/{name}/{c['name']}: credentials in a URL: {word[:60]}")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                # exec probes get no $(VAR) expansion: a reference there is a literal string, i.e. a bug
                command = c.get(probe, {}).get("exec", {}).get("command", [])
                assert not any("$(" in w for w in command), (name, probe, command)
    assert found == []


def test_mlflow_reads_the_database_credential_from_libpq_env(objects: list[dict[str, Any]]) -> None:
    (c,) = pod_specs(objects)[("Deployment", "mlflow")]["containers"]
    secrets = _secret_env(c)
    assert secrets["PGUSER"] == secrets["PGPASSWORD"] == "onevision-mlflow-db"
    (uri,) = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--backend-store-uri=")]
    assert uri.startswith("postgresql://") and "@" not in uri


def test_the_root_credential_reaches_only_minio_and_its_setup_job(objects: list[dict[str, Any]]) -> None:
    holders = {name for (kind, name), pod in pod_specs(objects).items()
               for c in containers(pod) if ROOT_SECRET in _secret_env(c).values()}
    assert holders == {"minio", "minio-setup"}
    (minio,) = pod_specs(objects)[("Deployment", "minio")]["containers"]
    assert set(_secret_env(minio).values()) == {ROOT_SECRET}
    # each client on its own credential
    (mlflow,) = pod_specs(objects)[("Deployment", "mlflow")]["containers"]
    assert _secret_env(mlflow)["AWS_ACCESS_KEY_ID"] == "onevision-mlflow-s3"
    (node,) = pod_specs(objects)[("ClusterTrainingRuntime", "onevision-torchrun-deepspeed/node")]["containers"]
    assert _secret_env(node)["AWS_ACCESS_KEY_ID"] == "onevision-s3"


# --- the minio-setup Job's users and policies ---------------------------------------------------------------

def setup_config(objects: list[dict[str, Any]]) -> dict[str, str]:
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "minio-setup"]
    return cm["data"]


def policies(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {key[:-5]: json.loads(text) for key, text in setup_config(objects).items() if key.endswith(".json")}


def users(objects: list[dict[str, Any]]) -> dict[str, str]:
    """{policy: the Secret whose keys become that policy's MinIO user}, read from the script and the Job's env."""
    (job,) = pod_specs(objects)[("Job", "minio-setup")]["containers"]
    env = _secret_env(job)
    out = {}
    for line in setup_config(objects)["setup.sh"].splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith("user ") else []
        if words:
            policy, access, secret = words[1], words[2].lstrip("$"), words[3].lstrip("$")
            assert env[access] == env[secret], (policy, env[access], env[secret])
            out[policy] = env[access]
    return out


def allowed(policy: dict[str, Any], action: str, resource: str, prefix: str | None = None) -> bool:
    """IAM evaluation for the subset the policies use (Allow statements, StringLike on s3:prefix)."""
    for statement in policy["Statement"]:
        if not any(fnmatch.fnmatchcase(action, a) for a in statement["Action"]):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in statement["Resource"]):
            continue
        like = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if like is not None and not any(fnmatch.fnmatchcase(prefix or "", p) for p in like):
            continue
        return True
    return False


def test_the_policies_use_only_what_the_evaluator_understands(objects: list[dict[str, Any]]) -> None:
    for name, policy in policies(objects).items():
        for statement in policy["Statement"]:
            assert statement["Effect"] == "Allow", name
            assert set(statement.get("Condition", {})) <= {"StringLike"}, name
            assert set(statement.get("Condition", {}).get("StringLike", {})) <= {"s3:prefix"}, name
            assert not any(c in r for r in statement["Resource"] for c in "[]?"), name  # fnmatch == IAM


def test_each_client_has_its_own_user_and_the_job_mounts_every_policy(objects: list[dict[str, Any]]) -> None:
    from onevision.recipe import load_recipe

    cluster = load_recipe(ROOT / "recipes/tiny.yaml").cluster
    assert users(objects) == {"onevision-pipeline": cluster.s3_secret,
                              "onevision-serving": cluster.serving_s3_secret,
                              "onevision-mlflow": "onevision-mlflow-s3"}
    assert set(users(objects)) == set(policies(objects))
    (job,) = [o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == "minio-setup"]
    pod = job["spec"]["template"]["spec"]
    mounted = {item["key"] for v in pod["volumes"] if "configMap" in v for item in v["configMap"]["items"]}
    assert {f"{p}.json" for p in policies(objects)} | {"setup.sh"} <= mounted
    image = pod["containers"][0]["image"]
    assert re.fullmatch(r"quay\.io/minio/mc:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", image), image  # pinned


def _key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def served_uris() -> set[str]:
    """The storage URIs the shipped endpoint manifests read (storageUri fields, STORAGE_URI env)."""
    found = set()
    for path in (ROOT / "infra/serving").rglob("*.yaml"):
        found |= set(re.findall(r"(?:storageUri:|value:)\s*(s3://\S+)", path.read_text()))
    assert found, "no storage URIs in infra/serving"
    return found


def pipeline_uris() -> set[str]:
    """What the registry promotes from a pipeline run: <runs root>/<recipe>/<run>/<stage>/hf and .../export."""
    import inspect

    from pipelines.onevision import build_pipeline

    runs_root = inspect.signature(build_pipeline).parameters["runs_root"].default
    run = f"{runs_root}/ov-7b/20260101-abc"
    return {f"{run}/stage2_ov/hf", f"{run}/export/triton", f"{run}/export/manifests"}


def test_serving_reads_the_model_prefixes_and_nothing_else(objects: list[dict[str, Any]]) -> None:
    serving = policies(objects)["onevision-serving"]
    actions = {a for s in serving["Statement"] for a in s["Action"]}
    assert actions <= {"s3:GetObject", "s3:ListBucket"}
    for uri in served_uris() | pipeline_uris():
        bucket, key = _key(uri)
        assert allowed(serving, "s3:GetObject", f"arn:aws:s3:::{bucket}/{key}/config.json"), uri
        assert allowed(serving, "s3:ListBucket", f"arn:aws:s3:::{bucket}", prefix=key), uri  # KServe's form
        assert allowed(serving, "s3:ListBucket", f"arn:aws:s3:::{bucket}", prefix=key + "/"), uri
        assert not allowed(serving, "s3:PutObject", f"arn:aws:s3:::{bucket}/{key}/config.json"), uri
        assert not allowed(serving, "s3:DeleteObject", f"arn:aws:s3:::{bucket}/{key}/config.json"), uri
    refused = ["onevision/runs/ov-7b/r1/stage2_ov/checkpoints/step-100/model.pt",  # optimizer state, not a model
               "onevision/curated/ov-7b/stage1/abc/shard-0.tar", "onevision/runs/ov-7b/r1/recipe.yaml",
               "mlflow/artifacts/1/abc/artifacts/model.bin"]
    for path in refused:
        assert not allowed(serving, "s3:GetObject", f"arn:aws:s3:::{path}"), path
    assert not allowed(serving, "s3:ListBucket", "arn:aws:s3:::onevision", prefix="")  # no listing of everything
    assert not allowed(serving, "s3:ListBucket", "arn:aws:s3:::onevision", prefix="curated/")
    assert not allowed(serving, "s3:ListBucket", "arn:aws:s3:::mlflow", prefix="models/")


def test_pipeline_and_mlflow_users_write_only_their_buckets(objects: list[dict[str, Any]]) -> None:
    pipeline, mlflow = policies(objects)["onevision-pipeline"], policies(objects)["onevision-mlflow"]
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
        assert allowed(pipeline, action, "arn:aws:s3:::onevision/runs/x/stage1/hf/model.safetensors")
        assert allowed(pipeline, action, "arn:aws:s3:::mlflow/artifacts/1/x")
        assert allowed(mlflow, action, "arn:aws:s3:::mlflow/artifacts/1/x")
        assert not allowed(mlflow, action, "arn:aws:s3:::onevision/models/x")
        assert not allowed(pipeline, action, "arn:aws:s3:::other-bucket/x")
    assert allowed(pipeline, "s3:ListBucket", "arn:aws:s3:::onevision", prefix="runs/")
    assert not any(allowed(p, "s3:CreateBucket", "arn:aws:s3:::x") or allowed(p, "admin:CreateUser", "arn:aws:s3:::*")
                   for p in (pipeline, mlflow))


FAKE_MC = """#!/bin/sh
# records each call's argv and stdin; `policy attach` answers as MinIO does for an attached policy when told to
printf '%s\\n' "$*" >> "$MC_LOG"
cat > /dev/null  # never blocks: stdin is a pipe or /dev/null
if [ "$1 $2 $3" = "admin policy attach" ] && [ -n "${ATTACH_ERROR:-}" ]; then echo "$ATTACH_ERROR" >&2; exit 1; fi
exit 0
"""


def run_setup(objects: list[dict[str, Any]], tmp_path: Path, attach_error: str = "") -> tuple[int, str, str]:
    """The ConfigMap's real setup.sh under /bin/sh, against a fake mc that records its arguments."""
    (bin_dir := tmp_path / "bin").mkdir()
    (bin_dir / "mc").write_text(FAKE_MC)
    (bin_dir / "mc").chmod(0o755)
    script = tmp_path / "setup.sh"
    script.write_text(setup_config(objects)["setup.sh"])
    (job,) = pod_specs(objects)[("Job", "minio-setup")]["containers"]
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MC_LOG": str(tmp_path / "mc.log"), "POLICY_DIR": "/policies",
           "ATTACH_ERROR": attach_error, "HOME": str(tmp_path)}
    env |= {e["name"]: e["value"] for e in job["env"] if "value" in e and e["name"] != "HOME"}
    # secret halves carry a marker that must never show in mc's arguments; access keys are user names
    env |= {name: f"value-of-{name}" + ("-s3cr3t" if re.search("SECRET|PASSWORD", name) else "")
            for name in _secret_env(job)}
    done = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    log = (tmp_path / "mc.log").read_text() if (tmp_path / "mc.log").exists() else ""
    return done.returncode, log, done.stderr


def test_the_setup_script_creates_every_user_with_no_key_in_mc_arguments(objects: list[dict[str, Any]],
                                                                         tmp_path: Path) -> None:
    code, log, err = run_setup(objects, tmp_path)
    assert code == 0, err
    assert "s3cr3t" not in log  # secret keys and the root password reach mc on stdin only
    calls = log.splitlines()
    assert calls[0] == "alias set ov http://minio.onevision-system.svc:9000"
    assert {"mb --ignore-existing ov/onevision", "mb --ignore-existing ov/mlflow"} <= set(calls)
    for policy in policies(objects):
        assert f"admin policy create ov {policy} /policies/{policy}.json" in calls
        assert any(c.startswith(f"admin policy attach ov {policy} --user value-of-") for c in calls)
    assert calls.count("admin user add ov") == len(policies(objects))


def test_the_setup_script_is_idempotent_but_fails_on_real_errors(objects: list[dict[str, Any]],
                                                                 tmp_path: Path) -> None:
    (again := tmp_path / "again").mkdir()
    code, _, err = run_setup(objects, again, "mc: <ERROR> The specified policy change is already in effect.")
    assert code == 0, err
    (broken := tmp_path / "broken").mkdir()
    code, _, err = run_setup(objects, broken, "mc: <ERROR> Access Denied.")
    assert code != 0 and "Access Denied" in err

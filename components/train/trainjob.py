"""A training stage across nodes: a Kubeflow Trainer v2 TrainJob (torchrun + DeepSpeed on the project image).

    manifest = trainjob_manifest(name="ov-r1-stage2-si", namespace="onevision", image=PROJECT_IMAGE,
                                 train_args=["--recipe", "recipes/ov-7b.yaml", "--stage", "stage2_si", ...],
                                 nodes=4, gpus_per_node=8, cpu="64", memory="900Gi",
                                 node_selector={"onevision/pool": "gpu"},
                                 tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                                 s3_secret="onevision-s3", env={"MLFLOW_TRACKING_URI": "http://mlflow..."})
    Path(artifact_path).write_text(json.dumps(manifest))   # the train step saves what it submits
    job = run_trainjob(manifest, timeout_s=7 * 24 * 3600)    # the final TrainJob; TrainJobFailed if it failed

The TrainJob references the ClusterTrainingRuntime `onevision-torchrun-deepspeed`
(infra/platform/base/trainer-runtime.yaml): a JobSet with one indexed Job `node` of `numNodes` pods, each
running `torchrun -m model.train <args>`. The Trainer's torch plugin injects PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, which torchrun reads as its flags' defaults, so the
command carries no rendezvous settings. The API shape is Trainer 2.3 (infra/crds/, checked in
tests/unit/test_trainjob.py): per-job pod settings go through `spec.runtimePatches`.

run_trainjob creates the TrainJob (or attaches to it when a retried step finds it already there), follows
the log of the rank-0 pod, and polls `status.conditions` until Complete (returns the object) or Failed
(raises TrainJobFailed with the condition's reason and message). On timeout the job is left in place for
inspection. Logs are best effort: they never fail or hold up a job that succeeded.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
# The runtime's replicated Job and its container are both named `node` (Trainer convention for the trainer step).
NODE_JOB = "node"
# What the runtime's container runs; set here as well so the manifest says what will run, and the two must agree.
TRAIN_COMMAND = ["torchrun", "-m", "model.train"]
# Keys of the S3 Secret, as infra/README.md creates it and every other S3 client of the platform reads it.
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
# Kueue (infra/platform/base/quota.yaml): the TrainJob names the LocalQueue; Kueue's trainjob integration
# admits all of its nodes at once (gang) or none, and suspends it until then.
QUEUE_LABEL, QUEUE = "kueue.x-k8s.io/queue-name", "onevision"
PATCH_MANAGER = "onevision/pipeline"  # our entry in spec.runtimePatches (one entry per manager)
# Labels JobSet and the Job controller put on every pod; the pod of node rank 0 is completion index 0.
POD_SELECTOR = ("jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=" + NODE_JOB
                + ",batch.kubernetes.io/job-completion-index=0")
LOG_GRACE_S = 30.0  # after the job ends, how long the rank-0 log may take to drain
API_TIMEOUT = (10, 60)  # connect/read seconds for each API call (not the log stream, which may be quiet for long)

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
_QUANTITY = re.compile(rf"(\+|-)?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?")  # the CRD's pattern
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_SECRET_NAME = re.compile(r"(?i)secret|password|token|access_?key|credential")


class TrainJobFailed(RuntimeError):
    """The TrainJob ended Failed (or vanished); the message names the job, the reason and the message."""


def _check_name(name: str, nodes: int) -> None:
    if len(name) > 63 or not _DNS1035.fullmatch(name):
        raise ValueError(f"name: {name!r} is not a DNS-1035 label (lower-case letters, digits and '-', starting "
                         "with a letter and ending with a letter or digit, at most 63 characters)")
    # JobSet rejects a JobSet whose longest pod name `<name>-node-<job>-<index>-<5 random>` is no DNS-1035 label.
    longest_pod = f"{name}-{NODE_JOB}-0-{nodes - 1}-abcde"
    if len(longest_pod) > 63:
        raise ValueError(f"name: {name!r} is too long for {nodes} nodes: its pods are named like {longest_pod!r}, "
                         f"which must fit 63 characters; use at most {63 - len(longest_pod) + len(name)}")


def trainjob_manifest(*, name: str, namespace: str, image: str, train_args: list[str], nodes: int,
                      gpus_per_node: int, cpu: str, memory: str, node_selector: dict[str, str],
                      tolerations: list[dict], s3_secret: str, env: dict[str, str],
                      runtime: str = "onevision-torchrun-deepspeed", queue: str | None = QUEUE) -> dict:
    """The TrainJob for one stage (a plain dict, ready for the API and to be saved as the step's artifact)."""
    if nodes < 1:
        raise ValueError(f"nodes: {nodes} < 1")
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node: {gpus_per_node} < 1 (the runtime trains with NCCL on GPUs)")
    _check_name(name, nodes)
    for field, value in (("namespace", namespace), ("s3_secret", s3_secret), ("runtime", runtime)):
        if len(value) > 63 or not _DNS1123.fullmatch(value):
            raise ValueError(f"{field}: {value!r} is not a DNS-1123 label")
    for field, value in (("cpu", cpu), ("memory", memory)):
        if not _QUANTITY.fullmatch(str(value)):
            raise ValueError(f"{field}: {value!r} is not a Kubernetes quantity (e.g. '64', '500m', '900Gi')")
    for key in env:
        if not _ENV_NAME.fullmatch(key):
            raise ValueError(f"env: {key!r} is not a valid environment variable name")
        if key in S3_SECRET_KEYS or _SECRET_NAME.search(key):
            # a value here would sit in the TrainJob (and in the saved artifact) in clear text
            raise ValueError(f"env: {key} looks like a credential; credentials come only from the Secret "
                             f"{s3_secret!r} (secretKeyRef), never as literal values")
    if "--stage" not in train_args[:-1]:
        raise ValueError("train_args: no '--stage <stage>' (model.train needs it, and it labels the job)")
    stage = train_args[train_args.index("--stage") + 1]

    labels = {"app.kubernetes.io/part-of": "onevision", "app.kubernetes.io/component": "train",
              "onevision/stage": stage}
    run_id = env.get("ONEVISION_PIPELINE_RUN_ID", "")
    if run_id and len(run_id) <= 63 and _LABEL_VALUE.fullmatch(run_id):
        labels["onevision/pipeline-run"] = run_id
    gpus = str(gpus_per_node)
    pod_spec: dict[str, Any] = {}
    if node_selector:  # merged into the runtime's selector (onevision/pool: gpu)
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:  # an atomic list: it replaces the runtime's, so only set it when there is something to say
        pod_spec["tolerations"] = [{k: v for k, v in t.items() if v is not None} for t in tolerations]
    job_labels = dict(labels)
    if queue:  # on the TrainJob itself, where Kueue's trainjob integration reads it (None: no Kueue)
        if len(queue) > 63 or not _DNS1123.fullmatch(queue):
            raise ValueError(f"queue: {queue!r} is not a DNS-1123 label")
        job_labels[QUEUE_LABEL] = queue
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": job_labels},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": runtime},
            "trainer": {
                "image": image,
                "command": list(TRAIN_COMMAND),
                "args": list(train_args),
                "numNodes": nodes,
                "numProcPerNode": gpus_per_node,  # one rank per GPU, explicit rather than the plugin's `auto`
                # replaces the runtime container's resources; no CPU limit (throttling slows the data loaders)
                "resourcesPerNode": {"requests": {"cpu": str(cpu), "memory": str(memory), "nvidia.com/gpu": gpus},
                                     "limits": {"memory": str(memory), "nvidia.com/gpu": gpus}},
                "env": [{"name": var, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key}}}
                        for var, key in S3_SECRET_KEYS.items()]
                + [{"name": k, "value": str(v)} for k, v in sorted(env.items())],
            },
            "runtimePatches": [{
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": NODE_JOB,
                    "template": {"spec": {"template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec}}},
                }]}}},
            }],
        },
    }


def _default_client() -> kubernetes.client.ApiClient:
    try:
        kubernetes.config.load_incluster_config()  # the pipeline step's pod and its service account
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # a workstation
    return kubernetes.client.ApiClient()


def _transient(error: Exception) -> bool:
    if isinstance(error, ApiException):
        return error.status == 429 or (error.status or 0) >= 500
    return isinstance(error, (urllib3.exceptions.HTTPError, OSError))


def _brief(error: Exception) -> str:
    """One line: ApiException's own str() carries every response header and the body."""
    if isinstance(error, ApiException):
        try:
            message = json.loads(error.body or "{}").get("message", "")
        except ValueError:
            message = ""
        return f"{error.status} {error.reason}" + (f": {message}" if message else "")
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class _RankZeroLog(threading.Thread):
    """Follows the log of the rank-0 pod, and of its replacement when JobSet restarts the job.

    Each pod is followed once; an interrupted stream is reported, not resumed (no duplicate lines)."""

    def __init__(self, core: kubernetes.client.CoreV1Api, namespace: str, name: str,
                 log: Callable[[str], None], poll_s: float) -> None:
        super().__init__(name=f"trainjob-log-{name}", daemon=True)
        self.core, self.namespace, self.log, self.poll_s = core, namespace, log, poll_s
        self.selector = POD_SELECTOR.format(name=name)
        self.done = threading.Event()
        self.closing = False
        self.response: Any = None
        self.after = float("-inf")  # creation time of the newest pod followed: older ones are stale attempts
        self.followed: set[str] = set()

    def run(self) -> None:
        try:
            while True:
                finishing = self.done.is_set()  # one last look after the job ended: a short job may be unseen
                pod = self._next_pod()
                if pod is not None:
                    self._follow(pod)
                elif finishing:
                    return
                else:
                    self.done.wait(self.poll_s)
        except Exception as error:  # noqa: BLE001 - best effort: a log problem must never fail the step
            self.log(f"[trainjob] log streaming stopped: {_brief(error)}")

    def _next_pod(self) -> Any:
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector,
                                                 _request_timeout=API_TIMEOUT).items
        except Exception as error:  # noqa: BLE001
            if not _transient(error):
                self.log(f"[trainjob] cannot list the job's pods: {_brief(error)}")
            return None

        def created(pod: Any) -> float:
            stamp = pod.metadata.creation_timestamp
            return stamp.timestamp() if stamp else 0.0

        started = [p for p in pods if p.status and p.status.phase in ("Running", "Succeeded", "Failed")
                   and p.metadata.uid not in self.followed and created(p) >= self.after]
        return max(started, key=created) if started else None

    def _follow(self, pod: Any) -> None:
        name = pod.metadata.name
        self.followed.add(pod.metadata.uid)
        self.after = max(self.after, pod.metadata.creation_timestamp.timestamp()
                         if pod.metadata.creation_timestamp else 0.0)
        containers = [c.name for c in (pod.spec.containers if pod.spec else [])]
        self.log(f"[trainjob] log of pod {name} (node rank 0):")
        try:
            self.response = self.core.read_namespaced_pod_log(
                name, self.namespace, container=NODE_JOB if NODE_JOB in containers else None,
                follow=True, _preload_content=False)
            pending = b""
            while chunk := self.response.read1(65536):  # whatever has arrived; read() would wait for 64 KiB
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.log(line.rstrip(b"\r").decode("utf-8", "replace"))
            if pending:
                self.log(pending.decode("utf-8", "replace"))
        except Exception as error:  # noqa: BLE001
            if not self.closing:
                self.log(f"[trainjob] log of pod {name} interrupted: {_brief(error)}")
        finally:
            response, self.response = self.response, None
            if response is not None:
                with contextlib.suppress(Exception):
                    response.release_conn()

    def finish(self, grace_s: float) -> None:
        """Let the log drain for up to grace_s, then cut the stream (a stuck one must not hold the step)."""
        self.done.set()
        self.join(grace_s)
        if self.is_alive():
            self.closing = True
            response = self.response
            if response is not None:
                with contextlib.suppress(Exception):
                    getattr(response, "shutdown", response.close)()  # shutdown() interrupts a blocked read
            self.join(1.0)


def _same_job(existing: dict, manifest: dict) -> list[str]:
    """Fields in which an existing TrainJob of the same name differs from ours (then it is not ours)."""
    ours, theirs = manifest["spec"]["trainer"], (existing.get("spec") or {}).get("trainer") or {}
    return [f for f in ("image", "command", "args", "numNodes") if ours.get(f) != theirs.get(f)]


def run_trainjob(manifest: dict, *, timeout_s: float, poll_s: float = 10.0, log: Callable[[str], None] = print,
                 api_client: kubernetes.client.ApiClient | None = None) -> dict:
    """Create the TrainJob (or attach to it), stream rank 0's log, and wait: the final object on Complete;
    TrainJobFailed on Failed; TimeoutError after timeout_s (the job is left for inspection)."""
    client = api_client or _default_client()
    custom, core = kubernetes.client.CustomObjectsApi(client), kubernetes.client.CoreV1Api(client)
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    where = f"TrainJob {namespace}/{name}"
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest,
                                               _request_timeout=API_TIMEOUT)
        log(f"[trainjob] created {where}: {manifest['spec']['trainer']['numNodes']} nodes")
    except ApiException as error:
        if error.status != 409:
            raise
        # a retried pipeline step: the job from the first attempt is still there (running or finished)
        existing = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                       _request_timeout=API_TIMEOUT)
        differs = _same_job(existing, manifest)
        if differs:
            raise RuntimeError(f"{where} already exists with a different {', '.join(differs)}; it is not this "
                               f"step's job: delete it (kubectl -n {namespace} delete trainjob {name}) or rename")
        log(f"[trainjob] {where} already exists (a retried step): attaching to it")

    follower = _RankZeroLog(core, namespace, name, log, poll_s)
    follower.start()
    deadline = time.monotonic() + timeout_s
    seen: set[tuple[str, str]] = set()
    grace = 0.0  # the log may drain only once the job has ended; otherwise its stream is cut at once
    try:
        while True:
            try:
                job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                          _request_timeout=API_TIMEOUT)
            except ApiException as error:
                if error.status == 404:
                    raise TrainJobFailed(f"{where} disappeared (deleted while the step waited for it)") from error
                if not _transient(error):
                    raise
                job = None
                log(f"[trainjob] {where}: API error, retrying: {_brief(error)}")
            except (urllib3.exceptions.HTTPError, OSError) as error:
                job = None
                log(f"[trainjob] {where}: API unreachable, retrying: {_brief(error)}")
            true = {c.get("type", ""): c for c in ((job or {}).get("status") or {}).get("conditions") or []
                    if c.get("status") == "True"}
            for kind, cond in true.items():
                if (kind, cond.get("reason", "")) not in seen:
                    seen.add((kind, cond.get("reason", "")))
                    log(f"[trainjob] {name}: {kind} ({cond.get('reason', '')}) {cond.get('message', '')}".rstrip())
            if "Failed" in true or "Complete" in true:
                grace = LOG_GRACE_S
            if "Failed" in true:
                cond = true["Failed"]
                raise TrainJobFailed(f"TrainJob {name} failed: {cond.get('reason', 'Unknown')}: "
                                     f"{cond.get('message', '')}")
            if "Complete" in true:
                return job  # type: ignore[return-value]
            left = deadline - time.monotonic()
            if left <= 0:
                state = ", ".join(sorted(true)) or "no condition yet"
                raise TimeoutError(f"{where} did not finish within {timeout_s:g} s ({state}); it is left in place "
                                   f"for inspection: kubectl -n {namespace} describe trainjob {name}")
            time.sleep(min(poll_s, left))
    finally:
        follower.finish(grace)

"""run_trainjob against a fake Kubernetes API server, through the real `kubernetes` client.

No API server can run here, so the fake sits at the narrowest boundary: HTTP on 127.0.0.1, answering only
what the client calls (create/get a TrainJob custom object, list pods by label selector, a pod's log,
streamed chunked like the real one), with a scripted lifecycle: each GET of the TrainJob moves it one step.
The pods carry the labels JobSet and the Job controller put on them, so the label selector is tested too.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes
import pytest

from components.train.trainjob import TrainJobFailed, run_trainjob, trainjob_manifest

pytestmark = pytest.mark.integration

NS, NAME = "onevision", "ov-r1-stage2-si"
JOBS = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
PODS = f"/api/v1/namespaces/{NS}/pods"


def cond(kind: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": "2026-11-29T06:00:00Z"}


CREATED = {"conditions": [cond("Created", "JobSetCreated", "JobSet is created")], "pod": "Pending"}
RUNNING = {"conditions": CREATED["conditions"], "pod": "Running"}
COMPLETE = {"conditions": [*CREATED["conditions"], cond("Complete", "JobSetCompleted", "JobSet is completed")],
            "pod": "Succeeded"}
FAILED = {"conditions": [*CREATED["conditions"],
                         cond("Failed", "BackoffLimitExceeded", "Job node-0 has reached the specified backoff limit")],
          "pod": "Failed"}
RANK0 = [f"[rank0] step {i} loss {2.0 - i / 10:.2f}" for i in range(6)] + ["[rank0] published s3://onevision/hf"]


class FakeCluster:
    """State of the fake API server: stored TrainJobs, the request log, the script, the pods and their logs."""

    def __init__(self, script: list[dict[str, Any]]) -> None:
        self.script, self.step = script, 0
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.posted: list[dict[str, Any]] = []
        self.fail_gets: list[int] = []  # status codes to answer the next TrainJob GETs with
        self.log_status = 200
        self.log_open = threading.Event()  # while clear, rank 0's stream stays open after its lines (a live pod)
        self.log_open.set()
        self.lock = threading.Lock()

    def pods(self) -> list[dict[str, Any]]:
        phase = self.script[min(self.step, len(self.script) - 1)]["pod"]
        if phase is None or NAME not in self.jobs:
            return []

        def pod(job: str, index: int, uid: str) -> dict[str, Any]:
            return {"metadata": {"name": f"{NAME}-{job}-0-{index}-x{uid}", "namespace": NS, "uid": uid,
                                 "creationTimestamp": "2026-11-29T06:00:01Z",
                                 "labels": {"jobset.sigs.k8s.io/jobset-name": NAME,
                                            "jobset.sigs.k8s.io/replicatedjob-name": job,
                                            "jobset.sigs.k8s.io/job-index": "0",
                                            "batch.kubernetes.io/job-completion-index": str(index)}},
                    "spec": {"containers": [{"name": job, "image": "ghcr.io/onevision/platform:0.1.0"}]},
                    "status": {"phase": phase}}

        return [pod("dataset-initializer", 0, "init0"), pod("node", 1, "node1"), pod("node", 0, "node0")]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked log streams, as the real API server
    cluster: FakeCluster

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._json(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "message": message, "reason": reason, "code": code})

    def do_POST(self) -> None:
        c = self.cluster
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with c.lock:
            c.requests.append(("POST", self.path))
            if self.path != JOBS:
                return self._status(404, "NotFound", self.path)
            c.posted.append(copy.deepcopy(body))
            name = body["metadata"]["name"]
            if name in c.jobs:
                return self._status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists')
            c.jobs[name] = {**body, "metadata": {**body["metadata"], "uid": "job-uid", "generation": 1}}
            self._json(201, c.jobs[name])

    def do_GET(self) -> None:
        c = self.cluster
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with c.lock:
            c.requests.append(("GET", self.path))
            if url.path.startswith(JOBS + "/"):
                name = url.path.rsplit("/", 1)[1]
                if c.fail_gets:
                    return self._status(c.fail_gets.pop(0), "InternalError", "etcdserver: request timed out")
                if name not in c.jobs:
                    return self._status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
                job = {**c.jobs[name], "status": {"conditions": c.script[min(c.step, len(c.script) - 1)]["conditions"]}}
                c.step += 1
                return self._json(200, job)
            if url.path == PODS:
                wanted = dict(term.split("=", 1) for term in query.get("labelSelector", "").split(",") if term)
                assert all("!" not in k for k in wanted), query  # equality terms only
                items = [p for p in c.pods() if wanted.items() <= p["metadata"]["labels"].items()]
                return self._json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            if url.path.startswith(PODS + "/") and url.path.endswith("/log"):
                pod = url.path.split("/")[-2]
                if c.log_status != 200:
                    return self._status(c.log_status, "InternalError", "kubelet unreachable")
                # the client sends follow=True; the API server parses it with Go's strconv.ParseBool
                assert query.get("follow") in ("1", "t", "T", "true", "True", "TRUE"), query
                assert query.get("container") == "node", query
                lines = RANK0 if "-node-0-0-" in pod else [f"[other] {pod}"]
        if url.path.endswith("/log"):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for line in lines:  # one chunk per line, a little apart, split mid-line once
                data = (line + "\n").encode()
                for part in (data[:5], data[5:]):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.flush()
                time.sleep(0.01)
            self.cluster.log_open.wait(30)
            self.wfile.write(b"0\r\n\r\n")
            return None
        return self._status(404, "NotFound", self.path)


@pytest.fixture
def cluster() -> Iterator[tuple[FakeCluster, kubernetes.client.ApiClient]]:
    state = FakeCluster([CREATED, RUNNING, RUNNING, COMPLETE])
    handler = type("BoundHandler", (Handler,), {"cluster": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = kubernetes.client.Configuration()
    config.host = f"http://127.0.0.1:{server.server_address[1]}"
    client = kubernetes.client.ApiClient(config)
    try:
        yield state, client
    finally:
        state.log_open.set()
        client.close()
        server.shutdown()
        server.server_close()


def manifest(**overrides: Any) -> dict[str, Any]:
    args = ["--recipe", "recipes/ov-7b.yaml", "--stage", "stage2_si", "--data", "s3://onevision/runs/r1/curate/stage2_si",
            "--out", "s3://onevision/runs/r1/stage2_si", "--work-dir", "/scratch"]
    kwargs: dict[str, Any] = {
        "name": NAME, "namespace": NS, "image": "ghcr.io/onevision/platform:0.1.0", "train_args": args, "nodes": 2,
        "gpus_per_node": 8, "cpu": "64", "memory": "900Gi",
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "s3_secret": "onevision-s3", "env": {"MLFLOW_TRACKING_URI": "http://mlflow.onevision-system.svc:5000"}}
    return trainjob_manifest(**{**kwargs, **overrides})


def run(client: kubernetes.client.ApiClient, job: dict[str, Any], timeout_s: float = 10.0) -> tuple[Any, list[str]]:
    lines: list[str] = []
    start = time.monotonic()
    try:
        return run_trainjob(job, timeout_s=timeout_s, poll_s=0.05, log=lines.append, api_client=client), lines
    finally:
        assert time.monotonic() - start < timeout_s + 3


def test_success_posts_the_manifest_streams_rank0_and_returns_the_final_job(cluster: Any) -> None:
    state, client = cluster
    job = manifest()
    final, lines = run(client, job)
    assert state.posted == [job]  # exactly what trainjob_manifest built
    assert final["metadata"]["name"] == NAME
    assert [c["type"] for c in final["status"]["conditions"]] == ["Created", "Complete"]
    # the rank-0 pod's log, whole and in order, lines rejoined across chunks; no other pod's log
    assert [line for line in lines if line.startswith("[rank0]")] == RANK0
    assert not [line for line in lines if line.startswith("[other]")]
    assert any("Created (JobSetCreated)" in line for line in lines)
    assert any("Complete (JobSetCompleted)" in line for line in lines)
    assert not [r for r in state.requests if r[0] not in ("GET", "POST")]


def test_failure_raises_naming_the_reason_after_streaming_the_log(cluster: Any) -> None:
    state, client = cluster
    state.script = [CREATED, RUNNING, FAILED]
    with pytest.raises(TrainJobFailed) as raised:
        run(client, manifest())
    assert str(raised.value) == (f"TrainJob {NAME} failed: BackoffLimitExceeded: "
                                 "Job node-0 has reached the specified backoff limit")


def test_failure_log_is_streamed(cluster: Any) -> None:
    state, client = cluster
    state.script = [CREATED, RUNNING, FAILED]
    lines: list[str] = []
    with pytest.raises(TrainJobFailed):
        run_trainjob(manifest(), timeout_s=10, poll_s=0.05, log=lines.append, api_client=client)
    assert [line for line in lines if line.startswith("[rank0]")] == RANK0


def test_existing_job_of_a_retried_step_is_attached_to(cluster: Any) -> None:
    state, client = cluster
    job = manifest()
    state.jobs[NAME] = copy.deepcopy(job)  # the first attempt created it
    final, lines = run(client, job)
    assert final["status"]["conditions"][-1]["type"] == "Complete"
    assert [r[0] for r in state.requests].count("POST") == 1
    assert any("already exists (a retried step): attaching" in line for line in lines)
    assert [line for line in lines if line.startswith("[rank0]")] == RANK0


def test_existing_job_with_other_arguments_is_not_adopted(cluster: Any) -> None:
    state, client = cluster
    state.jobs[NAME] = manifest(train_args=["--recipe", "recipes/ov-7b.yaml", "--stage", "stage2_ov"])
    with pytest.raises(RuntimeError, match=f"TrainJob {NS}/{NAME} already exists with a different args"):
        run(client, manifest())


def test_timeout_raises_clearly_and_leaves_the_job(cluster: Any) -> None:
    state, client = cluster
    state.script = [CREATED]  # never scheduled: the pod stays Pending
    with pytest.raises(TimeoutError) as raised:
        run(client, manifest(), timeout_s=0.4)
    message = str(raised.value)
    assert f"TrainJob {NS}/{NAME} did not finish within 0.4 s (Created)" in message
    assert f"kubectl -n {NS} describe trainjob {NAME}" in message
    assert NAME in state.jobs and all(method != "DELETE" for method, _ in state.requests)


def test_transient_api_errors_are_retried(cluster: Any) -> None:
    state, client = cluster
    state.fail_gets = [503, 500]
    final, lines = run(client, manifest())
    assert final["status"]["conditions"][-1]["type"] == "Complete"
    assert [line for line in lines if "API error" in line] == [
        f"[trainjob] TrainJob {NS}/{NAME}: API error, retrying: {code} {reason}: etcdserver: request timed out"
        for code, reason in ((503, "Service Unavailable"), (500, "Internal Server Error"))]


def test_log_errors_never_fail_a_successful_job(cluster: Any) -> None:
    state, client = cluster
    state.log_status = 500
    final, lines = run(client, manifest())
    assert final["status"]["conditions"][-1]["type"] == "Complete"
    assert f"[trainjob] log of pod {NAME}-node-0-0-xnode0 interrupted: 500 Internal Server Error: kubelet unreachable" in lines
    assert not any(line.startswith("[rank0]") for line in lines)


def test_a_deleted_job_fails_the_wait(cluster: Any) -> None:
    state, client = cluster
    state.script = [CREATED, RUNNING]

    def delete_soon() -> None:
        time.sleep(0.2)
        with state.lock:
            state.jobs.clear()

    threading.Thread(target=delete_soon, daemon=True).start()
    with pytest.raises(TrainJobFailed, match="disappeared"):
        run(client, manifest())


def test_a_log_stream_that_stays_open_does_not_hold_up_the_timeout(cluster: Any) -> None:
    state, client = cluster
    state.script = [CREATED, RUNNING]  # running for ever, its log stream open
    state.log_open.clear()
    lines: list[str] = []
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        run_trainjob(manifest(), timeout_s=1.0, poll_s=0.05, log=lines.append, api_client=client)
    assert time.monotonic() - start < 2.5  # the stream was cut, not waited for (LOG_GRACE_S is 30 s)
    assert [line for line in lines if line.startswith("[rank0]")] == RANK0  # streamed live, while running

"""pipelines.submit against a fake KFP API server: the real kfp.Client and kfp_server_api speak HTTP to a
threaded stand-in for the KFP v2beta1 REST endpoints this flow uses (a real one needs Kubernetes)."""

import email.parser
import email.policy
import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from pipelines.submit import SubmitError, submit_pipeline

pytestmark = pytest.mark.integration

TOKEN = "tok-3f9a-very-secret"
API = "/apis/v2beta1"


class FakeKFP(ThreadingHTTPServer):
    """Stores what it receives; answers like the KFP API server (snake_case JSON, 409 on a duplicate version)."""

    daemon_threads = True

    def __init__(self, token: str | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.requests: list[dict[str, Any]] = []
        self.unknown: list[str] = []
        self.pipelines: list[dict[str, Any]] = []
        self.versions: list[dict[str, Any]] = []
        self.experiments: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.ids = (f"id-{i}" for i in itertools.count(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and r["path"] == API + path]


def _named(query: dict[str, str], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if "filter" not in query:
        return items
    (pred,) = json.loads(query["filter"])["predicates"]
    assert pred["key"] == "display_name" and pred["operation"] in ("EQUALS", 1), pred
    return [i for i in items if i["display_name"] == pred["stringValue"]]


class _Handler(BaseHTTPRequestHandler):
    server: FakeKFP

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        srv = self.server
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = {"method": method, "path": url.path, "query": query, "headers": headers, "body": body}
        srv.requests.append(req)
        if srv.token and self.headers.get("Authorization") != f"Bearer {srv.token}":
            return self._send(401, {"error": "Unauthenticated", "code": 16, "message": "Unauthenticated"})
        path = url.path.removeprefix(API)
        if method == "GET" and path == "/healthz":
            return self._send(200, {"multi_user": False})
        if method == "GET" and path == "/pipelines":
            return self._send(200, {"pipelines": _named(query, srv.pipelines)})
        if method == "POST" and path in ("/pipelines/upload", "/pipelines/upload_version"):
            form = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body
            )
            (part,) = [p for p in form.iter_parts()
                       if p.get_param("name", header="content-disposition") == "uploadfile"]
            spec = part.get_payload(decode=True).decode()
            desc = query.get("description", "")
            if path == "/pipelines/upload":
                if _named({"filter": _filter(query["name"])}, srv.pipelines):
                    return self._send(409, {"error": "Failed to create a pipeline and a pipeline version"})
                pipeline = {"pipeline_id": next(srv.ids), "display_name": query["name"], "name": query["name"],
                            "description": desc, "namespace": query.get("namespace", "")}
                srv.pipelines.append(pipeline)
                pid, name, out = pipeline["pipeline_id"], query["name"], pipeline
            else:
                pid, name = query["pipelineid"], query["name"]
                if any(v["pipeline_id"] == pid and v["display_name"] == name for v in srv.versions):
                    return self._send(409, {"error": "Failed to create a pipeline version"})
                out = None
            version = {"pipeline_id": pid, "pipeline_version_id": next(srv.ids), "display_name": name,
                       "name": name, "description": desc, "spec_text": spec}
            srv.versions.append(version)
            return self._send(200, out or {k: v for k, v in version.items() if k != "spec_text"})
        if method == "GET" and path.startswith("/pipelines/") and path.endswith("/versions"):
            pid = path.split("/")[2]
            mine = [{k: v for k, v in x.items() if k != "spec_text"} for x in srv.versions if x["pipeline_id"] == pid]
            return self._send(200, {"pipeline_versions": _named(query, mine)})
        if method == "GET" and path == "/experiments":
            return self._send(200, {"experiments": _named(query, srv.experiments)})
        if method == "POST" and path == "/experiments":
            exp = {**json.loads(body), "experiment_id": next(srv.ids)}
            srv.experiments.append(exp)
            return self._send(200, exp)
        if method == "POST" and path == "/runs":
            run = {**json.loads(body), "run_id": next(srv.ids), "state": "PENDING"}
            srv.runs.append(run)
            return self._send(200, run)
        srv.unknown.append(f"{method} {self.path}")
        return self._send(404, {"error": f"fake KFP: no route for {method} {url.path}"})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")


def _filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


@pytest.fixture(autouse=True)
def _isolated_kfp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ~/.config/kfp/context.json, no KFP_* environment from the developer's shell."""
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for var in ("KFP_TOKEN", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fake_kfp_factory() -> Iterator[Callable[[str | None], FakeKFP]]:
    servers: list[FakeKFP] = []

    def start(token: str | None = TOKEN) -> FakeKFP:
        srv = FakeKFP(token)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()
        assert not srv.unknown, f"kfp.Client called endpoints the fake does not implement: {srv.unknown}"


@pytest.fixture
def compile_pipeline(tmp_path: Path) -> Callable[[int], Path]:
    """A trivial compiled pipeline with two parameters; `default` changes the file's content."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
    def echo(message: str, count: int) -> str:
        return message * count

    def build(default: int) -> Path:
        @dsl.pipeline(name="submit-test")
        def pipe(message: str, count: int = default) -> None:
            echo(message=message, count=count)

        path = tmp_path / f"pipe-{default}.yaml"
        compiler.Compiler().compile(pipe, str(path))
        return path

    return build


def test_submit_uploads_versions_and_runs(
    fake_kfp_factory: Callable[..., FakeKFP],
    compile_pipeline: Callable[[int], Path],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    srv = fake_kfp_factory()
    v1, v2 = compile_pipeline(1), compile_pipeline(2)
    assert v1.read_bytes() != v2.read_bytes()

    t0 = time.monotonic()
    first = submit_pipeline(srv.url, str(v1), "ov-train", run_name="r1", params={"message": "hi", "count": 3},
                            token=TOKEN)
    # first submit: one pipeline upload (with the file), one experiment created, one run of that version
    assert len(srv.calls("POST", "/pipelines/upload")) == 1 and not srv.calls("POST", "/pipelines/upload_version")
    assert srv.pipelines[0]["display_name"] == "ov-train"
    assert srv.versions[0]["spec_text"] == v1.read_text()
    assert [e["display_name"] for e in srv.experiments] == ["onevision"]
    (run,) = srv.runs
    assert run["display_name"] == "r1" and run["experiment_id"] == first["experiment_id"]
    assert run["runtime_config"]["parameters"] == {"message": "hi", "count": 3}
    assert run["pipeline_version_reference"] == {"pipeline_id": first["pipeline_id"],
                                                 "pipeline_version_id": first["version_id"]}
    assert "pipeline_spec" not in run  # runs the uploaded version, does not inline the spec
    assert first == {"pipeline_id": srv.pipelines[0]["pipeline_id"],
                     "version_id": srv.versions[0]["pipeline_version_id"],
                     "experiment_id": srv.experiments[0]["experiment_id"], "run_id": run["run_id"],
                     "run_url": f"{srv.url}/#/runs/details/{run['run_id']}"}

    # a changed file: a new version of the same pipeline, named <pipeline>-<sha256[:12]>; experiment reused
    second = submit_pipeline(srv.url, str(v2), "ov-train", params={"message": "x"}, token=TOKEN)
    (upload_v,) = srv.calls("POST", "/pipelines/upload_version")
    assert upload_v["query"]["pipelineid"] == first["pipeline_id"]
    assert upload_v["query"]["name"] == f"ov-train-{hashlib.sha256(v2.read_bytes()).hexdigest()[:12]}"
    assert len(srv.pipelines) == 1 and len(srv.calls("POST", "/pipelines/upload")) == 1
    assert srv.versions[1]["spec_text"] == v2.read_text()
    assert second["pipeline_id"] == first["pipeline_id"] and second["version_id"] != first["version_id"]
    assert second["experiment_id"] == first["experiment_id"] and len(srv.experiments) == 1
    assert srv.runs[1]["pipeline_version_reference"]["pipeline_version_id"] == second["version_id"]
    assert srv.runs[1]["runtime_config"]["parameters"] == {"message": "x"}

    # the same files again: no upload at all, the existing versions run (also the pipeline's first version)
    uploads = len(srv.calls("POST", "/pipelines/upload")) + len(srv.calls("POST", "/pipelines/upload_version"))
    third = submit_pipeline(srv.url, str(v2), "ov-train", params={"message": "y"}, token=TOKEN)
    fourth = submit_pipeline(srv.url, str(v1), "ov-train", params={"message": "z"}, token=TOKEN)
    assert len(srv.calls("POST", "/pipelines/upload")) + len(srv.calls("POST", "/pipelines/upload_version")) \
        == uploads
    assert third["version_id"] == second["version_id"] and fourth["version_id"] == first["version_id"]
    assert len(srv.versions) == 2 and len(srv.runs) == 4 and third["run_id"] != second["run_id"]
    # an explicit version name that already holds another file fails instead of running that other file
    with pytest.raises(SubmitError, match="holds another file"):
        submit_pipeline(srv.url, str(v1), "ov-train", params={"message": "z"}, token=TOKEN,
                        version_name=upload_v["query"]["name"])
    assert len(srv.runs) == 4
    assert time.monotonic() - t0 < 10

    # every request carried the bearer token; the token shows in no log record and nothing printed
    assert srv.requests and all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in srv.requests)
    out, err = capsys.readouterr()
    assert TOKEN not in out + err + caplog.text
    assert out == ""  # kfp.Client's printed links go to stderr: stdout stays the caller's


def test_unknown_param_fails_before_any_request(
    fake_kfp_factory: Callable[..., FakeKFP], compile_pipeline: Callable[[int], Path]
) -> None:
    srv = fake_kfp_factory()
    with pytest.raises(SubmitError) as info:
        submit_pipeline(srv.url, str(compile_pipeline(1)), "ov-train", params={"message": "m", "mesage": "m"},
                        token=TOKEN)
    msg = str(info.value)
    assert srv.url in msg and "'mesage'" in msg and "['count', 'message']" in msg
    with pytest.raises(SubmitError, match=r"required pipeline parameter\(s\) \['message'\]"):
        submit_pipeline(srv.url, str(compile_pipeline(1)), "ov-train", params={"count": 2}, token=TOKEN)
    assert srv.requests == []


def test_rejected_token_names_the_host(
    fake_kfp_factory: Callable[..., FakeKFP],
    compile_pipeline: Callable[[int], Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    srv = fake_kfp_factory(token="the-right-one")
    monkeypatch.setenv("KFP_TOKEN", TOKEN)  # token=None: taken from $KFP_TOKEN
    t0 = time.monotonic()
    with pytest.raises(SubmitError) as info:
        submit_pipeline(srv.url, str(compile_pipeline(1)), "ov-train", params={"message": "m"})
    assert time.monotonic() - t0 < 5  # one probe, not kfp.Client's 5 attempts 5 s apart
    msg = str(info.value)
    assert srv.url in msg and "401" in msg and "credentials rejected" in msg
    assert TOKEN not in msg and TOKEN not in caplog.text and info.value.__cause__ is None
    assert srv.requests[0]["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert not srv.runs and not srv.pipelines


def test_unreachable_host(compile_pipeline: Callable[[int], Path]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SubmitError, match=r"KFP at http://127\.0\.0\.1:\d+: connecting failed: cannot reach"):
        submit_pipeline(host, str(compile_pipeline(1)), "ov-train", params={"message": "m"}, token=TOKEN)


def test_onevision_submit_compiles_the_recipe_and_passes_typed_params(
    fake_kfp_factory: Callable[..., FakeKFP], capsys: pytest.CaptureFixture[str]
) -> None:
    """`onevision submit`: the recipe's real pipeline, typed --param values (numbers, JSON), the service account."""
    import yaml

    from onevision_cli.main import main
    from pipelines.compile import COMPILED_DIR

    srv = fake_kfp_factory()
    code = main(["submit", "--host", srv.url, "--recipe", "recipes/tiny.yaml", "--token", TOKEN,
                 "--param", "stage2_si_learning_rate=1e-5", "--param", "stage1_max_steps=3",
                 "--param", 'gpu_node_selector={"pool": "h200"}', "--param", "deploy_env=staging",
                 "--param", "run_id=2026"])
    assert code == 0
    (pipeline,) = srv.pipelines
    assert pipeline["display_name"] == "onevision-tiny"
    uploaded = list(yaml.safe_load_all(srv.versions[0]["spec_text"]))
    assert uploaded == list(yaml.safe_load_all((COMPILED_DIR / "tiny.yaml").read_text()))  # the committed one
    (run,) = srv.runs
    assert run["runtime_config"]["parameters"] == {"stage2_si_learning_rate": 1e-5, "stage1_max_steps": 3,
                                                   "gpu_node_selector": {"pool": "h200"}, "deploy_env": "staging",
                                                   "run_id": "2026"}  # typed by the pipeline's declarations
    assert run["service_account"] == "onevision-pipeline"
    assert json.loads(capsys.readouterr().out)["run_id"] == run["run_id"]
    assert main(["submit", "--host", srv.url, "--recipe", "recipes/tiny.yaml", "--param", "stage1_max_steps=many"]) == 1
    assert "stage1_max_steps: 'many' is not a number_integer" in capsys.readouterr().err
    assert len(srv.runs) == 1

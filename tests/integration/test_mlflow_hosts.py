"""In-cluster callers reach MLflow (issue 20, point 1), checked against the real `mlflow server`.

MLflow 3's security middleware answers 403 to a Host header outside localhost and private IPs unless the
server lists it in --allowed-hosts. The Deployment's own command and arguments, read from the rendered
platform overlays, start a real server here. Only three arguments differ from the manifest, because the
test has no cluster: --host (127.0.0.1, not 0.0.0.0), --port (a free one) and --backend-store-uri (SQLite
under tmp_path instead of the in-cluster Postgres). Everything else, --allowed-hosts included, is the
manifest's. Requests then carry every Host header a pod may send for the Service (from the rendered Service
and the endpoints ConfigMap), and must get an answer; an unlisted host must get 403; and the same server
without --allowed-hosts must refuse the in-cluster host (the control: the failure the issue describes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import free_port_block

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAYS = sorted(p.name for p in (ROOT / "infra/platform/overlays").iterdir())
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def rendered(overlay: str) -> list[dict[str, Any]]:
    done = subprocess.run([str(BIN / "kubectl"), "kustomize", str(ROOT / "infra/platform/overlays" / overlay)],
                          capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def manifest_command() -> tuple[list[str], dict[str, str]]:
    """The MLflow container's command + args (the same in every overlay) and its literal env values."""
    commands = set()
    for overlay in OVERLAYS:
        (container,) = find(rendered(overlay), "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
        commands.add(tuple(container.get("command", []) + container.get("args", [])))
    assert len(commands) == 1, commands
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return list(commands.pop()), env


def substitute(argv: list[str], replace: dict[str, str]) -> list[str]:
    """argv with the named `--flag=value` / `--flag value` options' values replaced (each must be present)."""
    out, seen, i = [], set(), 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in replace:
            seen.add(flag)
            out.append(f"{flag}={replace[flag]}")
            i += 1 if "=" in argv[i] else 2
            continue
        out.append(argv[i])
        i += 1
    assert seen == set(replace), f"manifest lacks {set(replace) - seen}"
    return out


def without(argv: list[str], flag: str) -> list[str]:
    assert any(a.split("=", 1)[0] == flag for a in argv), f"manifest has no {flag}"
    return [a for a in argv if a.split("=", 1)[0] != flag]


def service_hosts() -> list[str]:
    """Every Host header a pod may send for the mlflow Service: the short name, name.namespace, .svc and the
    cluster-local FQDN, each with and without the Service port."""
    objects = rendered(OVERLAYS[0])
    service = find(objects, "Service", "mlflow")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    (port,) = [p["port"] for p in service["spec"]["ports"]]
    names = [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
    hosts = [h for n in names for h in (n, f"{n}:{port}")]
    configured = urlsplit(find(objects, "ConfigMap", "onevision-endpoints")["data"]["mlflow_tracking_uri"]).netloc
    assert configured in hosts  # what the pipeline steps actually call
    return hosts


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_SERVER_")}  # no leaked host lists
    environ.update(env)
    executable = BIN / argv[0] if (BIN / argv[0]).exists() else argv[0]  # the venv's mlflow, as the image's
    with log.open("w") as out:
        return subprocess.Popen([str(executable), *argv[1:]], stdout=out, stderr=subprocess.STDOUT, env=environ,
                                start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow not ready in 120 s:\n{log.read_text()[-3000:]}")


def status(port: int, host: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{SEARCH}", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """Two real servers, started together: the manifest's arguments, and the same without --allowed-hosts."""
    argv, env = manifest_command()
    assert argv[:2] == ["mlflow", "server"], argv
    procs, ports = [], {}
    try:
        for label, args in (("manifest", argv), ("no-allowed-hosts", without(argv, "--allowed-hosts"))):
            state = tmp_path_factory.mktemp(label)
            port = free_port_block(1)
            args = substitute(args, {"--host": "127.0.0.1", "--port": str(port),
                                     "--backend-store-uri": f"sqlite:///{state / 'mlflow.db'}"})
            procs.append((start(args, env, state / "mlflow.log"), port, state / "mlflow.log"))
            ports[label] = port
        for proc, port, log in procs:
            wait_ready(proc, port, log)
        yield ports
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def test_in_cluster_host_headers_get_an_answer(servers: dict[str, int]) -> None:
    answers = {host: status(servers["manifest"], host) for host in service_hosts()}
    assert answers == {host: 200 for host in answers}
    # kubectl port-forward: the browser sends localhost:<local port>
    assert status(servers["manifest"], "localhost:8080") == 200


def test_an_unlisted_host_is_refused(servers: dict[str, int]) -> None:
    assert status(servers["manifest"], "evil.example.com") == 403
    assert status(servers["manifest"], "mlflow.onevision-system.svc.evil.example.com:5000") == 403


def test_without_the_flag_the_in_cluster_host_is_refused(servers: dict[str, int]) -> None:
    """The control: MLflow's defaults (localhost, private IPs) refuse the Service name, as issue 20 found."""
    assert status(servers["no-allowed-hosts"], "mlflow.onevision-system.svc:5000") == 403
    assert status(servers["no-allowed-hosts"], "127.0.0.1") == 200  # the server itself answers

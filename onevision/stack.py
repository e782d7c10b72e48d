"""The embedded local stack on 127.0.0.1: SeaweedFS as the S3 store and an MLflow tracking server.

    onevision stack up                 # idempotent; waits until S3 takes a signed PUT and MLflow answers
    eval "$(onevision stack env)"      # AWS_ENDPOINT_URL, AWS_*_KEY, MLFLOW_TRACKING_URI, ...
    onevision stack status
    onevision stack down               # stops exactly the processes `up` started (pid files)

State (pid files, logs, data, generated credentials) lives under --state-dir (default .onevision/stack,
or ONEVISION_STACK_DIR). Credentials are random per state dir, stored 0600, never in code.
SeaweedFS uses a block of ten ports from --s3-port (S3 itself, then master, volume, filer, gRPC).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
BUCKETS = ("onevision", "mlflow")
MLFLOW_BUCKET, DATA_BUCKET = "mlflow", "onevision"
DEFAULT_STATE_DIR = ".onevision/stack"


class StackError(RuntimeError):
    """The local stack could not start, or is in a state `up` will not paper over."""


@dataclass(frozen=True)
class StackInfo:
    state_dir: str
    s3_endpoint: str
    mlflow_uri: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        """Environment for clients (minio, boto3, MLflow) to use this stack."""
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "ONEVISION_BUCKET": DATA_BUCKET,
        }


def default_state_dir() -> Path:
    return Path(os.environ.get("ONEVISION_STACK_DIR", DEFAULT_STATE_DIR)).absolute()


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StackError(f"'{name}' not found next to {sys.executable} or on PATH; run `make run` to install")
    return found


def port_free(port: int) -> bool:
    """True if `port` can be bound on 127.0.0.1 now (what `stack up` and `serve` check before starting)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            return True
        except OSError:
            return False


def free_port_block(size: int) -> int:
    """A base port such that base..base+size-1 are all free on 127.0.0.1 (SeaweedFS takes 10 in a row)."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 40000)
        sockets = []
        try:
            for port in range(base, base + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no block of {size} free ports found")


def _alive(pid: int, marker: str) -> bool:
    """True if pid runs and its command line contains marker (so a recycled pid is never ours)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


def _credentials(state: Path) -> tuple[str, str]:
    path = state / "credentials.json"
    if path.exists():
        creds = json.loads(path.read_text())
        return creds["access_key"], creds["secret_key"]
    access, secret = "ov" + secrets.token_hex(8), secrets.token_urlsafe(30)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"access_key": access, "secret_key": secret}, out)
    return access, secret


def _spawn(state: Path, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, cwd=state, start_new_session=True)
    (state / f"{name}.pid").write_text(str(proc.pid))
    return proc


def _wait(what: str, check, timeout: float, proc: subprocess.Popen | None, log: Path) -> None:
    """Poll `check` until it passes; fail early if the process we started has exited."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise StackError(f"{what} exited during start-up (code {proc.returncode}); last log lines:\n{tail}")
        try:
            if check():
                return
        except Exception as err:  # not ready yet
            last = err
        time.sleep(0.5)
    raise StackError(f"{what} not ready after {timeout:.0f}s (last error: {last}); see {log}")


def _s3_ready(info: StackInfo) -> bool:
    """Ready means a signed PUT into every bucket succeeds, not merely that the port answers."""
    import io

    import urllib3
    from minio import Minio

    client = Minio(info.s3_endpoint.split("://", 1)[1], access_key=info.access_key,
                   secret_key=info.secret_key, secure=False, region="us-east-1",
                   http_client=urllib3.PoolManager(retries=False, timeout=5))
    for bucket in BUCKETS:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        client.put_object(bucket, ".ready", io.BytesIO(b"ok"), 2)
    return True


def _mlflow_ready(info: StackInfo) -> bool:
    with urllib.request.urlopen(f"{info.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                timeout=5) as response:
        return response.status == 200


def _start_s3(state: Path, info: StackInfo, s3_port: int) -> subprocess.Popen:
    ports = dict(zip(
        ["s3.port", "master.port", "volume.port", "filer.port", "master.port.grpc", "volume.port.grpc",
         "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc"],
        range(s3_port, s3_port + 10)))
    busy = [f"{k}={p}" for k, p in ports.items() if not port_free(p)]
    if busy:
        raise StackError(f"ports in use on {HOST}: {', '.join(busy)}; choose another --s3-port")
    (state / "s3").mkdir(exist_ok=True)
    s3_config = state / "s3.json"
    s3_config.write_text(json.dumps({"identities": [{
        "name": "onevision",
        "credentials": [{"accessKey": info.access_key, "secretKey": info.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    s3_config.chmod(0o600)
    argv = [_bin("weed"), "mini", f"-dir={state / 's3'}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.config={s3_config}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-master.telemetry=false", f"-bucket={','.join(BUCKETS)}",
            "-s3.allowDeleteBucketNotEmpty=false", *[f"-{k}={p}" for k, p in ports.items()]]
    return _spawn(state, "s3", argv, {})


def _start_mlflow(state: Path, info: StackInfo, mlflow_port: int) -> subprocess.Popen:
    if not port_free(mlflow_port):
        raise StackError(f"port {mlflow_port} in use on {HOST}; choose another --mlflow-port")
    argv = [_bin("mlflow"), "server", "--host", HOST, "--port", str(mlflow_port),
            "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts", "--serve-artifacts",
            "--workers", "1"]
    env = {k: v for k, v in info.env().items() if k != "MLFLOW_TRACKING_URI"}
    # Job execution spawns a huey worker: ~2 GB and slower start-up for a feature we do not use.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return _spawn(state, "mlflow", argv, env)


def _read_info(state: Path) -> StackInfo | None:
    path = state / "stack.json"
    return StackInfo(**json.loads(path.read_text())) if path.exists() else None


def _pid(state: Path, name: str) -> int | None:
    path = state / f"{name}.pid"
    return int(path.read_text()) if path.exists() else None


_MARKERS = {"s3": "weed", "mlflow": "mlflow"}


def stack_status(state_dir: str | os.PathLike[str] | None = None) -> dict[str, object]:
    """What runs, where: {"s3": {"pid", "running", "endpoint"}, "mlflow": {..., "ui"}}."""
    state = Path(state_dir) if state_dir else default_state_dir()
    info = _read_info(state)
    out: dict[str, object] = {"state_dir": str(state)}
    for name in ("s3", "mlflow"):
        pid = _pid(state, name)
        out[name] = {"pid": pid, "running": bool(pid and _alive(pid, _MARKERS[name]))}
    if info:
        out["s3"]["endpoint"] = info.s3_endpoint  # type: ignore[index]
        out["mlflow"]["ui"] = info.mlflow_uri  # type: ignore[index]
    return out


def stack_up(state_dir: str | os.PathLike[str] | None = None, s3_port: int = 8333,
             mlflow_port: int = 5000, timeout: float = 120.0,
             services: tuple[str, ...] = ("s3", "mlflow")) -> StackInfo:
    """Start (or find running) SeaweedFS S3 and MLflow on loopback and wait until both really serve.

    `services=("s3",)` starts the S3 store alone (MLflow needs it, not the other way round).
    """
    unknown = set(services) - set(_MARKERS)
    if unknown or "s3" not in services:
        raise StackError(f"services must include 's3' and be among {sorted(_MARKERS)}, got {services}")
    state = Path(state_dir).absolute() if state_dir else default_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    previous = _read_info(state)
    status = stack_status(state)
    if previous and any(status[name]["running"] for name in _MARKERS):  # type: ignore[index]
        s3_port = int(previous.s3_endpoint.rsplit(":", 1)[1])
        mlflow_port = int(previous.mlflow_uri.rsplit(":", 1)[1])
    access, secret = _credentials(state)
    info = StackInfo(str(state), f"http://{HOST}:{s3_port}", f"http://{HOST}:{mlflow_port}", access, secret)
    (state / "stack.json").write_text(json.dumps(asdict(info), indent=1))
    (state / "stack.json").chmod(0o600)

    started: list[subprocess.Popen] = []
    try:
        s3_pid, s3_proc = _pid(state, "s3"), None
        if not (s3_pid and _alive(s3_pid, "weed")):
            s3_proc = _start_s3(state, info, s3_port)
            started.append(s3_proc)
        _wait("SeaweedFS S3", lambda: _s3_ready(info), timeout, s3_proc, state / "logs" / "s3.log")
        if "mlflow" not in services:
            return info
        ml_pid, ml_proc = _pid(state, "mlflow"), None
        if not (ml_pid and _alive(ml_pid, "mlflow")):
            ml_proc = _start_mlflow(state, info, mlflow_port)
            started.append(ml_proc)
        _wait("MLflow server", lambda: _mlflow_ready(info), timeout, ml_proc, state / "logs" / "mlflow.log")
    except BaseException:
        for proc in started:  # a failed start leaves nothing running behind it
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        raise
    return info


def _stop(pid: int, marker: str, grace: float = 15.0) -> None:
    # Each service was started as a session leader, so its group holds exactly it and its workers.
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid, marker):
        time.sleep(0.2)
    if _alive(pid, marker):
        os.killpg(pid, signal.SIGKILL)


def stack_down(state_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Stop the services this state dir started (and only those); returns the names stopped."""
    state = Path(state_dir) if state_dir else default_state_dir()
    stopped = []
    for name in ("mlflow", "s3"):
        pid = _pid(state, name)
        if pid and _alive(pid, _MARKERS[name]):
            _stop(pid, _MARKERS[name])
            stopped.append(name)
        (state / f"{name}.pid").unlink(missing_ok=True)
    return stopped


def stack_info(state_dir: str | os.PathLike[str] | None = None) -> StackInfo:
    """The running stack's endpoints and credentials; StackError if it is not up."""
    state = Path(state_dir) if state_dir else default_state_dir()
    info, status = _read_info(state), stack_status(state)
    if not info or not (status["s3"]["running"] and status["mlflow"]["running"]):  # type: ignore[index]
        raise StackError(f"the local stack in {state} is not running: start it with `onevision stack up`")
    return info

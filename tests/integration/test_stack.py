"""The local stack itself: loopback only, idempotent, status, env."""

from __future__ import annotations

from pathlib import Path

import psutil

from onevision import stack
from onevision_cli.main import main


def _listening(pid: int) -> set[str]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    conns = [c for p in procs for c in getattr(p, "net_connections", p.connections)(kind="inet")]
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}


def test_services_listen_on_loopback_only(local_stack: stack.StackInfo) -> None:
    status = stack.stack_status(local_stack.state_dir)
    for name in ("s3", "mlflow"):
        assert status[name]["running"]
        assert _listening(status[name]["pid"]) == {"127.0.0.1"}


def test_up_is_idempotent_and_env_points_at_it(local_stack: stack.StackInfo, capsys) -> None:
    before = stack.stack_status(local_stack.state_dir)
    again = stack.stack_up(local_stack.state_dir, s3_port=1, mlflow_port=2)  # ports of a running stack win
    assert again == local_stack
    assert stack.stack_status(local_stack.state_dir) == before
    assert main(["stack", "env", "--state-dir", local_stack.state_dir]) == 0
    assert f"export MLFLOW_TRACKING_URI={local_stack.mlflow_uri}" in capsys.readouterr().out
    creds = Path(local_stack.state_dir, "credentials.json")
    assert creds.stat().st_mode & 0o077 == 0, "credentials are private to the user"


def test_env_of_a_stopped_stack_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["stack", "env", "--state-dir", str(tmp_path)]) == 1
    assert "not running" in capsys.readouterr().err


def test_a_failed_start_leaves_nothing_running(tmp_path: Path) -> None:
    """MLflow cannot bind a port S3 already holds: S3 must not be left behind."""
    from tests.conftest import free_port_block

    base = free_port_block(10)
    try:
        stack.stack_up(tmp_path, s3_port=base, mlflow_port=base, timeout=60)
    except stack.StackError as err:
        assert "in use" in str(err)
    else:
        raise AssertionError("a port clash must fail")
    pid = int((tmp_path / "s3.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or b"weed" not in Path(f"/proc/{pid}/cmdline").read_bytes()

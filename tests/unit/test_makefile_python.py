"""`make run` / `make test` stop at once, naming the Python they found, when it is not 3.11 (pyproject:
requires-python >=3.11,<3.12), instead of pip failing minutes later.

    .venv/bin/python -m pytest tests/unit/test_makefile_python.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def python_check(**variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", "-C", str(ROOT), "python-check", *(f"{k}={v}" for k, v in variables.items())],
                          capture_output=True, text=True, timeout=60, check=False)


def fake_python(path: Path, version: str) -> Path:
    """An interpreter that says it is `version` and fails the 3.11 check, as a python3.12 would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\n[ "$1" = "--version" ] && {{ echo "Python {version}"; exit 0; }}\nexit 1\n')
    path.chmod(0o755)
    return path


def test_another_python_is_named_with_what_to_do(tmp_path: Path) -> None:
    done = python_check(PYTHON=str(fake_python(tmp_path / "python3", "3.12.4")), VENV=str(tmp_path / "venv"))
    assert done.returncode != 0 and not (tmp_path / "venv").exists()
    assert f"the project needs Python 3.11 (pyproject.toml: requires-python >=3.11,<3.12); PYTHON={tmp_path}/python3 " \
           "is Python 3.12.4" in done.stderr
    assert "uv python install 3.11" in done.stderr
    done = python_check(PYTHON=str(tmp_path / "missing"), VENV=str(tmp_path / "venv"))
    assert done.returncode != 0 and f"PYTHON={tmp_path}/missing is not found" in done.stderr


def test_a_venv_of_another_python_is_named(tmp_path: Path) -> None:
    fake_python(tmp_path / "venv" / "bin" / "python", "3.12.4")
    done = python_check(VENV=str(tmp_path / "venv"))
    assert done.returncode != 0
    assert f"{tmp_path}/venv was made with Python 3.12.4, the project needs Python 3.11: rm -rf {tmp_path}/venv" \
           in done.stderr


def test_this_python_passes(tmp_path: Path) -> None:
    assert sys.version_info[:2] == (3, 11)
    done = python_check(PYTHON=sys.executable, VENV=str(tmp_path / "none"))
    assert done.returncode == 0, done.stderr

"""The steps' own command lines (`python -m components.<step>.core`, `python -m model.train`,
`python -m serving.manifests`) answer bad input with one line and status 2, a refusal with status 3, never
a traceback; a bug keeps its traceback (onevision/cli_exit.py).

    .venv/bin/python -m pytest tests/unit/test_cli_exit.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from onevision import storage
from onevision.cli_exit import EXIT_BAD_INPUT, EXIT_REFUSED, exit_status, run_command

ROOT = Path(__file__).resolve().parents[2]


def one_line(module: str, *args: str, status: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
    env.pop("ONEVISION_TRACEBACK", None)
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len([line for line in lines if not line.startswith(("[", "WARNING", "W1", "I1"))]) == 1, done.stderr
    return lines[-1]


@pytest.mark.parametrize("module, args, says", [
    ("model.train", ["--recipe", "nope.yaml", "--stage", "stage1", "--data", "/x", "--out", "/tmp/never"],
     "train: recipe file not found"),
    ("components.evaluate.core", ["--recipe", "nope.yaml", "--stage", "stage1", "--model", "/x", "--out", "/y"],
     "evaluate: recipe file not found"),
    ("components.export.core", ["--recipe", "recipes/tiny.yaml", "--model", "/no/such/model", "--out", "/tmp/never"],
     "export: /no/such/model is not a Hugging Face model folder"),
    ("serving.manifests", ["--recipe", "nope.yaml", "--storage-uri", "s3://a/b", "--triton-uri", "s3://a/c",
                           "--out", "/tmp/never"], "manifests: recipe file not found"),
])
def test_bad_input_is_one_line_and_status_2(module: str, args: list[str], says: str) -> None:
    assert one_line(module, *args, status=EXIT_BAD_INPUT).startswith(says)


def test_a_refused_registration_is_one_line_and_status_3(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    storage.publish_dir(tmp_path / "model", tmp_path / "published-model")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "gate.json").write_text('{"passed": true, "reasons": [], "scores": {}}')
    (tmp_path / "eval" / "comparison.md").write_text("| task | ours |\n")
    storage.publish_dir(tmp_path / "eval", tmp_path / "published-eval", metadata={"model": "s3://another/model"})
    line = one_line("components.register.core", "--recipe", "recipes/tiny.yaml", "--model",
                    str(tmp_path / "published-model"), "--evaluation", str(tmp_path / "published-eval"),
                    "--pipeline-run", "r1", status=EXIT_REFUSED)
    assert line.startswith("register: ") and "evaluated s3://another/model" in line


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert exit_status(KeyError("x")) is None and exit_status(ZeroDivisionError()) is None
    with pytest.raises(KeyError):
        run_command("step", lambda: {}["missing"])
    monkeypatch.setenv("ONEVISION_TRACEBACK", "1")  # every error shows its traceback when asked
    with pytest.raises(ValueError):
        run_command("step", lambda: int("not a number"))

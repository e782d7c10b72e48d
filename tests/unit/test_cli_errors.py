"""The `onevision` command answers a user's mistake in one line on stderr with exit 1, never a traceback:
`compile` with a recipe the image cannot carry, `run` with a port the stack cannot take or a missing
recipe. (`serve`'s lines: tests/integration/test_serving_cli.py.)

    .venv/bin/python -m pytest tests/unit/test_cli_errors.py
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from onevision_cli.main import main
from onevision.stack import free_port_block
from pipelines.compile import image_recipe_uri

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "onevision"


def one_line_failure(*args: str, cwd: Path) -> str:
    """Run the real command; it must exit 1 with exactly one line on stderr. Returns that line."""
    done = subprocess.run([str(CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_compile_takes_only_the_recipes_the_image_carries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert image_recipe_uri(ROOT / "recipes/tiny.yaml") == "recipes/tiny.yaml"
    assert image_recipe_uri(ROOT / "recipes/../recipes/tiny.yaml") == "recipes/tiny.yaml"
    for elsewhere in (ROOT / "pipelines/compiled/tiny.yaml",        # in the repository, not in recipes/
                      ROOT / "recipes/../tests/unit/tiny.yaml"):   # `..` does not get a path past the check
        with pytest.raises(ValueError, match=r"not in the repository's recipes/ folder"):
            image_recipe_uri(elsewhere)
    outside = tmp_path / "tiny.yaml"
    shutil.copy(ROOT / "recipes/tiny.yaml", outside)  # a valid recipe, outside the repository
    assert main(["compile", "--recipe", str(outside), "-o", str(tmp_path / "x.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"compile: {outside}: not in the repository's recipes/ folder, the only recipes the project "
                    "image carries; move it there (and rebuild the image), or upload one to S3 and pass its URI as "
                    "recipe_uri at submit")]
    assert not (tmp_path / "x.yaml").exists()


def test_run_with_a_taken_s3_port_says_which_and_the_flag(tmp_path: Path) -> None:
    port = free_port_block(10)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 2))  # SeaweedFS's volume port, inside the S3 block
        line = one_line_failure("run", str(ROOT / "recipes/tiny.yaml"), "--state-dir", str(tmp_path / "stack"),
                                "--s3-port", str(port), "--mlflow-port", str(free_port_block(1)), cwd=tmp_path)
    assert line == f"run: ports in use on 127.0.0.1: volume.port={port + 2}; choose another --s3-port"
    assert not list((tmp_path / "stack").glob("*.pid"))  # nothing was started


def test_run_with_a_missing_recipe_names_it(tmp_path: Path) -> None:
    line = one_line_failure("run", "--recipe", "no-such.yaml", "--state-dir", str(tmp_path / "stack"), cwd=tmp_path)
    assert line.startswith("run: ") and "no-such.yaml" in line
    assert not (tmp_path / "stack").exists()  # the recipe is read before any stack starts


def test_promote_without_a_tracking_server_says_what_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["rollback", "llava-onevision-tiny", "--env", "prod", "--gitops-repo", str(tmp_path / "g.git")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        'rollback: set MLFLOW_TRACKING_URI to the registry\'s tracking server (the local stack: '
        'eval "$(onevision stack env)")']
    assert list(tmp_path.iterdir()) == []  # no stray mlflow.db

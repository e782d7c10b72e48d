"""Shared fixtures. Tests under tests/integration and tests/e2e get their marker from their folder.

    make test                                        # everything
    pytest -m "not integration and not e2e"          # fast feedback, no services
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from onevision.stack import free_port_block  # noqa: F401 - tests import it from here

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Fail fast against the local stack instead of MLflow's minutes of default retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts[0] in ("integration", "e2e"):
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(autouse=True)
def print_left_as_found() -> Iterator[None]:
    """A test that leaves builtins.print swapped fails itself, instead of every later test's output
    beginning with spaces (kfp.local's indenting print can stay installed: pipelines.local.kfp_local_session)."""
    before = builtins.print
    yield
    if builtins.print is not before:
        builtins.print = before
        pytest.fail("this test left builtins.print swapped (a kfp.local run outside kfp_local_session?)")


@pytest.fixture(scope="session")
def tiny_recipe() -> object:
    """recipes/tiny.yaml, validated."""
    from onevision.recipe import load_recipe

    return load_recipe(ROOT / "recipes/tiny.yaml")


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The real local stack (SeaweedFS S3 + MLflow), once per test session, env pointed at it."""
    from onevision import stack

    state = tmp_path_factory.mktemp("stack")
    info = stack.stack_up(state, s3_port=free_port_block(10), mlflow_port=free_port_block(1))
    saved = {k: os.environ.get(k) for k in info.env()}
    os.environ.update(info.env())
    try:
        yield info
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stack.stack_down(state)

"""Fixtures shared by the component tests: kfp.local, a component compiled and checked strictly, and for the
evaluation tests a saved tiny model and a recipe with small evaluation limits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml


@pytest.fixture
def kfp_local(tmp_path: Path) -> Iterator[Path]:
    """kfp.local with the subprocess runner (this interpreter, cwd and environment); reset afterwards,
    the builtin print included (pipelines.local.kfp_local_session)."""
    from pipelines.local import kfp_local_session

    root = tmp_path / "pipeline_root"
    with kfp_local_session(root):
        yield root


@pytest.fixture
def compiled_component(tmp_path: Path) -> Callable[[Any], dict[str, Any]]:
    """Compile a component alone; parse it strictly into PipelineSpec; check it runs on the project
    image and installs nothing at run time. Returns the IR as a dict."""
    from google.protobuf import json_format
    from kfp import compiler
    from kfp.pipeline_spec import pipeline_spec_pb2

    from components import PROJECT_IMAGE

    def compile_and_check(component: Any) -> dict[str, Any]:
        path = tmp_path / f"{component.name}.yaml"
        compiler.Compiler().compile(component, str(path))
        text = path.read_text()
        doc = yaml.safe_load(text)
        json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())  # strict: a misspelt IR field fails
        (executor,) = doc["deploymentSpec"]["executors"].values()
        assert executor["container"]["image"] == PROJECT_IMAGE
        assert "pip install" not in text and "ensurepip" not in text
        return doc

    return compile_and_check


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_recipe) -> Path:
    """recipes/tiny.yaml's model, random weights, saved as an HF folder (with its processor)."""
    from model.builder import build_tiny

    folder = tmp_path_factory.mktemp("model")
    model, processor = build_tiny(tiny_recipe)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def eval_recipe(tmp_path: Path, registered_model: str, limit: int) -> Path:
    """recipes/tiny.yaml with every evaluation task limited to `limit` samples and its own registered model."""
    from onevision.recipe import dump_recipe, load_recipe

    doc = yaml.safe_load(dump_recipe(load_recipe("recipes/tiny.yaml")))
    for task in doc["evaluation"]["tasks"]:
        task["limit"] = limit
    doc["evaluation"]["registered_model"] = registered_model
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="session")
def small_eval_recipe() -> Callable[[Path, str, int], Path]:
    return eval_recipe

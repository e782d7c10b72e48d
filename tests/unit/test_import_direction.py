"""Imports point one way: `pipelines -> components -> (model, serving) -> onevision`, the command line above all.

    .venv/bin/python -m pytest tests/unit/test_import_direction.py -q

Every `import` of our packages is read from the source (module level and inside functions alike: a lazy
import is still a dependency), and checked against the layers of docs/design.md. No two of our modules
may import each other, directly or around a longer loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = "onevision_cli"  # the `onevision` command: above every layer, imported by none
# package -> the packages of ours it may import (besides itself)
MAY_IMPORT = {
    "onevision": set(),
    "model": {"onevision"},
    "serving": {"onevision", "model"},
    "components": {"onevision", "model", "serving"},
    "pipelines": {"onevision", "components"},
    CLI: {"onevision", "model", "serving", "components", "pipelines"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The modules of ours that `path` imports (absolute names; `from pkg import mod` counts pkg.mod)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in MAY_IMPORT}


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for top in MAY_IMPORT for p in sorted((ROOT / top).rglob("*.py"))
            if (ROOT / top).is_dir()} | ({CLI: ROOT / f"{CLI}.py"} if (ROOT / f"{CLI}.py").is_file() else {})


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    edges = {}
    for name, path in modules.items():
        # `from pkg import name` names a module only when pkg.name is one; otherwise it is pkg's attribute
        edges[name] = {m if m in modules else m.rpartition(".")[0] for m in imports_of(path)} - {name}
        edges[name] = {m for m in edges[name] if m in modules}
    return edges


def test_every_layer_imports_only_below_it() -> None:
    wrong = sorted(f"{module} imports {target}" for module, targets in graph().items() for target in targets
                   if target.split(".")[0] != module.split(".")[0]
                   and target.split(".")[0] not in MAY_IMPORT[module.split(".")[0]])
    assert not wrong, "imports against the direction of docs/design.md:\n" + "\n".join(wrong)


def test_nothing_imports_the_command_line() -> None:
    assert (ROOT / f"{CLI}.py").is_file() or (ROOT / CLI).is_dir()
    importers = sorted(m for m, targets in graph().items() if any(t.split(".")[0] == CLI for t in targets)
                       and m.split(".")[0] != CLI)
    assert not importers


def test_no_two_modules_import_each_other() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not loops, f"modules importing each other: {loops}"


HEAVY = ("torch", "transformers", "deepspeed")  # ~10 s to import: only the steps that run a model pay it
# the pipeline steps that run no model (curate tokenizes, train trains; lmms-eval runs in its own process)
LIGHT_STEPS = ("components.preflight.core", "components.evaluate.core", "components.export.core",
               "components.register.core", "components.register.promote", "components.finish.core")


def external_reach(start: str) -> dict[str, str]:
    """Third-party top-level packages a step's process imports -> the module of ours that imports each.
    The step's core counts with its lazy (in-function) imports, since the step calls them; every module it
    reaches counts with its module-level imports (and its packages' __init__)."""
    modules, found, seen = our_modules(), {}, set()
    todo = [(start, True)]
    while todo:
        name, lazy = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(modules[name].read_text())
        for node in (ast.walk(tree) if lazy else tree.body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                if target.split(".")[0] not in MAY_IMPORT:
                    found.setdefault(target.split(".")[0], name)
                    continue
                ours = target if target in modules else target.rpartition(".")[0]
                parts = ours.split(".")
                todo += [(".".join(parts[:i]), False) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules]
    return found


@pytest.mark.parametrize("step", LIGHT_STEPS)
def test_steps_that_run_no_model_import_no_torch(step: str) -> None:
    heavy = {package: importer for package, importer in external_reach(step).items() if package in HEAVY}
    assert not heavy, f"{step} pulls in {heavy} (package -> our module that imports it)"


def test_reach_follows_lazy_imports_of_the_step(tmp_path: Path) -> None:
    global ROOT
    (tmp_path / "components").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "components/step.py").write_text("def run():\n    from model.builder import resolve_source\n")
    (tmp_path / "model/builder.py").write_text("import torch\ndef f():\n    import deepspeed\n")
    saved, ROOT = ROOT, tmp_path
    try:
        assert external_reach("components.step") == {"torch": "model.builder"}  # deepspeed: lazy, not the step's
    finally:
        ROOT = saved


@pytest.mark.parametrize("source, expected", [
    ("from model import metrics", {"model", "model.metrics"}),
    ("import serving.engine as engine", {"serving.engine"}),
    ("def f():\n    from pipelines.local import run_local", {"pipelines.local", "pipelines.local.run_local"}),
    ("import torch\nfrom onevision.recipe import load_recipe", {"onevision.recipe", "onevision.recipe.load_recipe"}),
])
def test_imports_are_read_at_every_depth(tmp_path: Path, source: str, expected: set[str]) -> None:
    (tmp_path / "probe.py").write_text(source)
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert imports_of(tmp_path / "probe.py") == expected
    finally:
        ROOT = saved

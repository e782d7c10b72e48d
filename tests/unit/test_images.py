"""The container images (infra/images) and the one place that names them.

No Docker engine runs here, so the Dockerfiles are parsed (logical lines, `\\` continuations, ARG
defaults expanded) and checked: pinned base tags with the CUDA that the locked torch needs, the pinned
stack installed with constraints.txt before the sources are copied, the project installed, a non-root
user, no secret-looking ENV/ARG, every COPY source present and let through by .dockerignore. Then: the
image is named only by onevision.PROJECT_IMAGE (and serving.manifests.TRITON_IMAGE, derived from it),
whose tag is the project version, and every file in the repository that spells an image out agrees.
Last, what the images must provide: every executable our code starts (read from its subprocess calls) and
every command our manifests run, against what the Dockerfile installs; and the commit build argument that
the lineage tag needs in a pod.

    .venv/bin/python -m pytest tests/unit/test_images.py
"""

from __future__ import annotations

import ast
import functools
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from components import PROJECT_IMAGE
from onevision.recipe import RecipeError, parse_recipe
from serving.manifests import TRITON_IMAGE

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "infra/images"
DOCKERFILES = {"Dockerfile": PROJECT_IMAGE, "Dockerfile.triton": TRITON_IMAGE}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONSTRAINTS = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if "==" in line and not line.startswith("#"))
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


# ---- a small Dockerfile reader --------------------------------------------------------------------------
@dataclass
class Stage:
    base: str                 # the FROM image, ARG defaults expanded
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (OP, arguments), expanded
    args: dict[str, str] = field(default_factory=dict)


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def lineage(self, stage: Stage | None = None) -> list[Stage]:
        """The stage and the stages it is built FROM, base first."""
        stage = stage or self.final
        names = {s.name for s in self.stages}
        chain = [stage]
        while chain[0].base in names:
            chain.insert(0, self.stage(chain[0].base))
        return chain

    def env(self, stage: Stage | None = None) -> dict[str, str]:
        env: dict[str, str] = {}
        for s in self.lineage(stage):
            for op, rest in s.instructions:
                if op == "ENV":
                    env.update(env_pairs(rest))
        return env


def logical_lines(text: str) -> list[str]:
    """Dockerfile logical lines: comments dropped (also inside a continuation), `\\` joins lines."""
    lines, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continuation, as Docker does
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        lines.append(buf + line)
        buf = ""
    assert buf == "", "a continuation runs off the end of the file"
    return lines


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def env_pairs(rest: str) -> dict[str, str]:
    tokens = shlex.split(rest)
    if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) for t in tokens)


def arg_decl(rest: str) -> tuple[str, str | None]:
    name, eq, value = rest.partition("=")
    return name.strip(), (shlex.split(value)[0] if value.strip() else "") if eq else None


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            tokens = shlex.split(rest)
            tokens = [t for t in tokens if not t.startswith("--")]
            name = tokens[2] if len(tokens) == 3 and tokens[1].upper() == "AS" else None
            stages.append(Stage(expand(tokens[0], global_args), name))
        elif not stages:
            assert op == "ARG", f"{path.name}: only ARG may come before the first FROM, got {op}"
            key, value = arg_decl(rest)
            global_args[key] = value or ""
        else:
            stage = stages[-1]
            values = {**stage.args}
            if op == "ARG":
                key, value = arg_decl(rest)
                stage.args[key] = value if value is not None else global_args.get(key, "")
            stage.instructions.append((op, expand(rest, {**values, **stage.args})))
    return Dockerfile(global_args, stages)


def pip_installs(stage_list: list[Stage]) -> list[tuple[int, str]]:
    """(position in the build, RUN text) of every RUN that runs pip install."""
    runs, position = [], 0
    for stage in stage_list:
        for op, rest in stage.instructions:
            position += 1
            if op == "RUN" and "pip install" in rest:
                runs.append((position, rest))
    return runs


def copies(stage: Stage) -> list[tuple[list[str], list[str], str]]:
    """(flags, sources, destination) of every COPY/ADD."""
    result = []
    for op, rest in stage.instructions:
        if op in ("COPY", "ADD"):
            tokens = shlex.split(rest)
            flags = [t for t in tokens if t.startswith("--")]
            paths = [t for t in tokens if not t.startswith("--")]
            result.append((flags, paths[:-1], paths[-1]))
    return result


PARSED = {name: parse(IMAGES / name) for name in DOCKERFILES}


# ---- the Dockerfiles -------------------------------------------------------------------------------------
def test_the_reader_handles_continuations_comments_and_args(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text("# syntax=docker/dockerfile:1\nARG TAG=1.2\nFROM repo/img:${TAG} AS a\nARG X=y\n"
                    "RUN echo $X \\\n  # a comment inside\n && echo done\nFROM a\nUSER 10\n")
    parsed = parse(path)
    assert [s.base for s in parsed.stages] == ["repo/img:1.2", "a"]
    assert parsed.stages[0].instructions[1] == ("RUN", "echo y && echo done")
    assert [s.name for s in parsed.lineage()] == ["a", None]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_to_a_specific_tag(name: str) -> None:
    parsed = PARSED[name]
    stage_names = {s.name for s in parsed.stages}
    external = [s.base for s in parsed.stages if s.base not in stage_names]
    assert external, "no base image"
    for base in external:
        assert "$" not in base, f"{base}: an ARG without a default"
        _, sep, tag = base.rpartition(":")
        assert sep and "/" not in tag, f"{base}: no tag"
        assert not re.search(r"(^|[-_.])latest([-_.]|$)", tag) and re.search(r"\d", tag), f"{base}: not a specific tag"


def test_the_project_image_has_the_cuda_that_the_locked_torch_needs() -> None:
    base = PARSED["Dockerfile"].stages[0].base
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(cudnn-runtime|cudnn-devel)-ubuntu(22\.04|24\.04)", base)
    assert match, base
    # torch's CUDA is the CUDA runtime wheel it pulls, locked in constraints.txt (13.0.96 -> CUDA 13.0)
    assert CONSTRAINTS["torch"] == next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"]
                                        if d.startswith("torch=="))
    cuda_runtime = CONSTRAINTS["nvidia-cuda-runtime"].split(".")
    assert match.group(1, 2) == tuple(cuda_runtime[:2]), (base, CONSTRAINTS["nvidia-cuda-runtime"])
    assert any(name.endswith(f"-cu{cuda_runtime[0]}") for name in CONSTRAINTS)  # cuDNN, NCCL for that major


def test_the_triton_image_matches_the_bundled_python_backend_stub() -> None:
    parsed = PARSED["Dockerfile.triton"]
    assert parsed.stages[0].base == f"nvcr.io/nvidia/tritonserver:{parsed.global_args['TRITON_VERSION']}-py3"
    # nvidia-pytriton 0.7.0 embeds Triton 2.51.0 = release 24.10: its stub speaks that Python backend
    assert (CONSTRAINTS["nvidia-pytriton"], parsed.global_args["TRITON_VERSION"]) == ("0.7.0", "24.10")
    python = parsed.global_args["PYTHON_VERSION"]
    runs = " ".join(rest for op, rest in parsed.final.instructions if op == "RUN")
    assert f"python_backend_stubs/{python}/triton_python_backend_stub" in runs
    assert "/opt/tritonserver/backends/python/triton_python_backend_stub" in runs
    assert "nvidia_pytriton.libs" in parsed.env()["LD_LIBRARY_PATH"]
    assert parsed.env()["PATH"].startswith("/opt/venv/bin:")  # the stub embeds the venv's Python


@pytest.mark.parametrize("name", DOCKERFILES)
def test_python_matches_the_project(name: str) -> None:
    python = PARSED[name].global_args["PYTHON_VERSION"]
    assert PYPROJECT["project"]["requires-python"] == f">={python},<3.{int(python.split('.')[1]) + 1}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_pinned_stack_is_installed_with_constraints_before_the_sources(name: str) -> None:
    parsed = PARSED[name]
    chain = parsed.stages  # build order
    installs = pip_installs(chain)
    stack = [(pos, run) for pos, run in installs if re.search(r"(^|\s)-c constraints\.txt(\s|$)", run)]
    assert len(stack) == 1, installs
    position, run = stack[0]
    assert "-r requirements.txt" in run and "tomllib" in run and "['dependencies']" in run  # from pyproject
    assert "--extra-index-url" not in run and "--index-url" not in run  # torch too comes from the locked index
    project = [(pos, r) for pos, r in installs if "--no-deps" in r]
    assert len(project) == 1 and re.search(r"pip install [^&]*--no-deps[^&]* \.(\s|$)", project[0][1]), project
    assert project[0][0] > position
    # constraints.txt and pyproject.toml reach the stack install; no package source comes before it
    position_of: dict[str, int] = {}
    pos = 0
    for stage in chain:
        for op, rest in stage.instructions:
            pos += 1
            if op in ("COPY", "ADD") and "--from=" not in rest:
                for source in shlex.split(rest)[:-1]:
                    position_of.setdefault(source.rstrip("/"), pos)
    assert position_of["constraints.txt"] < position and position_of["pyproject.toml"] < position
    packages = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in packages:
        assert package in position_of, f"{package} is not copied into the image"
        assert position_of[package] > position, f"{package} is copied before the dependencies are installed"
    # the venv with the stack, and the project, end up in the final stage
    final_copies = copies(parsed.final)
    assert any("--from=builder" in flags and sources == ["/opt/venv"] for flags, sources, _ in final_copies)
    final_sources = {s.rstrip("/") for _, sources, _ in final_copies for s in sources}
    assert set(packages) | {"pyproject.toml", PYPROJECT["project"]["readme"]} <= final_sources
    assert any(op == "RUN" and "--no-deps" in rest for op, rest in parsed.final.instructions)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_non_root_user_with_unbuffered_output(name: str) -> None:
    parsed = PARSED[name]
    users = [rest for op, rest in parsed.final.instructions if op == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), users[-1]  # numeric: runAsNonRoot can verify it
    assert any(op == "WORKDIR" for op, _ in parsed.final.instructions)
    assert parsed.env()["PYTHONUNBUFFERED"] == "1"
    assert parsed.env()["PATH"].startswith("/opt/venv/bin:")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_env_or_arg_looks_like_a_secret(name: str) -> None:
    parsed = PARSED[name]
    names = [("ARG", key) for key in parsed.global_args]
    for stage in parsed.stages:
        for op, rest in stage.instructions:
            if op == "ENV":
                names += [("ENV", key) for key in env_pairs(rest)]
            elif op == "ARG":
                names.append(("ARG", arg_decl(rest)[0]))
    assert names
    assert [n for n in names if SECRET_NAME.search(n[1])] == []  # credentials come from Secrets at run time


def _glob(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `*` and `?` stay within a path segment, `**` spans them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_the_dockerignore_reader() -> None:
    patterns = ["*", "!onevision/", "**/__pycache__"]
    assert not _dockerignore_excludes("onevision/recipe.py", patterns)
    assert _dockerignore_excludes("onevision/__pycache__/recipe.pyc", patterns)
    assert _dockerignore_excludes(".venv/bin/python", patterns) and _dockerignore_excludes("tests", patterns)
    assert _dockerignore_excludes("model/x.pyc", ["**/*.py[cod]"]) and not _dockerignore_excludes("model/x.py", ["**/*.py[cod]"])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copy_source_exists_and_reaches_the_build_context(name: str) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for stage in PARSED[name].stages:
        for flags, sources, _ in copies(stage):
            if any(f.startswith("--from=") for f in flags):
                continue
            assert sources
            for source in sources:
                assert not source.startswith(("/", "..")) and "://" not in source, source
                assert list(ROOT.glob(source)), f"{name}: COPY {source}: not in the repository"
                assert not _dockerignore_excludes(source.rstrip("/"), patterns), f".dockerignore drops {source}"
    for kept_out in (".venv", ".git", ".onevision", "tests", "benchmarks", "infra"):
        assert _dockerignore_excludes(kept_out, patterns), kept_out


# ---- one name ----------------------------------------------------------------------------------------------
def test_the_image_tag_is_the_project_version() -> None:
    version = PYPROJECT["project"]["version"]
    repository, _, tag = PROJECT_IMAGE.rpartition(":")
    assert tag == version and repository and "latest" not in PROJECT_IMAGE
    assert TRITON_IMAGE == f"{repository}-triton:{version}"


IMAGE_REF = re.compile(re.escape(PROJECT_IMAGE.rpartition(":")[0]) + r"(?:-[a-z0-9-]+)?(?::[^\s'\"`,;)\]}|]*)?")
BINARY = {".png", ".jpg", ".jpeg", ".gif", ".tar", ".gz", ".mp4", ".parquet", ".safetensors", ".bin", ".pyc"}


def repository_files() -> list[Path]:
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return [ROOT / name for name in sorted(set(listed)) if name and (ROOT / name).is_file()
            and (ROOT / name).suffix not in BINARY]


def test_no_file_names_another_image() -> None:
    allowed = {PROJECT_IMAGE, TRITON_IMAGE}
    seen, wrong = set(), []
    for path in repository_files():
        text = path.read_text(errors="ignore")
        for number, line in enumerate(text.splitlines(), 1):
            for match in IMAGE_REF.finditer(line):
                ref = match.group(0)
                tag = ref.partition(":")[2]
                if ref in allowed:
                    seen.add((ref, path.relative_to(ROOT).as_posix()))
                elif not tag.startswith(("<", "$")):  # a placeholder in prose: `...:<version>`
                    wrong.append(f"{path.relative_to(ROOT)}:{number}: {ref}")
    assert wrong == [], f"only {sorted(allowed)} may be named"
    # the YAML that spells the image out is among what was checked
    files = {f for _, f in seen}
    assert {"infra/platform/base/trainer-runtime.yaml", "infra/platform/base/mlflow.yaml",
            "infra/serving/tiny/tiny-ov.yaml", "infra/serving/tiny/tiny-ov-triton.yaml"} <= files


def test_the_reference_scan_catches_other_tags() -> None:
    repository = PROJECT_IMAGE.rpartition(":")[0]
    line = f"image: {repository}:latest  # and {repository}-triton:9.9 and {repository}"
    assert [m.group(0) for m in IMAGE_REF.finditer(line)] == [f"{repository}:latest", f"{repository}-triton:9.9",
                                                             repository]


def test_infra_yaml_images_equal_the_project_image() -> None:
    images = []
    for path in sorted((ROOT / "infra").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            stack = [doc]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    if isinstance(node.get("image"), str) and IMAGE_REF.match(node["image"]):
                        images.append((path.relative_to(ROOT).as_posix(), node["image"]))
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
    assert images and all(image in (PROJECT_IMAGE, TRITON_IMAGE) for _, image in images), images


def test_recipes_name_no_image() -> None:
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert "image" not in (doc.get("cluster") or {}), path.name
    doc = yaml.safe_load((ROOT / "recipes/tiny.yaml").read_text())
    doc["cluster"]["image"] = PROJECT_IMAGE
    with pytest.raises(RecipeError, match=r"cluster.*PROJECT_IMAGE"):
        parse_recipe(doc, "tiny.yaml")


def test_the_image_carries_the_recipes_compiled_pipelines_name() -> None:
    """Compiled pipelines default recipe_uri to `recipes/<file>`, relative to the image's working directory."""
    lines = [line.split() for line in (ROOT / "infra/images/Dockerfile").read_text().splitlines() if line.strip()]
    workdirs = [parts[1] for parts in lines if parts[0] == "WORKDIR"]
    copies = [parts for parts in lines if parts[0] == "COPY" and "recipes" in parts]
    assert copies, "the image must COPY recipes/"
    assert copies[-1][-1] in ("./recipes", f"{workdirs[-1]}/recipes")


# ---- what the image must provide: every executable our code and our manifests start --------------------------
# Found by reading the code (ast): the first word of every argv handed to subprocess.run/Popen/...,
# followed through local names, `self.` attributes, functions that return the argv and the parameters
# that carry it from a caller in the same module. A call the reader cannot follow fails the test: teach
# it the new form rather than leaving an executable unchecked.
IMAGE_PACKAGES = ("onevision", "model", "components", "serving", "pipelines")
PROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}
# Modules that start processes only on a workstation or in tests, never in a pod of the project image.
LOCAL_ONLY = {
    "onevision/stack.py": "the embedded stack (make run, tests): weed and mlflow; a cluster runs MinIO and "
                          "the MLflow Deployment (checked below through its manifest)",
    "pipelines/local.py": "`onevision run`: git init of the local GitOps stand-in",
    "serving/triton_repo.py": "`onevision serve --backend triton` and tests: nvidia-pytriton's tritonserver; "
                              "in a cluster the Triton image's own tritonserver runs (its ServingRuntime)",
}


class _Argv:
    """Resolves the first word of a command expression in one module."""

    def __init__(self, path: Path) -> None:
        self.path, self.tree = path, ast.parse(path.read_text())
        self.functions = {n.name: n for n in ast.walk(self.tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.parents = {child: node for node in ast.walk(self.tree) for child in ast.iter_child_nodes(node)}

    def where(self, node: ast.AST) -> str:
        name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{name}:{getattr(node, 'lineno', '?')}"

    def enclosing(self, node: ast.AST) -> ast.AST:
        while node in self.parents and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node = self.parents[node]
        return node

    def process_calls(self) -> list[ast.Call]:
        calls = []
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            if (owner == "subprocess" and node.func.attr in PROCESS_CALLS) or \
                    (owner == "os" and node.func.attr.startswith(("exec", "spawn", "system", "popen", "posix_spawn"))) or \
                    (owner == "asyncio" and node.func.attr.startswith("create_subprocess")):
                calls.append(node)
        return calls

    def heads(self, expr: ast.AST, scope: ast.AST, depth: int = 0) -> set[str]:
        """The executables `expr` (an argv) may start with."""
        assert depth < 8, f"{self.where(expr)}: argv too indirect to follow"
        if isinstance(expr, (ast.List, ast.Tuple)):
            return self.word(expr.elts[0], scope, depth)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):  # [cmd, ...] + extra
            return self.heads(expr.left, scope, depth + 1)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in self.functions:
            returns = [r.value for r in ast.walk(self.functions[expr.func.id]) if isinstance(r, ast.Return) and r.value]
            return set().union(*(self.heads(r, self.functions[expr.func.id], depth + 1) for r in returns))
        if isinstance(expr, ast.Name):
            return set().union(*(self.heads(v, s, depth + 1) for v, s in self.bindings(expr.id, scope)))
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == "self":
            values = [n.value for n in ast.walk(self.tree) if isinstance(n, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == expr.attr for t in n.targets)]
            assert values, f"{self.where(expr)}: self.{expr.attr} is never assigned"
            return set().union(*(self.heads(v, self.enclosing(v), depth + 1) for v in values))
        raise AssertionError(f"{self.where(expr)}: cannot tell which executable {ast.unparse(expr)} starts")

    def word(self, expr: ast.AST, scope: ast.AST, depth: int) -> set[str]:
        """The executable named by argv[0]."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {Path(expr.value).name}
        if isinstance(expr, ast.Attribute) and ast.unparse(expr) == "sys.executable":
            return {"python"}
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Div):  # dist / "bin" / "tritonserver"
            return self.word(expr.right, scope, depth)
        if isinstance(expr, ast.Call) and len(expr.args) == 1:  # str(path), _bin("weed"), shutil.which("git")
            return self.word(expr.args[0], scope, depth)
        if isinstance(expr, ast.Name):
            return set().union(*(self.word(v, s, depth + 1) for v, s in self.bindings(expr.id, scope)))
        raise AssertionError(f"{self.where(expr)}: cannot tell which executable {ast.unparse(expr)} names")

    def bindings(self, name: str, scope: ast.AST) -> list[tuple[ast.AST, ast.AST]]:
        """(value, its scope) for `name` in `scope`: assignments there, or the argument callers pass."""
        found = [(n.value, scope) for n in ast.walk(scope) if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)]
        if found or not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert found, f"{self.where(scope)}: {name} is never assigned"
            return found
        params = [a.arg for a in scope.args.posonlyargs + scope.args.args]
        assert name in params, f"{self.where(scope)}: {name} is neither assigned nor a parameter of {scope.name}"
        for call in ast.walk(self.tree):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == scope.name:
                passed = [k.value for k in call.keywords if k.arg == name]
                if params.index(name) < len(call.args):
                    passed.append(call.args[params.index(name)])
                found += [(value, self.enclosing(call)) for value in passed]
        assert found, f"{self.where(scope)}: no caller of {scope.name} in this module passes {name}"
        return found


def started_by_code() -> dict[str, set[str]]:
    """{module path: executables it starts} for every module of the image's packages that starts one."""
    started: dict[str, set[str]] = {}
    for package in IMAGE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            reader = _Argv(path)
            for call in reader.process_calls():
                assert call.args, f"{reader.where(call)}: argv passed by keyword; pass it first"
                started.setdefault(path.relative_to(ROOT).as_posix(), set()).update(
                    reader.heads(call.args[0], reader.enclosing(call)))
    return started


SHELL_BUILTINS = {"cd", "echo", "exec", "export", "printf", "set", "test", "[", "true", "false", ":", "if", "then",
                  "else", "fi", "for", "do", "done", "while"}


def shell_commands(script: str) -> set[str]:
    """The programs a `sh -c` script runs: first words of its commands and of its `$(...)`. A Kubernetes
    `$(VAR)` (upper case) is a variable the kubelet substitutes, not a command."""
    found = set(re.findall(r"\$\((?![A-Z_][A-Z0-9_]*\))\s*([^\s)]+)", script))
    script = re.sub(r"\$\([^)]*\)", "X", script)
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "&"):
                while command and (re.fullmatch(r"\w+=.*", command[0]) or command[0] == "exec"):
                    command.pop(0)
                if command and command[0] not in SHELL_BUILTINS:
                    found.add(command[0])
                command = []
            else:
                command.append(token)
    return {Path(name).name for name in found}


def container_commands(node: dict) -> set[str]:
    """What a container (or KFP executor) starts: command + args, through `sh -c`. Without a command the
    args run (our images have no ENTRYPOINT, or NVIDIA's, which execs its arguments)."""
    argv = [str(a) for a in (node.get("command") or []) + (node.get("args") or [])]
    if not argv:
        return set()
    shell = Path(argv[0]).name
    if shell in ("sh", "bash") and len(argv) > 2 and re.fullmatch(r"-\w*c\w*", argv[1]):
        return {shell} | shell_commands(argv[2])
    return {Path(argv[0]).name}


@functools.cache
def started_by_manifests() -> dict[str, dict[str, set[str]]]:
    """{image: {file: executables}} for every container of ours in infra/ and the compiled pipelines."""
    started: dict[str, dict[str, set[str]]] = {}
    files = sorted((ROOT / "infra").rglob("*.yaml")) + sorted((ROOT / "pipelines/compiled").glob("*.yaml"))
    for path in files:
        for doc in yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            stack = [doc]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    if node.get("image") in (PROJECT_IMAGE, TRITON_IMAGE):
                        started.setdefault(node["image"], {}).setdefault(path.relative_to(ROOT).as_posix(), set()) \
                            .update(container_commands(node))
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
    return started


# What the base images bring on PATH (facts about them, not parsed): Ubuntu's shell and coreutils, and in
# NVIDIA's Triton image /opt/tritonserver/bin.
BASE_PROVIDES = {"nvidia/cuda": {"sh", "bash", "mktemp", "env"},
                 "nvcr.io/nvidia/tritonserver": {"sh", "bash", "mktemp", "env", "tritonserver"}}
# apt packages -> the executables they install (those our steps use)
APT_PROVIDES = {"git": {"git"}}


def _console_scripts(requirements: list[str]) -> set[str]:
    """Console scripts of `requirements` and everything they pull in, read from this environment's
    installed distributions (the image installs the same locked tree)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo, scripts = set(), [Requirement(r) for r in requirements], set()
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # e.g. psycopg, only in the image: it brings no executable we start
        scripts |= {e.name for e in dist.entry_points if e.group == "console_scripts"}
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or sub.marker.evaluate({"extra": e} if (e := next(iter(req.extras), "")) else {"extra": ""}):
                todo.append(sub)
    return scripts


def provided_by(name: str) -> set[str]:
    """The executables on PATH in the final stage of infra/images/<name>, read from the Dockerfile."""
    parsed = PARSED[name]
    chain = parsed.lineage()
    base = chain[0].base.rpartition(":")[0]
    provided = set(BASE_PROVIDES[base])
    python = parsed.global_args["PYTHON_VERSION"]
    assert parsed.env()["PATH"].startswith("/opt/venv/bin:")
    for stage in chain:
        for op, rest in stage.instructions:
            if op == "RUN":
                for packages in re.findall(r"apt-get install (.*?)(?:&&|$)", rest):
                    for package in shlex.split(packages):
                        provided |= APT_PROVIDES.get(package, {package} if package == f"python{python}" else set())
    # the venv, built in the builder and copied whole: its python, pip and every package's scripts
    assert any("--from=builder" in flags and sources == ["/opt/venv"] for flags, sources, _ in copies(parsed.final))
    builder = parsed.stage("builder")
    assert any(op == "RUN" and re.search(rf'python{python}"? -m venv /opt/venv', rest) for op, rest in builder.instructions)
    provided |= {"python", "python3", f"python{python}", "pip"}
    for op, rest in builder.instructions:
        if op == "RUN" and "pip install" in rest:
            tokens = shlex.split(rest.split("pip install", 1)[1].split("&&")[0])
            requirements = [t for i, t in enumerate(tokens) if not t.startswith("-")
                            and not (i and tokens[i - 1] in ("-c", "-r"))]
            if "-r" in tokens:  # requirements.txt is pyproject's dependency list (checked above)
                requirements += PYPROJECT["project"]["dependencies"]
            provided |= _console_scripts(requirements)
    # the project itself (`pip install --no-deps .`): its own scripts
    provided |= set(PYPROJECT["project"]["scripts"])
    return provided


def test_the_code_reader_follows_argv_through_names_functions_and_callers(tmp_path: Path) -> None:
    path = tmp_path / "example.py"
    source = ("import subprocess, sys\n"
              "def command(n):\n    if n:\n        return ['torchrun', '-m', 'x']\n    return [sys.executable, '-m', 'x']\n"
              "def spawn(argv):\n    subprocess.Popen(argv)\n"
              "def start():\n    argv = [_bin('weed'), 'mini']\n    spawn(argv)\n"
              "class S:\n    def __init__(self):\n        self.cmd = [str(dist() / 'bin' / 'tritonserver')]\n"
              "    def go(self):\n        subprocess.run(self.cmd)\n"
              "def f():\n    cmd = command(2)\n    subprocess.run(cmd + ['--x'])\n    subprocess.run(['git', 'push'])\n")
    path.write_text(source)
    reader = _Argv(path)
    heads = set().union(*(reader.heads(c.args[0], reader.enclosing(c)) for c in reader.process_calls()))
    assert heads == {"torchrun", "python", "weed", "tritonserver", "git"}
    path.write_text("import subprocess\ndef f(tool):\n    subprocess.run([tool.path])\n")
    reader = _Argv(path)
    with pytest.raises(AssertionError, match="cannot tell which executable"):
        reader.heads(reader.process_calls()[0].args[0], reader.enclosing(reader.process_calls()[0]))
    assert shell_commands('p=$(mktemp -d)\nprintf "%s" "$0" > f\n_K=1 python3 -m kfp "$@"') == {"mktemp", "python3"}
    assert shell_commands("exec mlflow server --port 5000") == {"mlflow"}


def test_the_project_image_provides_every_executable_our_steps_start() -> None:
    by_code = started_by_code()
    # the list, so that a new executable is a visible change here
    assert by_code == {
        "components/evaluate/core.py": {"python"},          # python -m lmms_eval
        "components/register/promote.py": {"git"},         # deploy and promote: the GitOps overlay
        "components/train/core.py": {"torchrun", "python"},  # one pod: torchrun over its GPUs, or one process
        "onevision/stack.py": {"weed", "mlflow"},
        "onevision/tracking.py": {"git"},                   # lineage fallback when ONEVISION_GIT_COMMIT is unset
        "pipelines/local.py": {"git"},
        "serving/triton_repo.py": {"tritonserver"},
    }, by_code
    in_pods = {module: names for module, names in by_code.items() if module not in LOCAL_ONLY}
    by_manifests = started_by_manifests()
    provided = provided_by("Dockerfile")
    missing = [f"{where}: {name}" for where, names in [*in_pods.items(), *by_manifests[PROJECT_IMAGE].items()]
               for name in sorted(names) if name not in provided]
    assert missing == [], f"the project image lacks: {missing}"
    assert {"git", "torchrun", "mlflow", "python3"} <= set().union(*in_pods.values(),
                                                                   *by_manifests[PROJECT_IMAGE].values())


def test_the_triton_image_provides_what_its_serving_runtime_starts() -> None:
    started = started_by_manifests()[TRITON_IMAGE]
    provided = provided_by("Dockerfile.triton")
    assert "tritonserver" in set().union(*started.values())
    assert [f"{where}: {name}" for where, names in started.items() for name in names if name not in provided] == []


# ---- lineage: the commit the image was built from ------------------------------------------------------------
def test_the_project_image_carries_its_commit_from_a_build_argument() -> None:
    """.dockerignore keeps .git out, so git cannot tell the commit in a pod: the build argument does, and
    the build stops without a real one (onevision.tracking.git_commit reads the variable)."""
    lines = logical_lines((IMAGES / "Dockerfile").read_text())
    final = lines[max(i for i, line in enumerate(lines) if line.upper().startswith("FROM ")):]
    assert "ARG ONEVISION_GIT_COMMIT" in final  # no default: a forgotten --build-arg cannot pass unnoticed
    env = final.index("ENV ONEVISION_GIT_COMMIT=${ONEVISION_GIT_COMMIT}")
    assert env > max(i for i, line in enumerate(final) if line.startswith("COPY"))  # a new commit: one small layer
    (check,) = [line[4:] for line in final if line.startswith("RUN") and "ONEVISION_GIT_COMMIT" in line]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip() \
        or "0123456789abcdef0123456789abcdef01234567"
    for value, code in ((commit, 0), ("", 1), ("unknown", 1), (commit[:12], 1)):
        done = subprocess.run(["sh", "-c", expand(check, {"ONEVISION_GIT_COMMIT": value})],
                              capture_output=True, text=True, check=False)
        assert done.returncode == code, (value, done.stderr)
    assert "--build-arg ONEVISION_GIT_COMMIT=$(git rev-parse HEAD)" in done.stderr


def test_every_documented_build_of_the_project_image_passes_the_commit() -> None:
    builds = []
    for path in repository_files():
        text = path.read_text(errors="ignore").replace("\\\n", " ")
        builds += [(path.relative_to(ROOT).as_posix(), line) for line in text.splitlines()
                   if re.search(r"docker build .*-f infra/images/Dockerfile(\s|$)", line)]
    assert builds
    assert [b for b in builds if "--build-arg ONEVISION_GIT_COMMIT=$(git rev-parse HEAD)" not in b[1]] == []

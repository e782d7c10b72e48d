"""The container images (infra/images) and the one place that names them.

No Docker engine runs here, so the Dockerfiles are parsed (logical lines, `\\` continuations, ARG
defaults expanded) and checked: pinned base tags with the CUDA that the locked torch needs, the pinned
stack installed with constraints.txt before the sources are copied, the project installed, a non-root
user, no secret-looking ENV/ARG, every COPY source present and let through by .dockerignore. Then: the
image is named only by components.PROJECT_IMAGE (and serving.manifests.TRITON_IMAGE, derived from it),
whose tag is the project version, and every file in the repository that spells an image out agrees.
"""

from __future__ import annotations

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
        repo, sep, tag = base.rpartition(":")
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

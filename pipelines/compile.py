"""Compile the pipeline for a recipe into the YAML the KFP UI uploads (committed for every preset).

    onevision compile --recipe recipes/ov-7b.yaml -o pipelines/compiled/ov-7b.yaml
    onevision compile --all          # every recipes/*.yaml -> pipelines/compiled/<recipe file name>.yaml

The recipe is read here (shape of the DAG, resources, parameter defaults) and named in the pipeline by
its path inside the project image (`recipes/<file>`, the image's working directory holds the repo), so
a compiled pipeline carries no local path. tests/unit/test_pipeline_compile.py recompiles every preset
and fails on drift: after changing a component, a recipe or the DAG, rerun `onevision compile --all`.
"""

from __future__ import annotations

from pathlib import Path

from onevision.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
COMPILED_DIR = ROOT / "pipelines" / "compiled"
RECIPES_DIR = ROOT / "recipes"


def image_recipe_uri(recipe_path: str | Path) -> str:
    """Where a pod finds the recipe: `recipes/<file>`, relative to the image's working directory, which
    holds the repository's recipes/ and nothing else. ValueError for a recipe anywhere else (symlinks and
    `..` resolved first): the pod could not read it."""
    path = Path(recipe_path).resolve()
    if path.parent != RECIPES_DIR:
        raise ValueError(f"{recipe_path}: not in the repository's {RECIPES_DIR.relative_to(ROOT)}/ folder, the only "
                         f"recipes the project image carries; move it there (and rebuild the image), or upload one "
                         f"to S3 and pass its URI as recipe_uri at submit")
    return path.relative_to(ROOT).as_posix()


def compile_pipeline(recipe_path: str | Path, out: str | Path) -> Path:
    """Compile the pipeline of `recipe_path` to `out` (YAML); returns the path."""
    from kfp import compiler

    from pipelines.onevision import build_pipeline

    pipeline = build_pipeline(load_recipe(recipe_path), image_recipe_uri(recipe_path))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(out))
    return out


def preset_paths() -> dict[Path, Path]:
    """Every shipped recipe -> its committed compiled pipeline."""
    return {recipe: COMPILED_DIR / recipe.name for recipe in sorted(RECIPES_DIR.glob("*.yaml"))}


def compile_presets() -> list[Path]:
    return [compile_pipeline(recipe, out) for recipe, out in preset_paths().items()]

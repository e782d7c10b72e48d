"""The four stages of recipes/tiny.yaml, trained as the pipeline trains them, learn the shapes world.

Measured on held-out images: colour short answers >= 80% after all stages, near chance after Stage-1
alone, and every stage lowers its own held-out loss. Every question type's accuracy is reported next
to its chance level (printed; `pytest -s` shows it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from components.curate.core import curate_stage, synthetic_world
from model.builder import load_pretrained
from model.generation import score_by_task
from model.shapes_world import EVAL_KINDS
from onevision.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes/tiny.yaml"


def test_tiny_recipe_learns_colour(tmp_path: Path) -> None:
    recipe = load_recipe(RECIPE)
    init, summaries = None, {}
    for name, _ in recipe.stages.enabled():
        curate_stage(recipe, name, str(tmp_path / "data" / name), work_dir=str(tmp_path / "work"))
        cmd = [sys.executable, "-m", "model.train", "--recipe", str(RECIPE), "--stage", name,
               "--data", str(tmp_path / "data" / name), "--out", str(tmp_path / name),
               "--work-dir", str(tmp_path / f"{name}-work"), "--summary", str(tmp_path / f"{name}.json")]
        done = subprocess.run(cmd + (["--init", init] if init else []), cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2", "DS_ACCELERATOR": "cpu"}, timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
        summaries[name] = json.loads((tmp_path / f"{name}.json").read_text())
        init = str(tmp_path / name / "hf")

    world, _ = synthetic_world("synthetic://shapes/captions", tmp_path / "work", recipe.training.seed)
    records = [r for kind in EVAL_KINDS for r in json.loads((world / f"{kind}.json").read_text())]
    scores = {}
    for name in ("stage1", "stage2_ov"):
        model, processor = load_pretrained(str(tmp_path / name / "hf"))
        scores[name] = score_by_task(model, processor, records, world)
    print("\nheld-out accuracy by task (after stage1 | after all four | chance)")
    for task, final in scores["stage2_ov"].items():
        print(f"  {task:18s} {scores['stage1'][task]['accuracy']:.2f} | {final['accuracy']:.2f} | {final['chance']:.2f}")
    for name, summary in summaries.items():
        print(f"  {name}: held-out loss {summary['eval_loss_before']:.3f} -> {summary['eval_loss_after']:.3f}")
        assert summary["eval_loss_after"] < summary["eval_loss_before"], name
    assert scores["stage2_ov"]["color"]["accuracy"] >= 0.8
    assert scores["stage1"]["color"]["accuracy"] <= scores["stage1"]["color"]["chance"] + 0.15

"""Preflight refuses a recipe whose stages do not fit their GPUs, naming the stage and the shortfall, before
anything starts; `onevision recipe plan` prints the table. No services: the memory check needs none."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.preflight.core import PreflightError, check_memory, run
from onevision_cli.main import main
from onevision.recipe import STAGE_NAMES, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_ov_72b_on_one_node_of_24gb_gpus_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the pipeline's route to the cluster fields: preflight overrides, e.g. a smaller pool
    small = {f"cluster.steps.{stage}.{field}": value for stage in STAGE_NAMES
             for field, value in (("nodes", "1"), ("gpus", "8"), ("gpu_memory_gb", "24"))}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)  # those checks fail fast, listed beside the memory lines
    with pytest.raises(PreflightError) as err:
        run(str(ROOT / "recipes/ov-72b.yaml"), str(tmp_path / "runs"), "plan-refused", small)
    lines = [line.strip() for line in str(err.value).splitlines()]
    memory = [line for line in lines if line.startswith("memory: ")]
    assert [line.split()[1] for line in memory] == list(STAGE_NAMES)  # every stage named, one line each
    assert all("on 1 node(s) x 8 GPU(s) of 24 GB (21.6 GiB usable): short by" in line for line in memory)
    # 73.2B parameters' bf16 weights alone, split over 8 GPUs, are 17 GiB; Stage-2 trains everything
    assert float(memory[2].split("needs ")[1].split()[0]) > 73.1e9 * 2 / 8 / 1024**3
    assert not (tmp_path / "runs").exists()  # nothing was pinned or started


def test_the_shipped_recipe_passes_and_a_cpu_recipe_is_not_planned(capsys: pytest.CaptureFixture) -> None:
    assert check_memory(load_recipe(ROOT / "recipes/ov-0.5b.yaml")) == []
    assert "stage2_ov" in capsys.readouterr().out  # the plan is printed in the step's log
    assert check_memory(load_recipe(ROOT / "recipes/tiny.yaml")) == []  # CPU steps: nothing to plan
    assert "memory plan" not in capsys.readouterr().out


def test_cli_prints_the_table_and_fails_when_a_stage_does_not_fit(capsys: pytest.CaptureFixture) -> None:
    recipe = str(ROOT / "recipes/ov-0.5b.yaml")
    assert main(["recipe", "plan", recipe, "--gpus-per-node", "8", "--nodes", "1", "--gpu-memory-gb", "4"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("ov-0.5b: ZeRO-3, gradient checkpointing on")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[0] in STAGE_NAMES}
    assert list(rows) == list(STAGE_NAMES) and all(row[1] == "1x8" for row in rows.values())
    assert rows["stage1"][-1] == "yes" and rows["stage2_si"][-2] == "NO"  # 4 GB: Stage-2's logits alone do not
    assert "does not fit: stage2_si needs" in err and "of 4 GB (3.6 GiB usable): short by" in err
    assert "does not fit: stage1 " not in err

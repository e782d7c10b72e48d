"""The parent run's summary, computed from nested runs as MLflow returns them (components/finish/core.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from components.finish.core import RUN_STATUS, summary_metrics


def run(step: str, start_s: float, end_s: float | None, **metrics: float) -> Any:
    info = SimpleNamespace(start_time=int(start_s * 1000), end_time=None if end_s is None else int(end_s * 1000),
                           status="FINISHED", run_name=step)
    return SimpleNamespace(info=info, data=SimpleNamespace(tags={"onevision.step": step}, metrics=metrics))


def test_the_summary_names_each_stage_and_step() -> None:
    steps = [run("preflight", 0, 2), run("stage1", 10, 50, train_loss=3.0, eval_loss_after=2.5, loss=2.9),
             run("stage1", 60, 70, train_loss=2.8, eval_loss_after=2.4),  # a retried stage: a second nested run
             run("evaluate_stage1", 71, 80, **{"shapes_color/exact_match": 0.75, "gate_passed": 0.0}),
             run("stage1_5", 81, None)]  # killed: no end
    got = summary_metrics(steps, {"stage1": 118, "stage1_5": 96}, 0, 100_000)
    assert got == {"records_kept/stage1": 118, "records_kept/stage1_5": 96,
                   "wall_s/preflight": 2.0, "wall_s/stage1": 50.0, "train_loss/stage1": 2.8,
                   "heldout_loss/stage1": 2.4, "wall_s/evaluate_stage1": 9.0,
                   "eval/stage1/shapes_color/exact_match": 0.75, "gate_passed/stage1": 0.0,
                   "wall_s/pipeline": 100.0}


def test_only_success_finishes_the_parent() -> None:
    assert RUN_STATUS.get("SUCCEEDED") == "FINISHED"
    assert RUN_STATUS.get("CANCELED") == RUN_STATUS.get("CANCELLED") == "KILLED"
    assert RUN_STATUS.get("FAILED", "FAILED") == "FAILED" and "FAILED" not in RUN_STATUS

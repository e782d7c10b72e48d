"""The two trainer entry points take the same flags: `python -m model.train` and the train step's CLI
`python -m components.train.core` (which adds --run-id), and the step hands every one on to the trainer.

    .venv/bin/python -m pytest tests/unit/test_train_entry_points.py
"""

from __future__ import annotations

import argparse
import re

import pytest

from components.train import core as step
from model import train as trainer


def help_flags(main, capsys: pytest.CaptureFixture[str]) -> set[str]:
    """The flags an entry point's --help lists (the real parser of its main)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", capsys.readouterr().out)) - {"--help"}


def test_both_entry_points_take_the_same_flags(capsys: pytest.CaptureFixture[str]) -> None:
    model_flags, step_flags = help_flags(trainer.main, capsys), help_flags(step.main, capsys)
    assert {"--recipe", "--stage", "--data", "--out", "--init", "--work-dir", "--holdout", "--mlflow-parent",
            "--summary"} <= model_flags
    assert step_flags == model_flags | {"--run-id"}


def test_the_step_hands_every_flag_on_to_the_trainer() -> None:
    argv = ["--recipe", "recipes/tiny.yaml", "--stage", "stage1_5", "--data", "s3://b/curate/stage1_5",
            "--out", "s3://b/stage1_5", "--init", "s3://b/stage1/hf", "--work-dir", "/scratch/x", "--holdout", "16",
            "--mlflow-parent", "abc123", "--summary", "/tmp/summary.json", "--run-id", "r1"]
    parser = step.build_parser()
    flags = {o for action in parser._actions for o in action.option_strings if o.startswith("--")} - {"--help"}
    assert flags == set(argv[::2]), "give every flag here, so that a new one must be handed on too"
    given = vars(parser.parse_args(argv))
    assert given.pop("run_id") == "r1"
    handed = step.train_args(given["recipe"], given["stage"], given["data"], given["out"], given["init"],
                             given["work_dir"], given["mlflow_parent"], given["holdout"], given["summary"])
    received = vars(trainer.add_stage_arguments(argparse.ArgumentParser()).parse_args(handed))
    assert received == given


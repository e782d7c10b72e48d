"""`onevision run`'s console over a real kfp.local DAG: a line per task, logs per task, a failed task's tail.

    .venv/bin/python -m pytest tests/integration/test_console.py -q
"""

# No `from __future__ import annotations`: KFP reads the test pipeline's real annotation objects.
import io
from pathlib import Path
from typing import NamedTuple

import pytest
from kfp import dsl

from pipelines.console import TaskConsole

pytestmark = pytest.mark.integration


@dsl.component(base_image="python:3.11")
def chatty_curate(n: int) -> NamedTuple("Outputs", [("shards_uri", str), ("kept", int), ("reused", bool)]):
    from collections import namedtuple

    for i in range(n):
        print(f"record {i}: checked, deduplicated, written")
    for step in range(1, 6):
        print(f"[progress] stage1 step {step}/5 loss {3.0 - step / 10:.3f}")
    return namedtuple("Outputs", ["shards_uri", "kept", "reused"])("s3://x/shards", n - 2, False)


@dsl.component(base_image="python:3.11")
def failing_step(after: int):
    for i in range(50):
        print(f"work line {i}")
    raise RuntimeError("the step broke here")


@dsl.pipeline(name="console-check")
def flow(n: int):
    curated = chatty_curate(n=n)
    failing_step(after=curated.outputs["kept"])


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_a_line_per_task_the_logs_in_files_and_the_tail_of_a_failure(kfp_local: Path, tmp_path: Path) -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), TaskConsole(tmp_path / "logs", out=out, plain_interval_s=3600) as console:
        flow(n=200)
    shown = out.getvalue().splitlines()
    # start and end of each task, the progress line at its end, the failure's 30-line tail, its log's path
    assert shown[0] == "> chatty-curate"
    assert any(line.startswith("  chatty-curate") and " ok " in line and line.endswith("198 records kept")
               for line in shown), shown
    assert "    stage1 step 5/5 loss 2.500" in shown
    assert "> failing-step" in shown
    failed = shown.index(next(line for line in shown if "failing-step  FAILED after" in line))
    tail = shown[failed + 1:failed + 31]
    assert len(tail) == 30 and all(line.startswith("    | ") for line in tail)
    assert any("the step broke here" in line for line in tail)
    assert shown[failed + 31].startswith("  full log: ") and shown[failed + 31].endswith("02-failing-step.log")
    assert len(shown) < 45  # not the ~300 lines kfp.local prints for these two tasks
    assert not any("record 17" in line or "executor_input" in line for line in shown)
    # everything is in the task's own log, colours stripped
    assert console.logs_dir == tmp_path / "logs" / "attempt-1"
    curate_log = (console.logs_dir / "01-chatty-curate.log").read_text()
    assert "record 199: checked" in curate_log and "\x1b[" not in curate_log
    assert "kept: 198" in curate_log
    assert "work line 49" in (console.logs_dir / "02-failing-step.log").read_text()
    assert [(t["task"], t["status"]) for t in console.tasks] == [("chatty-curate", "SUCCESS"), ("failing-step", "FAILURE")]


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_verbose_passes_the_raw_stream_through(kfp_local: Path, tmp_path: Path) -> None:
    out = io.StringIO()
    (tmp_path / "logs" / "attempt-1").mkdir(parents=True)  # an earlier attempt of the run: kept, not reused
    with TaskConsole(tmp_path / "logs", out=out, verbose=True) as console:
        chatty_curate(n=20)
    raw = out.getvalue()
    assert "record 19: checked" in raw and "[progress] stage1 step 3/5" in raw
    assert console.logs_dir.name == "attempt-2"
    assert "record 19: checked" in (console.logs_dir / "01-chatty-curate.log").read_text()

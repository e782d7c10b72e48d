"""The console's parts that need no DAG: key figures from kfp.local's printed outputs, plain progress pacing."""

from __future__ import annotations

import io
from pathlib import Path

from pipelines.console import TaskConsole, key_figure


def test_key_figures_read_from_printed_outputs() -> None:
    assert key_figure({"shards_uri": "'s3://x'", "kept": "118", "reused": "True"}) == "118 records kept (reused)"
    assert key_figure({"partition_uri": "'s3://x-partitions/0001-of-0003'", "records": "40", "reused": "False"}) == "40 records checked"
    assert key_figure({"passed": "True", "reasons": "''", "results_uri": "'s3://r'"}) == "gate passed"
    assert key_figure({"passed": "False", "reasons": "'exact_match 0.41 < 0.8'"}) == "gate FAILED: exact_match 0.41 < 0.8"
    train = {"hf_uri": "'s3://x/hf'", "metrics": "Metrics( name='metrics',",
             "metadata": "{'eval_loss_before': 5.123, 'eval_loss_after': 2.3456, 'steps': 40}\n"
                         "{'mode': 'local', 'stage': 'stage1'}"}  # the train step's two artifacts
    assert key_figure(train) == "held-out loss 5.123 -> 2.346"
    assert key_figure({"name": "'llava-onevision-tiny'", "version": "'3'", "candidate": "True"}) == "llava-onevision-tiny v3"
    assert key_figure({"metadata": "{'eval_loss_after': <broken"}) == ""
    assert key_figure({}) == ""


def test_plain_progress_is_paced_and_always_shows_the_end(tmp_path: Path) -> None:
    out = io.StringIO()  # not a terminal: plain lines, not a bar
    with TaskConsole(tmp_path, out=out, plain_interval_s=3600) as console:
        for step in range(1, 101):
            print(f"[progress] stage2_si step {step}/100 loss 1.000")
    assert console.tasks == []
    assert out.getvalue().splitlines() == ["    stage2_si step 1/100 loss 1.000", "    stage2_si step 100/100 loss 1.000"]
    assert "step 50/100" in (console.logs_dir / "00-run.log").read_text()  # all of it in the log

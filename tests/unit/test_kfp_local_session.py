"""kfp.local's session leaves this process as it found it, even after parallel tasks raced on the builtin
print (the CI failure of stop 28: every print of later tests began with four spaces)."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import pytest
from kfp import local
from kfp.local.logging_utils import indented_print

from pipelines.local import kfp_local_session


def test_a_print_leaked_by_two_interleaved_tasks_is_put_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    original = builtins.print
    with kfp_local_session(tmp_path / "root"):
        assert local.config.LocalExecutionConfig.instance is not None
        # the order two tasks of parallel branches can take in their threads: A in, B in, A out, B out
        task_a, task_b = indented_print(), indented_print()
        task_a.__enter__()
        task_b.__enter__()
        task_a.__exit__(None, None, None)
        task_b.__exit__(None, None, None)
        assert builtins.print is not original  # kfp.local's race: A's indenting print stays installed
        print("during")
    print("after")
    print("to stderr", file=sys.stderr)
    out, err = capsys.readouterr()
    assert out == "    during\nafter\n" and err == "to stderr\n"
    assert builtins.print is original and local.config.LocalExecutionConfig.instance is None


def test_the_print_is_put_back_when_the_pipeline_raises(tmp_path: Path) -> None:
    original = builtins.print
    task = indented_print()  # held: a closed generator would put its print back by itself
    with pytest.raises(RuntimeError, match="task failed"):
        with kfp_local_session(tmp_path / "root"):
            task.__enter__()  # a task that has not put its print back yet
            raise RuntimeError("task failed")
    assert builtins.print is original and local.config.LocalExecutionConfig.instance is None
    del task

"""What `onevision run` shows while the DAG runs: a line per task start and end, progress bars, and every
task's full output in a log file.

    with TaskConsole(logs_dir) as console:      # stands in for stdout and stderr
        pipeline(...)                          # kfp.local: task starts, executor JSON, subprocess output...
    console.tasks                               # [{task, status, seconds, figure, log}] in run order

kfp.local prints through this process's stdout: its own log lines (a task starts, its outputs, its end,
with ANSI colours), the executor's input and output, and each task subprocess's output, one task at a
time. The console writes each task's lines to `<logs_dir>/attempt-<N>/<NN>-<task>.log` (N counts the
attempts of a run: a resumed run keeps the earlier ones) and shows instead:
- `> <task>` when it starts, and `  <task>  ok  12.3 s  <key figure>` when it ends (records kept, held-out
  loss, gate result...: read from the task's outputs as kfp.local prints them);
- for `[progress] <what> <unit> <n>/<total> <note>` lines (the trainer prints one per optimizer step): a
  tqdm bar on a terminal; elsewhere (CI, a pipe) a plain line at most every `plain_interval_s`;
- for a failed task: its last 30 lines and the log's path.
`verbose=True` passes the raw stream through as well (and still writes the files).
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTED = re.compile(r"Executing task '([^']+)'")
ENDED = re.compile(r"Task '([^']+)' finished with status (\w+)")
OUTPUTS = re.compile(r"Task '([^']+)' outputs:")
OUTPUT_LINE = re.compile(r"^\s{4}(\w+): (.*)$")
PROGRESS = re.compile(r"\[progress\] (\S+) (\w+) (\d+)/(\d+)\s*(.*)")
TAIL_LINES = 30


def key_figure(outputs: dict[str, str]) -> str:
    """The one number a user looks for in a task's outputs (as kfp.local prints them)."""
    if "kept" in outputs:
        return f"{outputs['kept']} records kept" + (" (reused)" if outputs.get("reused") == "True" else "")
    if "partition_uri" in outputs:
        return "already published" if outputs.get("reused") == "True" else f"{outputs['records']} records checked"
    if "passed" in outputs:
        reasons = outputs.get("reasons", "").strip("'")
        return "gate passed" if outputs["passed"] == "True" else f"gate FAILED: {reasons[:100]}"
    for metadata in outputs.get("metadata", "").splitlines():  # one line per output artifact
        if "eval_loss_after" in metadata:
            try:
                meta = ast.literal_eval(metadata)
                return f"held-out loss {meta['eval_loss_before']:.3f} -> {meta['eval_loss_after']:.3f}"
            except (ValueError, SyntaxError, KeyError, TypeError):
                return ""
    if "version" in outputs:
        return f"{outputs.get('name', '').strip(chr(39))} v{outputs['version'].strip(chr(39))}"
    if "branch" in outputs:
        return f"branch {outputs['branch'].strip(chr(39))}"
    if "run_uri" in outputs:
        return outputs["run_uri"].strip("'")
    return ""


class TaskConsole(io.TextIOBase):
    """A text stream that sorts kfp.local's output into per-task logs and a short console (see module doc)."""

    def __init__(self, logs_dir: str | Path, out: TextIO | None = None, verbose: bool = False,
                 plain_interval_s: float = 30.0) -> None:
        # one folder per attempt: a resumed run (the same run id) keeps the killed attempt's logs beside its own
        attempts = len(list(Path(logs_dir).glob("attempt-*")))
        self.logs_dir = Path(logs_dir) / f"attempt-{attempts + 1}"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.out = out or sys.stdout
        self.verbose, self.plain_interval_s = verbose, plain_interval_s
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.tasks: list[dict[str, Any]] = []
        self._partial = ""
        self._task: dict[str, Any] | None = None
        self._log: TextIO | None = None
        self._outputs: dict[str, str] | None = None
        self._bar: Any = None
        self._last_plain = -math.inf  # the first line always shows (monotonic() may be under the interval after boot)
        self._run_log = (self.logs_dir / "00-run.log").open("a")

    # -- the stream ----------------------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # what runs inside must not draw its own bars into our lines

    def write(self, text: str) -> int:
        if self.verbose:
            self.out.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.out.flush()
        for stream in (self._log, self._run_log):
            if stream and not stream.closed:
                stream.flush()

    # -- one line ------------------------------------------------------------------------------------
    def _line(self, raw: str) -> None:
        line = ANSI.sub("", raw)
        if (m := STARTED.search(line)) and self._task is None:
            self._start(m.group(1))
        (self._log or self._run_log).write(line + "\n")
        if (m := PROGRESS.search(line)) and not self.verbose:
            self._progress(*m.groups())
        elif m := ENDED.search(line):
            self._end(m.group(1), m.group(2))
        elif (m := OUTPUTS.search(line)) and self.tasks and self.tasks[-1]["task"] == m.group(1):
            self._outputs = {}
        elif self._outputs is not None:
            if m := OUTPUT_LINE.match(line):
                self._outputs[m.group(1)] = m.group(2).strip()
            elif "metadata=" in line:  # one per output artifact: keep them all
                metadata = line.split("metadata=", 1)[1].rstrip(" )")
                self._outputs["metadata"] = "\n".join(filter(None, [self._outputs.get("metadata"), metadata]))
            elif line.startswith("---") or " - INFO - " in line:  # the block ends
                self._finish_outputs()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _start(self, task: str) -> None:
        if self._outputs is not None:  # the previous task's outputs ended without a closing line
            self._finish_outputs()
        index = len(self.tasks) + 1
        self._task = {"task": task, "started": time.monotonic(), "status": "RUNNING", "figure": "",
                      "log": str(self.logs_dir / f"{index:02d}-{task}.log")}
        self._log = open(self._task["log"], "w")
        self._say(f"> {task}")

    def _end(self, task: str, status: str) -> None:
        record = self._task or {"task": task, "started": time.monotonic(), "log": str(self._run_log.name)}
        self._close_bar()
        record.update(status=status, seconds=time.monotonic() - record["started"])
        self._task = None
        self.tasks.append(record)
        if status == "SUCCESS":
            self._outputs = {}  # kfp.local prints the outputs next (into the task's log); the end line waits
            return
        self._close_log()
        tail = Path(record["log"]).read_text().splitlines()[-TAIL_LINES:]
        self._say(f"  {task}  FAILED after {record['seconds']:.1f} s; its last {len(tail)} lines:")
        for line in tail:
            self._say(f"    | {line}")
        self._say(f"  full log: {record['log']}")

    def _finish_outputs(self) -> None:
        outputs, self._outputs = self._outputs or {}, None
        self._close_log()
        record = self.tasks[-1]
        if record.get("reported"):
            return
        record["figure"], record["reported"] = key_figure(outputs), True
        self._say(f"  {record['task']:<22} ok  {record['seconds']:7.1f} s  {record['figure']}".rstrip())

    def _progress(self, what: str, unit: str, done: str, total: str, note: str) -> None:
        n, of = int(done), max(int(total), 1)
        if self.tty:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=of, desc=f"  {what}", unit=unit, leave=False, file=self.out,
                                 dynamic_ncols=True)
            self._bar.n = n
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.refresh()
        elif time.monotonic() - self._last_plain >= self.plain_interval_s or n == of:
            self._last_plain = time.monotonic()
            self._say(f"    {what} {unit} {n}/{of} {note}".rstrip())

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _say(self, text: str) -> None:
        if not self.verbose:
            self.out.write(text + "\n")
            self.out.flush()

    # -- context -------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""
        if self.tasks and not self.tasks[-1].get("reported") and self.tasks[-1]["status"] == "SUCCESS":
            self._finish_outputs()
        self._close_bar()
        for stream in (self._log, self._run_log):
            if stream and not stream.closed:
                stream.close()
        super().close()

    def __enter__(self) -> TaskConsole:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self))
        self._stack.enter_context(contextlib.redirect_stderr(self))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", RuntimeWarning)  # kfp.local's per-task "you may be attempting..." notes
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        self.close()

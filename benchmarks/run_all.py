"""Run every benchmark, each in its own subprocess, and write ONE report (what `make bench` does).

    .venv/bin/python -m benchmarks.run_all                     # all: benchmarks/results/<date>.json, .md, *.png
    .venv/bin/python -m benchmarks.run_all --quick             # small settings, minutes
    .venv/bin/python -m benchmarks.run_all --only serving training --out-dir /tmp/bench
    .venv/bin/python -m benchmarks.run_all --quick --allow-dirty   # while editing: <date>-DIRTY.md, marked so

A committed report comes from a clean commit: on a tree with uncommitted changes run_all refuses (exit 2)
unless --allow-dirty, and then the report is named <date>-DIRTY and says so in its title line.

Each benchmark module exposes `run(quick: bool) -> dict` (the protocol in benchmarks/README.md and
benchmarks/report.py). It runs in a child process (`python -m benchmarks.run_all --child NAME`), so a
crash, an OOM kill or a timeout loses only that benchmark: the report lists it as failed with the tail
of its stderr. GPU benchmarks run only where CUDA is present; elsewhere they are listed as "not run:
no GPU". Children's full stdout/stderr go to a log folder named at the start.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import machine_details, tree_state, write_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# name, module, title, what is measured, named baseline, needs a GPU, timeout seconds (full mode)
BENCHMARKS: list[dict[str, Any]] = [
    {"name": "batching", "module": "benchmarks.bench_batching", "title": "samples -> batches",
     "measures": "training batches built per second from raw samples (tiny and OV-scale images)",
     "baseline": "per-sample LlavaOnevisionProcessor call + tokenizer.pad", "gpu": False, "timeout": 600},
    {"name": "curation", "module": "benchmarks.bench_curation", "title": "curation",
     "measures": "records/s through curate_stage (validation, dedup, shards, card, publish)",
     "baseline": "decode-only loop over the same images, one process", "gpu": False, "timeout": 600},
    {"name": "data_scale", "module": "benchmarks.bench_data_scale", "title": "training data at scale",
     "measures": "time to first batch, peak RSS and local disk of a training process opening a 10k and a "
                 "200k-record stage on S3 (streamed through a capped shard cache)",
     "baseline": "download-all: every shard fetched before the first batch (the train step before streaming)",
     "gpu": False, "timeout": 900},
    {"name": "training", "module": "benchmarks.bench_training", "title": "training",
     "measures": "non-padding tokens/s on the OneVision-shaped mix (synthetic://shapes/ov_mix): packed and "
                 "padded make_trainer",
     "baseline": "plain transformers.Trainer, random sampler, pad to longest; our padded trainer",
     "gpu": False, "timeout": 1200},
    {"name": "evaluation", "module": "benchmarks.bench_evaluation", "title": "evaluation",
     "measures": "lmms-eval marginal seconds/sample at batch N (4 offline shapes tasks)",
     "baseline": "lmms-eval at batch size 1 (the paper's protocol)", "gpu": False, "timeout": 900},
    {"name": "serving", "module": "benchmarks.bench_serving", "title": "serving",
     "measures": "requests/s of serving.engine.Engine with continuous batching, N concurrent clients, "
                 "equal-length (16 tokens) and mixed (4-64 tokens) answers",
     "baseline": "the same engine with max_batch_size 1", "gpu": False, "timeout": 600},
    {"name": "pipeline", "module": "benchmarks.bench_pipeline", "title": "pipeline overhead",
     "measures": "wall seconds of the tiny flow under the kfp.local DAG",
     "baseline": "the same component cores called directly in one process", "gpu": False, "timeout": 1200},
    {"name": "gpu", "module": "benchmarks.gpu_bench", "title": "GPU training + serving",
     "measures": "training tokens/s and MFU (0.5B- and 7B-shaped), serving requests/s on one GPU "
                 "(gpu_bench.py)",
     "baseline": "measured bf16 matmul FLOP/s; serving at batch 1", "gpu": True, "timeout": 600},
]


def _child(name: str, quick: bool, result_file: str) -> int:
    spec = next(b for b in BENCHMARKS if b["name"] == name)
    module = importlib.import_module(spec["module"])
    started = time.perf_counter()
    result = module.run(quick=quick)
    result.setdefault("name", name)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    Path(result_file).write_text(json.dumps(result, indent=1, default=str))
    return 0


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_one(spec: dict[str, Any], quick: bool, logs: Path, timeout_s: float) -> dict[str, Any]:
    """One benchmark in a child process; its result, or a failed entry with the stderr tail."""
    meta = {k: spec[k] for k in ("name", "title", "measures", "baseline")}
    result_file, out_log, err_log = (logs / f"{spec['name']}.{ext}" for ext in ("json", "out.log", "err.log"))
    cmd = [sys.executable, "-m", "benchmarks.run_all", "--child", spec["name"], "--result-file", str(result_file)]
    cmd += ["--quick"] if quick else []
    started = time.perf_counter()
    with out_log.open("w") as out, err_log.open("w") as err:
        # a session of its own: on timeout the whole tree (trainers, lmms-eval, the stack) goes
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # first a chance to clean up (the pipeline bench stops its stack)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            code = None
    wall = round(time.perf_counter() - started, 1)
    if code == 0 and result_file.exists():
        result = {**meta, **json.loads(result_file.read_text())}
        result["wall_s"] = wall
        return result
    error = _tail(err_log)
    if code is None:
        summary = f"timed out after {timeout_s:.0f} s (killed)"
    elif code < 0:
        summary = f"killed by signal {-code}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    else:
        lines = [ln for ln in error.strip().splitlines() if ln.strip()]
        summary = f"exit {code}: {lines[-1][:200] if lines else 'no stderr'}"
    return {**meta, "status": "failed", "returncode": code, "wall_s": wall, "summary": summary, "error": error,
            "log": str(err_log)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's small settings")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[b["name"] for b in BENCHMARKS],
                        help="run only these benchmarks")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where the report goes")
    parser.add_argument("--date", default=None, help="report file stem (default: today, YYYY-MM-DD)")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every benchmark's timeout")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="run on a tree with uncommitted changes; the report is then <date>-DIRTY, marked so")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.quick, args.result_file)

    began = time.perf_counter()
    machine = machine_details()
    if machine.get("git_dirty") is not False and not args.allow_dirty:
        print("make bench: the tree has uncommitted changes or untracked files (or is not a git checkout), so no commit could "
              "reproduce this report. Commit first, or pass --allow-dirty for a report marked DIRTY.",
              file=sys.stderr)
        return 2
    has_gpu = bool(machine["gpus"])
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    selected = [b for b in BENCHMARKS if not args.only or b["name"] in args.only]
    print(f"benchmarks: {', '.join(b['name'] for b in selected)} ({'quick' if args.quick else 'full'} mode); "
          f"logs in {logs}", flush=True)
    results = []
    for spec in selected:
        if spec["gpu"] and not has_gpu:
            results.append({**{k: spec[k] for k in ("name", "title", "measures", "baseline")}, "status": "skipped",
                            "reason": "not run: no GPU (no CUDA device on this machine)"})
            print(f"  {spec['name']:<11} not run: no GPU", flush=True)
            continue
        timeout = spec["timeout"] * args.timeout_scale * (0.5 if args.quick else 1.0)
        print(f"  {spec['name']:<11} ...", end="", flush=True)
        result = run_one(spec, args.quick, logs, timeout)
        results.append(result)
        status = result.get("status", "ok")
        print(f" {status} in {result['wall_s']:.0f} s" + (f": {result['summary']}" if status == "failed" else ""),
              flush=True)
    wall = round(time.perf_counter() - began, 1)
    if machine.get("git_dirty") is False and tree_state() != (machine["git_commit"], ""):
        # an edit, a new file or a commit while the benchmarks ran: no single commit reproduces the report
        machine.update(git_dirty=True, git_changed_during_run=True)
        print("make bench: the tree changed while the benchmarks ran; the report is marked DIRTY", file=sys.stderr)
    paths = write_report(results, args.out_dir, date=args.date, machine=machine,
                         mode="quick" if args.quick else "full", wall_s=wall)
    print(f"report: {paths['markdown']} and {paths['json']} ({wall / 60:.1f} min)", flush=True)
    failed = [r["name"] for r in results if r.get("status") == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)} (see the report's Failures section)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The `make bench` report writer (benchmarks/report.py), on fake results: no benchmark runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.report import machine_details, normalise, ratio, render_markdown, write_report

MACHINE = {"date": "2026-11-29 07:00 UTC", "cpu": "Fake Xeon 9000", "cores": 2, "usable_cores": 2, "ram_gb": 23.4,
           "gpus": [], "platform": "Linux-x86_64", "python": "3.11.7",
           "versions": {"torch": "2.14.1", "transformers": "5.24.0", "kfp": "2.17.3"},
           "git_commit": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False,
           "load_average_1min": 1.5, "threads": {"OMP_NUM_THREADS": "1"}}


def fake_results() -> list[dict]:
    serving = {"name": "serving", "title": "serving", "measures": "requests/s at N clients",
               "baseline": "max_batch_size 1", "metric": "req/s", "higher_is_better": True,
               "rows": [{"label": "concurrency 1", "ours": 15.0, "baseline": 20.0, "notes": "lone client"},
                        {"label": "concurrency 16", "ours": 80.0, "baseline": 20.0, "notes": "p50 190 ms"}],
               "series": {"throughput": {"kind": "line", "title": "throughput", "x": [1, 16], "log_x": True,
                                         "lines": {"ours": [15.0, 80.0], "baseline": [20.0, 20.0]}}}}
    evaluation = {"name": "evaluation", "title": "evaluation", "measures": "seconds/sample", "baseline": "batch 1",
                  "metric": "s/sample", "higher_is_better": False,
                  "rows": [{"label": "batch 16", "ours": 0.02, "baseline": 0.1, "notes": "0 answers differ"}]}
    training = {"name": "training", "title": "training", "measures": "tokens/s", "baseline": "transformers.Trainer",
                "metric": "tokens/s", "rows": [{"label": "stage2_si", "ours": 6000.0, "baseline": 6000.0}],
                "series": {"loss": {"kind": "line", "title": "loss",
                                    "lines": {"ours": {"x": [1, 2, 3], "y": [3.0, 2.5, 2.0]},
                                              "baseline": {"x": [1, 2, 3], "y": [3.0, 2.6, 2.2]}}}}}
    crashed = {"name": "pipeline", "title": "pipeline overhead", "measures": "DAG wall seconds",
               "baseline": "direct core calls", "status": "failed", "returncode": 1, "wall_s": 12.0,
               "summary": "exit 1: RuntimeError: boom", "error": "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n"}
    gpu = {"name": "gpu", "title": "GPU training + serving", "measures": "MFU", "baseline": "matmul",
           "status": "skipped", "reason": "not run: no GPU"}
    return [serving, evaluation, training, crashed, gpu]


def table_rows(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| benchmark ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in rows]


def test_ratio_is_ours_over_baseline_or_the_inverse_for_times() -> None:
    assert ratio(30.0, 10.0) == pytest.approx(3.0)
    assert ratio(0.02, 0.1, higher_is_better=False) == pytest.approx(5.0)
    assert ratio(None, 1.0) is None and ratio(1.0, 0.0) is None and ratio(float("nan"), 1.0) is None


def test_normalise_recomputes_ratios_from_the_row() -> None:
    wrong = {"name": "x", "metric": "req/s", "rows": [{"label": "a", "ours": 4.0, "baseline": 2.0, "ratio": 99.0}]}
    row = normalise(wrong)["rows"][0]
    assert row["ratio"] == pytest.approx(2.0) and row["unit"] == "req/s" and normalise(wrong)["status"] == "ok"


def test_markdown_table_has_every_row_with_its_ratio() -> None:
    markdown = render_markdown(fake_results(), MACHINE)
    assert "| benchmark | what is measured | named baseline | ours | baseline | ratio (>1 = ours better) | notes |" in markdown
    rows = table_rows(markdown.split("## ")[0])
    assert len(rows) == 2 + 1 + 1 + 1 + 1  # serving x2, evaluation, training, failed, skipped
    by_label = {row[0]: row for row in rows}
    assert by_label["serving: concurrency 1"][5] == "**0.75**"  # 15 / 20: ours slower, < 1
    assert by_label["serving: concurrency 16"][5] == "**4.00**"
    assert by_label["serving: concurrency 1"][3] == "15 req/s" and by_label["serving: concurrency 1"][4] == "20 req/s"
    assert by_label["evaluation: batch 16"][5] == "**5.00**"  # seconds: baseline / ours
    assert by_label["training: stage2_si"][5] == "**1.00**"
    assert by_label["serving: concurrency 1"][2] == "max_batch_size 1"  # the named baseline
    assert by_label["serving: concurrency 16"][6] == "p50 190 ms"


def test_failed_and_skipped_benchmarks_are_listed_as_such() -> None:
    markdown = render_markdown(fake_results(), MACHINE)
    rows = {row[0]: row for row in table_rows(markdown.split("## ")[0])}
    assert rows["pipeline overhead"][5] == "**FAILED**" and "boom" in rows["pipeline overhead"][6]
    assert rows["GPU training + serving"][5] == "not run" and rows["GPU training + serving"][6] == "not run: no GPU"
    failures = markdown.split("## Failures")[1]
    assert "pipeline overhead" in failures and "RuntimeError: boom" in failures and "exit status 1" in failures


def test_machine_details_in_the_report() -> None:
    markdown = render_markdown(fake_results(), MACHINE)
    machine = markdown.split("## Machine")[1]
    for needle in ("Fake Xeon 9000", "2 cores", "23.4 GB", "GPU: none", "torch 2.14.1", "transformers 5.24.0",
                   "kfp 2.17.3", MACHINE["git_commit"], "2026-11-29"):
        assert needle in machine
    real = machine_details()  # this machine: the fields the report reads are there
    assert real["cores"] >= 1 and real["cpu"] and "torch" in real["versions"] and "date" in real


def test_write_report_files_and_figures(tmp_path: Path) -> None:
    paths = write_report(fake_results(), tmp_path, date="2026-11-29", machine=MACHINE, wall_s=600.0)
    assert paths["json"] == tmp_path / "2026-11-29.json" and paths["markdown"] == tmp_path / "2026-11-29.md"
    doc = json.loads(paths["json"].read_text())
    assert [b["name"] for b in doc["benchmarks"]] == ["serving", "evaluation", "training", "pipeline", "gpu"]
    assert doc["benchmarks"][0]["rows"][1]["ratio"] == pytest.approx(4.0)
    assert doc["machine"]["cpu"] == "Fake Xeon 9000" and doc["wall_s"] == 600.0
    markdown = paths["markdown"].read_text()
    for figure in ("2026-11-29-summary.png", "2026-11-29-serving-throughput.png", "2026-11-29-training-loss.png"):
        assert (tmp_path / figure).stat().st_size > 1000
        assert f"]({figure})" in markdown
    assert "pipeline" not in doc["figures"]  # a failed benchmark has no figure


def test_a_report_from_a_dirty_tree_is_named_and_titled_dirty(tmp_path: Path) -> None:
    for dirty in (True, None):  # uncommitted changes, or no git to tell
        paths = write_report(fake_results(), tmp_path, date="2026-12-03", machine={**MACHINE, "git_dirty": dirty},
                             plots=False)
        assert paths["markdown"] == tmp_path / "2026-12-03-DIRTY.md"
        assert paths["markdown"].read_text().startswith("# DIRTY: Benchmark report 2026-12-03")
    assert not (tmp_path / "2026-12-03.md").exists()  # never where a clean report goes


def test_make_bench_refuses_a_dirty_tree_unless_allowed(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from benchmarks import run_all

    monkeypatch.setattr(run_all, "machine_details", lambda: {**MACHINE, "git_dirty": True})
    monkeypatch.setattr(run_all, "run_one", lambda *a, **k: pytest.fail("a benchmark ran on a dirty tree"))
    assert run_all.main([]) == 2
    assert "uncommitted changes" in capsys.readouterr().err


def test_a_tree_that_changes_during_the_run_gives_a_dirty_report(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  capsys) -> None:
    from benchmarks import run_all

    clean = {**MACHINE, "gpus": [], "git_dirty": False}
    monkeypatch.setattr(run_all, "machine_details", lambda: dict(clean))
    monkeypatch.setattr(run_all, "BENCHMARKS", [{"name": "training", "title": "t", "measures": "m", "baseline": "b",
                                                 "gpu": False, "timeout": 10}])
    monkeypatch.setattr(run_all, "run_one", lambda *a, **k: {**fake_results()[0], "wall_s": 1.0})
    states = iter([(clean["git_commit"], "?? benchmarks/new_helper.py")])  # a file appeared mid-run
    monkeypatch.setattr(run_all, "tree_state", lambda: next(states))
    assert run_all.main(["--out-dir", str(tmp_path), "--date", "2026-12-04"]) == 0
    assert (tmp_path / "2026-12-04-DIRTY.md").exists() and not (tmp_path / "2026-12-04.md").exists()
    assert "changed while the benchmarks ran" in capsys.readouterr().err


def test_untracked_files_count_as_uncommitted(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import report

    calls = []
    monkeypatch.setattr(report, "_git", lambda *args: calls.append(args) or ("?? x.py" if args[0] == "status" else "c0"))
    assert report.tree_state() == ("c0", "?? x.py")
    assert ("status", "--porcelain", "--untracked-files=normal") in calls
    assert report.machine_details()["git_dirty"] is True


def test_mfu_is_refused_on_a_gpu_whose_peak_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from model import metrics

    monkeypatch.delenv("ONEVISION_PEAK_FLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert metrics.device_peak_flops() == 989e12 and metrics.unknown_peak_reason() is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA B200")
    assert metrics.device_peak_flops() is None  # never the H100's peak for a device the table does not know
    assert "no dense bf16 peak known for 'NVIDIA B200'" in metrics.unknown_peak_reason()
    monkeypatch.setenv("ONEVISION_PEAK_FLOPS", "2.25e15")
    assert metrics.device_peak_flops() == 2.25e15 and metrics.unknown_peak_reason() is None

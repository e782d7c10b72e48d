"""The one report of `make bench`: benchmark results -> results/<date>.json, <date>.md and PNG figures.

    from benchmarks.report import machine_details, write_report
    paths = write_report(results, "benchmarks/results", machine=machine_details())

A result (one per benchmark, what each `benchmarks/bench_*.py` `run(quick)` returns; see README.md):
    {"name", "title", "measures", "baseline", "metric", "higher_is_better",
     "rows": [{"label", "ours", "baseline", "notes", ["unit", "higher_is_better"]}],
     "series": {figure name: {"kind": "line" | "bar", "title", "xlabel", "ylabel", "x": [...],
                              "lines": {legend: [y...] or {"x": [...], "y": [...]}}}},
     "details": {the benchmark's raw numbers},
     "status": "ok" | "failed" | "skipped", "error": "stderr tail" (failed), "reason" (skipped)}
Every ratio is computed here, from `ours` and `baseline` of the same row (measured in the same run):
ours / baseline when higher is better, baseline / ours when lower is (seconds), so > 1 always means
ours is better.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "kfp", "deepspeed", "lmms_eval", "mlflow", "accelerate")


# --- machine -----------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def _gpus() -> list[dict[str, Any]]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [{"name": torch.cuda.get_device_name(i),
                 "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 1024 ** 3, 1)}
                for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch, or a broken driver: report no GPU rather than fail
        return []


def _version(package: str) -> str | None:
    for name in (package, package.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def tree_state() -> tuple[str | None, str | None]:
    """(HEAD, `git status --porcelain`) of the checkout, untracked files included (an uncommitted module
    changes what runs as much as an edit does); (None, None) outside a git checkout."""
    return _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=normal")


def machine_details() -> dict[str, Any]:
    """Where and on what the benchmarks ran (CPU, cores, RAM, GPUs, versions, git commit, date, load)."""
    head, status = tree_state()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "ram_gb": _ram_gb(),
        "gpus": _gpus(), "platform": platform.platform(), "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "git_commit": head, "git_dirty": bool(status) if status is not None else None,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }


# --- results -----------------------------------------------------------------------------------------

def ratio(ours: Any, baseline: Any, higher_is_better: bool = True) -> float | None:
    """> 1 means ours is better; None when either number is missing or not positive."""
    if not isinstance(ours, (int, float)) or not isinstance(baseline, (int, float)) or ours <= 0 or baseline <= 0:
        return None
    if any(math.isnan(v) or math.isinf(v) for v in (ours, baseline)):
        return None
    return ours / baseline if higher_is_better else baseline / ours


def normalise(result: dict[str, Any]) -> dict[str, Any]:
    """A copy with defaults filled in and every row's ratio computed from its own ours/baseline."""
    out = {"status": "ok", "rows": [], "series": {}, "details": {}, "metric": "", "higher_is_better": True,
           "measures": "", "baseline": "", **result}
    out["title"] = out.get("title") or out.get("name", "?")
    rows = []
    for row in out["rows"]:
        better = row.get("higher_is_better", out["higher_is_better"])
        rows.append({**row, "unit": row.get("unit", out["metric"]), "higher_is_better": better,
                     "ratio": ratio(row.get("ours"), row.get("baseline"), better)})
    out["rows"] = rows
    return out


def _num(value: Any, unit: str = "") -> str:
    if not isinstance(value, (int, float)):
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ").strip()


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join((text or "").rstrip().splitlines()[-lines:])


def render_markdown(results: list[dict[str, Any]], machine: dict[str, Any],
                    figures: dict[str, list[dict[str, str]]] | None = None,
                    title: str = "Benchmark report", mode: str = "full", wall_s: float | None = None) -> str:
    """The report: one table row per result row (benchmark | what | baseline | ours | baseline | ratio | notes),
    failed and skipped benchmarks listed as such, figures, failures' stderr, machine details."""
    results = [normalise(r) for r in results]
    figures = figures or {}
    lines = [f"# {title}", "",
             f"{machine.get('date', '')}, `make bench` ({mode} mode)"
             + (f", {wall_s / 60:.1f} min in all" if wall_s else "") + ". Each ratio is ours against the named "
             "baseline measured in the same run on the same machine; **> 1 = ours better** (for times: "
             "baseline time / our time). Absolute numbers on a shared machine are noise; the ratios are the result.",
             "", "| benchmark | what is measured | named baseline | ours | baseline | ratio (>1 = ours better) | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        name = _cell(r["title"])
        if r["status"] == "failed":
            lines.append(f"| {name} | {_cell(r['measures'])} | {_cell(r['baseline'])} | - | - | **FAILED** | "
                         f"{_cell(r.get('summary') or 'see Failures below')} |")
            continue
        if r["status"] == "skipped":
            lines.append(f"| {name} | {_cell(r['measures'])} | {_cell(r['baseline'])} | - | - | not run | "
                         f"{_cell(r.get('reason', 'not run'))} |")
            continue
        if not r["rows"]:
            lines.append(f"| {name} | {_cell(r['measures'])} | {_cell(r['baseline'])} | - | - | - | no rows reported |")
        for i, row in enumerate(r["rows"]):
            ratio_text = f"**{row['ratio']:.2f}**" if row["ratio"] is not None else "-"
            first = i == 0
            lines.append(f"| {name}: {_cell(row.get('label', ''))} | {_cell(r['measures']) if first else ''} | "
                         f"{_cell(r['baseline']) if first else ''} | {_num(row.get('ours'), row['unit'])} | "
                         f"{_num(row.get('baseline'), row['unit'])} | {ratio_text} | {_cell(row.get('notes', ''))} |")
    shown = [(r, figures.get(r["name"], [])) for r in results if figures.get(r["name"])]
    if figures.get("summary") or shown:
        lines += ["", "## Figures", ""]
        for r, entries in [({"title": "all ratios"}, figures.get("summary", [])), *shown]:
            for fig in entries:
                caption = _cell(f"{r['title']}: {fig['title']}" if fig.get("title") else r["title"])
                lines += [f"![{caption}]({fig['file']})", ""]
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            lines += [f"### {r['title']} ({r['name']})", "",
                      f"exit status {r.get('returncode')}, after {r.get('wall_s', 0):.0f} s. Last lines of stderr:", "",
                      "```", _tail(r.get("error", "")), "```", ""]
    gpus = ", ".join(f"{g['name']} ({g['memory_gb']} GB)" for g in machine.get("gpus") or []) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in (machine.get("versions") or {}).items() if v)
    commit = machine.get("git_commit") or "unknown"
    lines += ["", "## Machine", "",
              f"- CPU: {machine.get('cpu')}, {machine.get('cores')} cores ({machine.get('usable_cores')} usable), "
              f"RAM {machine.get('ram_gb')} GB",
              f"- GPU: {gpus}",
              f"- {machine.get('platform')}, Python {machine.get('python')}; {versions}",
              f"- git commit {commit}" + (" (with uncommitted changes)" if machine.get("git_dirty") else ""),
              f"- load average (1 min) at the start: {machine.get('load_average_1min')}; threads: "
              + ", ".join(f"{k}={v}" for k, v in (machine.get("threads") or {}).items()),
              f"- date: {machine.get('date')}"]
    times = [f"{r['name']} {r['wall_s']:.0f} s" for r in results if isinstance(r.get("wall_s"), (int, float))]
    if times:
        lines.append(f"- wall time per benchmark: {', '.join(times)}")
    return "\n".join(lines) + "\n"


# --- figures -----------------------------------------------------------------------------------------

def _plot(spec: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    lines = spec.get("lines", {})
    if spec.get("kind") == "bar":
        cats = [str(c) for c in spec.get("x", [])]
        width = 0.8 / max(1, len(lines))
        for i, (legend, ys) in enumerate(lines.items()):
            xs = [j + (i - (len(lines) - 1) / 2) * width for j in range(len(cats))]
            ax.bar(xs, ys, width=width, label=legend)
        ax.set_xticks(range(len(cats)), cats, rotation=20 if max(map(len, cats or [""])) > 8 else 0)
    else:
        for legend, ys in lines.items():
            if isinstance(ys, dict):
                ax.plot(ys["x"], ys["y"], label=legend, linewidth=1.2)
            else:
                ax.plot(spec["x"], ys, marker="o", label=legend)
        if spec.get("log_x"):
            ax.set_xscale("log", base=2)
            ax.set_xticks(spec["x"], [str(x) for x in spec["x"]])
    if spec.get("log_y"):
        ax.set_yscale("log")
    ax.set_title(spec.get("title", ""), fontsize=10)
    ax.set_xlabel(spec.get("xlabel", ""))
    ax.set_ylabel(spec.get("ylabel", ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _summary_plot(results: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    bars = [(f"{r['title']}: {row.get('label', '')}", row["ratio"]) for r in results if r["status"] == "ok"
            for row in r["rows"] if row["ratio"] is not None]
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(bars) + 1.2), dpi=110)
    labels, values = zip(*reversed(bars), strict=True)
    ax.barh(range(len(bars)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlim(min(min(values) / 1.5, 0.5), max(max(values) * 1.5, 2.0))
    for i, v in enumerate(values):
        ax.text(v * 1.03, i, f"{v:.2f}", va="center", fontsize=7)
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.set_xlabel("ratio vs named baseline (>1 = ours better, log scale)")
    ax.set_title("All ratios, same-run baselines", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def make_figures(results: list[dict[str, Any]], out_dir: Path, stem: str) -> dict[str, list[dict[str, str]]]:
    """PNG files next to the report; {benchmark name (or "summary"): [{"file", "title"}]}."""
    figures: dict[str, list[dict[str, str]]] = {}
    if _summary_plot(results, out_dir / f"{stem}-summary.png"):
        figures["summary"] = [{"file": f"{stem}-summary.png", "title": "every ratio of this run"}]
    for r in results:
        if r["status"] != "ok":
            continue
        for key, spec in (r.get("series") or {}).items():
            if not isinstance(spec, dict) or not spec.get("lines"):
                continue
            name = f"{stem}-{r['name']}-{re.sub(r'[^a-z0-9]+', '-', key.lower()).strip('-')}.png"
            try:
                _plot(spec, out_dir / name)
            except Exception as err:  # noqa: BLE001 - a bad figure must not lose the report
                print(f"figure {name} skipped: {err}", flush=True)
                continue
            figures.setdefault(r["name"], []).append({"file": name, "title": spec.get("title", key)})
    return figures


def write_report(results: list[dict[str, Any]], out_dir: str | Path, date: str | None = None,
                 machine: dict[str, Any] | None = None, mode: str = "full", wall_s: float | None = None,
                 plots: bool = True) -> dict[str, Path]:
    """Write <out_dir>/<date>.json, <date>.md and the figures; returns their paths. A report from a dirty
    tree (or one whose state is unknown) is `<date>-DIRTY.*`, with DIRTY first in its title line."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = date or dt.date.today().isoformat()
    machine = machine if machine is not None else machine_details()
    title = f"Benchmark report {stem}"
    if machine.get("git_dirty") is not False:  # no clean commit can reproduce it: say so first, name it apart
        stem += "-DIRTY"
        title = f"DIRTY: {title}, from a tree with uncommitted changes (not a reference; no commit reproduces it)"
    normalised = [normalise(r) for r in results]
    figures = make_figures(normalised, out, stem) if plots else {}
    markdown = render_markdown(normalised, machine, figures, title=title, mode=mode, wall_s=wall_s)
    doc = {"date": stem, "mode": mode, "wall_s": wall_s, "machine": machine, "figures": figures,
           "benchmarks": normalised}
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths["markdown"].write_text(markdown)
    return paths

"""Training data path at scale: a streamed stage vs downloading it whole, at 10k and 200k records.

    .venv/bin/python benchmarks/bench_data_scale.py            # 10k and 200k records (~4 min)
    .venv/bin/python benchmarks/bench_data_scale.py --quick    # 2k and 40k

On a private local S3 (SeaweedFS on free loopback ports, in a temporary folder, stopped afterwards), two
shard sets of small records (a 16-px PNG and a two-turn conversation each, 1,000 records a shard, index
written as curation writes it) are published. For each set, two paths open the stage in a fresh Python
process (what a training pod does), each with its own empty local folder:
- ours ("streamed"): `ShardDataset.streaming` (manifest + index.parquet fetched; shards fetched as the
  sampler reaches them into a ShardCache capped at 64 MiB) + `ShardWindowSampler` (window of 4 shards);
- baseline ("download-all", the train step before streaming): `open_shards` (every shard downloaded and
  sha256-checked) + `ShardDataset` + `ModalityLengthGroupedSampler`.
Timed: from opening the stage to the first batch (32 samples, raw record + media bytes, through a
DataLoader in the sampler's order), in 3 fresh processes per size and path taking turns (the median is
reported, every time kept in the details: a single run here moves by +-30%); the interpreter's imports, including those the first S3 call and the
first parquet read make lazily, are done before the clock starts. Reported
per path: that time, the process's peak RSS (VmHWM, imports included: both pay them) and the local
disk it used (bytes under its folder after the first batch). The goal (issue 15): for the streamed path,
200k / 10k <= 1.3 for time and for memory, and disk under the cache cap.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD, BATCH, WINDOW = 1000, 32, 4
CACHE_CAP = 64 << 20
REPEATS = 3  # fresh processes per size and path; the median time is reported (these machines are noisy)
SIZES = {False: (10_000, 200_000), True: (2_000, 40_000)}


def _records(n: int):
    from PIL import Image

    pngs = []
    for i in range(16):  # a few distinct images, reused: the records are small, the count is what grows
        out = io.BytesIO()
        Image.new("RGB", (16, 16), (i * 15, 255 - i * 15, 80)).save(out, format="PNG")
        pngs.append(out.getvalue())
    for i in range(n):
        turns = [{"from": "human", "value": "<image>\nWhat colour is the shape?" + " please" * (i % 9)},
                 {"from": "gpt", "value": f"colour {i % 16}"}]
        meta = {"num_tokens": 40 + i % 200, "modality": "image"}
        yield {"id": f"r{i}", "image": "x.png", "conversations": turns, "meta": meta}, {"x.png": pngs[i % 16]}


def publish_set(n: int, work: Path) -> str:
    from model.shard_writer import write_shards
    from onevision import storage

    folder = work / f"set-{n}"
    write_shards(_records(n), folder, max_per_shard=PER_SHARD)
    uri = f"s3://onevision/bench/data-scale/{n}"
    storage.publish_dir(folder, uri)
    shutil.rmtree(folder)
    return uri


def _status_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process, MB. Not ru_maxrss: Linux carries that across execve, so a
    child would report its parent's peak (here, the parent that generated 200k records)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def child(mode: str, uri: str, folder: str) -> dict[str, Any]:
    """One training pod's data path: open the stage, first batch. Prints and returns the measurements."""
    import torch  # noqa: F401 - imported before the clock, as a training process has it

    from model.batching import ModalityLengthGroupedSampler, ShardWindowSampler
    from model.shards import ShardDataset, open_shards
    from onevision import storage

    # what the first S3 call and the first parquet read import lazily (minio and its crypto, urllib3,
    # pandas through pyarrow's metadata): ~450 modules, ~0.5 s, the same at any size; a training process
    # has them by the time it opens its data (it published nothing yet, but it loaded the model)
    import pandas  # noqa: F401
    storage.s3_client()

    def raw(record: dict, media: dict | None = None) -> tuple[dict, dict]:
        return record, media or {}

    rss_imports = _status_mb("VmRSS")
    started = time.perf_counter()
    if mode == "streamed":
        dataset = ShardDataset.streaming(uri, folder, CACHE_CAP, sample_processor=raw)
        sampler = ShardWindowSampler(*dataset.lengths(), dataset.shard_of(), batch_size=BATCH, window_shards=WINDOW)
    else:
        dataset = ShardDataset(open_shards(uri, folder), sample_processor=raw)
        sampler = ModalityLengthGroupedSampler(*dataset.lengths(), batch_size=BATCH)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=lambda items: items)
    first = next(iter(loader))
    seconds = time.perf_counter() - started
    result = {"mode": mode, "samples": len(dataset), "first_batch_s": seconds, "batch": len(first),
              "peak_rss_mb": _status_mb("VmHWM"),
              "rss_after_imports_mb": rss_imports, "disk_mb": _folder_bytes(Path(folder)) / 2**20,
              "shards_fetched": dataset.cache.fetched if dataset.cache else len(dataset.shards)}
    print(json.dumps(result), flush=True)
    return result


def _run_child(mode: str, uri: str, folder: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_data_scale", "--child", mode, uri, str(folder)],
                          cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {uri}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(quick: bool) -> dict[str, Any]:
    from onevision import stack

    work = Path(tempfile.mkdtemp(prefix="bench-data-scale-"))
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: stop the stack
    began = time.perf_counter()
    info = stack.stack_up(work / "stack", s3_port=stack.free_port_block(10), services=("s3",))
    results: dict[str, dict[str, Any]] = {}
    try:
        os.environ.update(info.env())
        uris, setup_s = {}, {}
        for n in SIZES[quick]:
            generated = time.perf_counter()
            uris[n] = publish_set(n, work)
            setup_s[n] = round(time.perf_counter() - generated, 1)
        tries: dict[str, list[dict[str, Any]]] = {}
        for _ in range(REPEATS):  # the sizes and paths take turns, so that the machine's drift hits them alike
            for n, uri in uris.items():
                for mode in ("streamed", "download-all"):
                    tries.setdefault(f"{mode}/{n}", []).append(_run_child(mode, uri, work / f"pod-{mode}-{n}"))
                    shutil.rmtree(work / f"pod-{mode}-{n}", ignore_errors=True)
        for key, runs in tries.items():  # the run of median time stands for the path; all times are kept
            median = sorted(runs, key=lambda r: r["first_batch_s"])[len(runs) // 2]
            results[key] = {**median, "first_batch_s_runs": [round(r["first_batch_s"], 4) for r in runs],
                            "set_generation_s": setup_s[int(key.split("/")[1])]}
    finally:
        stack.stack_down(work / "stack")
        shutil.rmtree(work, ignore_errors=True)
    small, large = SIZES[quick]
    streamed = lambda key, n: results[f"streamed/{n}"][key]  # noqa: E731
    return {"benchmark": "training data path: streamed vs download-all", "sizes": list(SIZES[quick]),
            "records_per_shard": PER_SHARD, "cache_cap_mb": CACHE_CAP / 2**20, "window_shards": WINDOW,
            "batch": BATCH, "runs": results,
            "streamed_time_ratio_large_vs_small": streamed("first_batch_s", large) / streamed("first_batch_s", small),
            "streamed_rss_ratio_large_vs_small": streamed("peak_rss_mb", large) / streamed("peak_rss_mb", small),
            "bench_wall_s": round(time.perf_counter() - began, 1)}


def run(quick: bool = False) -> dict[str, Any]:
    """The common benchmark protocol (benchmarks/README.md)."""
    raw = measure(quick)
    small, large = raw["sizes"]
    runs = raw["runs"]
    rows = []
    for n in (small, large):
        s, d = runs[f"streamed/{n}"], runs[f"download-all/{n}"]
        rows += [{"label": f"{n:,} records: time to first batch", "ours": round(s["first_batch_s"], 3),
                  "baseline": round(d["first_batch_s"], 3), "unit": "s", "higher_is_better": False,
                  "notes": f"streamed fetched {s['shards_fetched']} of {d['shards_fetched']} shards"},
                 {"label": f"{n:,} records: peak RSS", "ours": round(s["peak_rss_mb"]), "baseline": round(d["peak_rss_mb"]),
                  "unit": "MB", "higher_is_better": False,
                  "notes": f"after imports: {s['rss_after_imports_mb']:.0f} / {d['rss_after_imports_mb']:.0f} MB"},
                 {"label": f"{n:,} records: local disk", "ours": round(s["disk_mb"], 1), "baseline": round(d["disk_mb"], 1),
                  "unit": "MB", "higher_is_better": False, "notes": f"cache cap {raw['cache_cap_mb']:.0f} MB"}]
    for key, what in (("first_batch_s", "time to first batch"), ("peak_rss_mb", "peak RSS")):
        ratio = runs[f"streamed/{large}"][key] / runs[f"streamed/{small}"][key]
        rows.append({"label": f"streamed, {large:,} vs {small:,} records: {what}", "ours": round(runs[f"streamed/{large}"][key], 3),
                     "baseline": round(runs[f"streamed/{small}"][key], 3), "unit": "s" if "_s" in key else "MB",
                     "higher_is_better": False,
                     "notes": f"{large:,} / {small:,} = {ratio:.2f} (goal <= 1.3); baseline column: the {small:,} set"})
    labels = [f"{n:,}" for n in (small, large)]
    return {
        "name": "data_scale", "title": "training data at scale",
        "measures": "time to first batch, peak RSS and local disk of a training process opening a stage "
                    f"({small:,} and {large:,} small records)",
        "baseline": "download-all: open_shards (every shard fetched) + ShardDataset, the train step before streaming",
        "metric": "s / MB", "higher_is_better": False, "rows": rows,
        "series": {
            "first_batch": {"kind": "bar", "title": "time to first batch", "ylabel": "seconds", "x": labels,
                            "lines": {"streamed (ours)": [runs[f"streamed/{n}"]["first_batch_s"] for n in (small, large)],
                                      "download-all (baseline)": [runs[f"download-all/{n}"]["first_batch_s"]
                                                                  for n in (small, large)]}},
            "memory_disk": {"kind": "bar", "title": "peak RSS and local disk", "ylabel": "MB", "x": labels,
                            "lines": {"RSS streamed": [runs[f"streamed/{n}"]["peak_rss_mb"] for n in (small, large)],
                                      "RSS download-all": [runs[f"download-all/{n}"]["peak_rss_mb"] for n in (small, large)],
                                      "disk streamed": [runs[f"streamed/{n}"]["disk_mb"] for n in (small, large)],
                                      "disk download-all": [runs[f"download-all/{n}"]["disk_mb"] for n in (small, large)]}}},
        "details": raw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2k and 40k records")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "URI", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/data_scale.json"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    result = measure(args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

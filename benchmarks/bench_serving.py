"""Serving requests/s at concurrency 1, 4, 16, two workloads: continuous batching vs batch 1, as ratios.

    .venv/bin/python benchmarks/bench_serving.py                  # writes benchmarks/results/serving.json
    .venv/bin/python benchmarks/bench_serving.py --requests 24    # quicker

Same engine, same model (the tiny recipe's, random weights: it practically never emits <|im_end|>, so
an answer runs to its `max_tokens`), same requests (one 112-px image + a question, greedy):
- equal length: every request 16 new tokens. Every row of a batch finishes at the same step: the
  best case for static batching, kept as the earlier figure;
- mixed: `max_tokens` drawn uniformly from 4 to 64 (random.Random(0), the same list for both engines),
  so answers stop at different lengths; a static batch would decode until its longest row finished.
Baseline ("batch_1"): `serving.engine.Engine` with max_batch_size 1 - one request at a time, as a
server without batching runs. Ours: max_batch_size 16, max_wait 10 ms: continuous batching, rows join
and leave at every decoding step. N clients keep one request each in flight (asyncio) until
`--requests` have completed; the engines alternate per concurrency, best of `--repeats`. Also
reported: p50/p99 latency per engine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from PIL import Image

from model.builder import build_tiny
from onevision.recipe import load_recipe
from serving.engine import Engine
from serving.requests import parse_chat_request

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 4, 16)
EQUAL_TOKENS = 16
MIXED_TOKENS = (4, 64)  # inclusive range of the mixed workload's max_tokens
MIXED_SEED = 0
WORKLOADS = {"equal": f"equal length ({EQUAL_TOKENS} tokens)",
             "mixed": f"mixed length ({MIXED_TOKENS[0]}-{MIXED_TOKENS[1]} tokens)"}


def request_body(i: int, max_tokens: int = EQUAL_TOKENS) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (112, 112), ((40 * i) % 255, 120, 200)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": f"What colour is image {i}?"}]}],
            "max_tokens": max_tokens, "temperature": 0}


def workload(name: str, requests: int) -> list[dict]:
    """The request bodies of a workload; the mixed lengths are the same list in every run."""
    if name == "equal":
        return [request_body(i) for i in range(requests)]
    draw = random.Random(MIXED_SEED)
    return [request_body(i, draw.randint(*MIXED_TOKENS)) for i in range(requests)]


async def drive(engine: Engine, bodies: list[dict], concurrency: int) -> tuple[float, list[float]]:
    """Send every body through engine.submit from `concurrency` clients; (requests/s, latencies)."""
    total = len(bodies)
    latencies: list[float] = []
    queue = list(range(total))

    async def client() -> None:
        while queue:
            i = queue.pop()
            start = time.perf_counter()
            await engine.submit(parse_chat_request(bodies[i], engine.limits))
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return total / (time.perf_counter() - start), latencies


def _summary(rate: float, latencies: list[float]) -> dict[str, float]:
    return {"requests_per_s": round(rate, 2), "p50_s": round(statistics.median(latencies), 3),
            "p99_s": round(sorted(latencies)[int(0.99 * (len(latencies) - 1))], 3)}


def measure(requests: int = 48, repeats: int = 2) -> dict:
    """Both engines, both workloads, each concurrency; the raw result (what results/serving.json holds)."""
    model, processor = build_tiny(load_recipe(ROOT / "recipes/tiny.yaml"))
    engines = {"batch_1": Engine(model, processor, max_batch_size=1, max_wait_ms=0),
               "continuous_batching": Engine(model, processor, max_batch_size=16, max_wait_ms=10)}
    for engine in engines.values():  # warm-up (allocator, the decoding thread)
        asyncio.run(drive(engine, workload("equal", 4), 2))
    results: dict[str, Any] = {}
    for name in WORKLOADS:
        bodies = workload(name, requests)
        rows = results[name] = {}
        for concurrency in CONCURRENCY:
            best: dict[str, tuple[float, list[float]]] = {}
            for _ in range(repeats):
                for variant, engine in engines.items():
                    rate, latencies = asyncio.run(drive(engine, bodies, concurrency))
                    if variant not in best or rate > best[variant][0]:
                        best[variant] = (rate, latencies)
            row: dict[str, Any] = {variant: _summary(*best[variant]) for variant in engines}
            row["ratio"] = round(best["continuous_batching"][0] / best["batch_1"][0], 2)
            rows[f"concurrency_{concurrency}"] = row
            print(name, concurrency, row, flush=True)
    mixed = [b["max_tokens"] for b in workload("mixed", requests)]
    return {"benchmark": "serving requests/s, continuous batching vs batch 1, equal-length and mixed workloads",
            "baseline": "Engine(max_batch_size=1)", "requests": requests, "repeats": repeats,
            "workloads": {"equal": {"max_tokens": EQUAL_TOKENS},
                          "mixed": {"max_tokens_range": list(MIXED_TOKENS), "seed": MIXED_SEED,
                                    "mean_max_tokens": round(statistics.mean(mixed), 1)}},
            "model": "tiny (random weights)", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                           "python": platform.python_version()},
            "results": results}


def run(quick: bool = False) -> dict:
    """The common benchmark protocol (benchmarks/README.md)."""
    raw = measure(16 if quick else 48, 1 if quick else 2)
    ours, base = "continuous batching (ours)", "batch 1 (baseline)"
    rows, throughput, latency = [], {}, {}
    for name, title in WORKLOADS.items():
        res = [raw["results"][name][f"concurrency_{c}"] for c in CONCURRENCY]
        rows += [{"label": f"{title}, concurrency {c}", "ours": r["continuous_batching"]["requests_per_s"],
                  "baseline": r["batch_1"]["requests_per_s"],
                  "notes": f"p50 {r['continuous_batching']['p50_s'] * 1000:.0f} ms vs {r['batch_1']['p50_s'] * 1000:.0f} ms, "
                           f"p99 {r['continuous_batching']['p99_s'] * 1000:.0f} ms vs {r['batch_1']['p99_s'] * 1000:.0f} ms"}
                 for c, r in zip(CONCURRENCY, res, strict=True)]
        throughput[f"{ours}, {name}"] = [r["continuous_batching"]["requests_per_s"] for r in res]
        throughput[f"{base}, {name}"] = [r["batch_1"]["requests_per_s"] for r in res]
        latency[f"{ours}, {name}"] = [r["continuous_batching"]["p50_s"] for r in res]
        latency[f"{base}, {name}"] = [r["batch_1"]["p50_s"] for r in res]
    mixed = raw["workloads"]["mixed"]
    return {"name": "serving", "title": "serving",
            "measures": f"requests/s, tiny model (random weights), one 112-px image per request, N asyncio clients "
                        f"until {raw['requests']} complete; equal length: {EQUAL_TOKENS} new tokens each; mixed: "
                        f"max_tokens drawn from {MIXED_TOKENS[0]}-{MIXED_TOKENS[1]} (seed {MIXED_SEED}, mean "
                        f"{mixed['mean_max_tokens']})",
            "baseline": "the same serving.engine.Engine with max_batch_size 1 (one request at a time)",
            "metric": "req/s", "higher_is_better": True, "rows": rows,
            "series": {"throughput": {"kind": "line", "title": "serving throughput vs concurrency",
                                      "xlabel": "concurrent clients", "ylabel": "requests/s", "x": list(CONCURRENCY),
                                      "log_x": True, "lines": throughput},
                       "latency": {"kind": "line", "title": "serving p50 latency vs concurrency",
                                   "xlabel": "concurrent clients", "ylabel": "p50 latency (s)", "x": list(CONCURRENCY),
                                   "log_x": True, "lines": latency}},
            "details": raw}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serving.json"))
    args = parser.parse_args()
    result = measure(args.requests, args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

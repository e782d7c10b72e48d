"""Serving requests/s at concurrency 1, 4, 16: dynamic batching vs one-at-a-time, as ratios.

    .venv/bin/python benchmarks/bench_serving.py                  # writes benchmarks/results/serving.json
    .venv/bin/python benchmarks/bench_serving.py --requests 24    # quicker

Same engine, same model (the tiny recipe's, random weights: every answer runs the full `max_tokens`,
the worst case for batching), same requests (one 112-px image + a question, greedy, 16 new tokens).
Baseline ("one_at_a_time"): `serving.engine.Engine` with max_batch_size 1 - each request is its own
`generate` call, as a server without a batching queue does. Ours: max_batch_size 16, max_wait 10 ms.
N clients keep one request each in flight (asyncio) until `--requests` have completed; variants
alternate per concurrency, best of `--repeats`. Also reported: p50/p99 latency per variant.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

from PIL import Image

from model.builder import build_tiny
from onevision.recipe import load_recipe
from serving.engine import Engine
from serving.requests import parse_chat_request

ROOT = Path(__file__).resolve().parents[1]


def request_body(i: int) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (112, 112), ((40 * i) % 255, 120, 200)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": f"What colour is image {i}?"}]}],
            "max_tokens": 16, "temperature": 0}


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


CONCURRENCY = (1, 4, 16)


def measure(requests: int = 48, repeats: int = 2) -> dict:
    """Both engines at each concurrency; the raw result (what results/serving.json holds)."""
    model, processor = build_tiny(load_recipe(ROOT / "recipes/tiny.yaml"))
    engines = {"one_at_a_time": Engine(model, processor, max_batch_size=1, max_wait_ms=0),
               "dynamic_batching": Engine(model, processor, max_batch_size=16, max_wait_ms=10)}
    asyncio.run(drive(engines["dynamic_batching"], [request_body(i) for i in range(4)], 2))  # warm-up
    rows = {}
    for concurrency in CONCURRENCY:
        best: dict[str, tuple[float, list[float]]] = {}
        for _ in range(repeats):
            for name, engine in engines.items():
                rate, latencies = asyncio.run(drive(engine, [request_body(i) for i in range(requests)], concurrency))
                if name not in best or rate > best[name][0]:
                    best[name] = (rate, latencies)
        rows[f"concurrency_{concurrency}"] = {
            name: {"requests_per_s": round(rate, 2), "p50_s": round(statistics.median(lat), 3),
                   "p99_s": round(sorted(lat)[int(0.99 * (len(lat) - 1))], 3)} for name, (rate, lat) in best.items()}
        rows[f"concurrency_{concurrency}"]["ratio"] = round(best["dynamic_batching"][0] / best["one_at_a_time"][0], 2)
        print(concurrency, rows[f"concurrency_{concurrency}"], flush=True)
    return {"benchmark": "serving requests/s, dynamic batching vs one-at-a-time",
            "baseline": "Engine(max_batch_size=1)", "requests": requests, "repeats": repeats, "max_tokens": 16,
            "model": "tiny (random weights)", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                           "python": platform.python_version()},
            "results": rows}


def run(quick: bool = False) -> dict:
    """The common benchmark protocol (benchmarks/README.md)."""
    raw = measure(16 if quick else 48, 1 if quick else 2)
    res = [raw["results"][f"concurrency_{c}"] for c in CONCURRENCY]
    ours, base = "dynamic batching (ours)", "one at a time (baseline)"
    rows = [{"label": f"concurrency {c}", "ours": r["dynamic_batching"]["requests_per_s"],
             "baseline": r["one_at_a_time"]["requests_per_s"],
             "notes": f"p50 {r['dynamic_batching']['p50_s'] * 1000:.0f} ms vs {r['one_at_a_time']['p50_s'] * 1000:.0f} ms, "
                      f"p99 {r['dynamic_batching']['p99_s'] * 1000:.0f} ms vs {r['one_at_a_time']['p99_s'] * 1000:.0f} ms"}
            for c, r in zip(CONCURRENCY, res, strict=True)]
    return {"name": "serving", "title": "serving",
            "measures": f"requests/s, tiny model (random weights, {raw['max_tokens']} new tokens), one 112-px image per "
                        f"request, N asyncio clients until {raw['requests']} complete",
            "baseline": "the same serving.engine.Engine with max_batch_size 1 (one generate per request)",
            "metric": "req/s", "higher_is_better": True, "rows": rows,
            "series": {"throughput": {"kind": "line", "title": "serving throughput vs concurrency",
                                      "xlabel": "concurrent clients", "ylabel": "requests/s", "x": list(CONCURRENCY),
                                      "log_x": True,
                                      "lines": {ours: [r["dynamic_batching"]["requests_per_s"] for r in res],
                                                base: [r["one_at_a_time"]["requests_per_s"] for r in res]}},
                       "latency": {"kind": "line", "title": "serving p50 latency vs concurrency",
                                   "xlabel": "concurrent clients", "ylabel": "p50 latency (s)", "x": list(CONCURRENCY),
                                   "log_x": True, "lines": {ours: [r["dynamic_batching"]["p50_s"] for r in res],
                                                            base: [r["one_at_a_time"]["p50_s"] for r in res]}}},
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

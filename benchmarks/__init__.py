"""Benchmarks: each `bench_*.py` measures ours against a named baseline in the same run (README.md).

`python -m benchmarks.run_all` (`make bench`) runs them all and writes one report; each script still runs
on its own (`python benchmarks/bench_x.py` writes `benchmarks/results/x.json`).
"""

"""Streamed training on two simulated nodes (issue 15, point 2): each rank reads only its own shards.

torchrun starts 2 ranks (DDP over gloo), each with a local folder of its own
(ONEVISION_LOCAL_DIR=<dir>/node{RANK}); S3 is the only thing they share. The stage, 8 shards on S3, is
streamed through each node's shard cache for one whole epoch (model/rank_sampler.py). What each node
fetched is in its cache's fetched.log: the two are disjoint but for the held-out sample's shard (every
rank measures the held-out loss), together they are the whole stage, and neither node fetched it all.

    pytest tests/integration/test_multinode_streaming.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from components.curate.core import curate_stage
from model.shard_cache import FETCH_LOG
from onevision import storage
from onevision.recipe import load_recipe
from tests.conftest import free_port_block
from tests.integration.test_train import ROOT, small_recipe

pytestmark = pytest.mark.integration


def test_each_node_fetches_only_the_shards_its_rank_owns(local_stack, tmp_path: Path) -> None:
    base = small_recipe(tmp_path, zero=0, steps=6, per_device=2, global_batch=4)  # DDP: the sampler is the point
    curated = tmp_path / "curated.yaml"
    curated.write_text(yaml.safe_dump({"extends": str(base), "curation": {"shard_max_records": 8}}))
    data = f"s3://onevision/tests/multinode-streaming-{uuid.uuid4().hex[:8]}/data"
    curate_stage(load_recipe(curated), "stage1", data, work_dir=str(tmp_path / "curate"), workers=1)
    shards = sorted(rel for rel in storage.read_manifest(data)["files"] if rel.endswith(".tar"))
    assert len(shards) >= 6
    largest = max(storage.read_manifest(data)["files"][rel]["size"] for rel in shards)
    streamed = tmp_path / "streamed.yaml"
    streamed.write_text(yaml.safe_dump({"extends": str(curated), "training": {
        "shard_cache_gb": 3 * largest / 2**30, "shard_window": 2},
        "stages": {"stage1": {"epochs": 1, "max_steps": None}}}))  # one whole epoch

    nodes = tmp_path / "nodes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port_block(1)), "-m", "model.train", "--recipe", str(streamed), "--stage", "stage1", "--data", data,
           "--out", f"{data}-run", "--holdout", "1", "--summary", str(tmp_path / "summary.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "MLFLOW_TRACKING_URI": "",
           "ONEVISION_LOCAL_DIR": str(nodes / "node{RANK}")}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every rank reads every shard" not in done.stdout + done.stderr

    fetched = {}
    for rank in (0, 1):
        (log,) = (nodes / f"node{rank}").rglob(FETCH_LOG)
        fetched[rank] = log.read_text().split()
    both = set(fetched[0]) & set(fetched[1])
    assert len(both) <= 1, both  # the held-out sample's shard, which every rank reads for the held-out loss
    assert set(fetched[0]) | set(fetched[1]) == set(shards)  # one whole epoch
    assert all(len(set(names)) < len(shards) for names in fetched.values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["losses"] and summary["eval_loss_after"] < summary["eval_loss_before"]

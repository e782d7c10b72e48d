"""Nodes that share no disk (issue 16, part 1), played on one machine the way a cluster behaves.

torchrun starts 2 processes (gloo, ZeRO-3, DS_ACCELERATOR=cpu); each gets its own local folder
(ONEVISION_LOCAL_DIR=<dir>/node{RANK}, what a TrainJob's emptyDir is to a node) and the only thing they
share is the real local S3: the curated shards, the checkpoints, the HF folder. One rank is SIGKILLed
after a checkpoint is published (torchrun then stops the other); both restart, rank 1 on an empty folder
(its node was replaced), rank 0 on the folder it had. The merged weights equal the uninterrupted run's,
bit for bit, and each rank fetched only its own part of the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from components.curate.core import curate_stage
from model.checkpoints import latest_complete_checkpoint, owner
from onevision import storage
from onevision.recipe import load_recipe
from tests.conftest import free_port_block
from tests.integration.test_faults import drain
from tests.integration.test_train import ROOT, small_recipe

pytestmark = pytest.mark.integration
STEPS, SAVE_EVERY = 6, 2  # checkpoints 2, 4, 6


@pytest.fixture(scope="module")
def world(local_stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(recipe, curated Stage-1 shards in S3, an S3 prefix for this module's runs)."""
    tmp = tmp_path_factory.mktemp("multinode")
    recipe = small_recipe(tmp, zero=3, steps=STEPS, save_every=SAVE_EVERY, per_device=4, global_batch=8)
    prefix = f"s3://onevision/multinode-{uuid.uuid4().hex[:8]}"
    curate_stage(load_recipe(recipe), "stage1", f"{prefix}/data", work_dir=str(tmp / "curate"), workers=1)
    return recipe, f"{prefix}/data", prefix


def launch(recipe: Path, data: str, out: str, nodes: Path, summary: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port_block(1)), "-m", "model.train", "--recipe", str(recipe), "--stage", "stage1",
           "--data", data, "--out", out, "--holdout", "16", "--summary", str(summary)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": "", "ONEVISION_LOCAL_DIR": str(nodes / "node{RANK}")}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    lines, reader = drain(proc)
    proc.wait(timeout=timeout)
    reader.join(timeout=30)
    return "".join(lines)


def worker(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process of this global rank (from its environment)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun {launcher.pid}")


def hf_weights(out: str, local: Path) -> dict[str, torch.Tensor]:
    from model.builder import load_pretrained

    storage.get_dir(f"{out}/hf", local)
    return load_pretrained(str(local))[0].state_dict()


def test_sigkill_of_one_rank_then_both_restart_on_their_own_disks(tmp_path: Path, world) -> None:
    recipe, data, prefix = world
    started = time.monotonic()

    # --- the uninterrupted run ------------------------------------------------------------------------
    ref_out, ref_nodes = f"{prefix}/ref", tmp_path / "ref-nodes"
    output = finish(launch(recipe, data, ref_out, ref_nodes, tmp_path / "ref.json"))
    assert "\n[train] done:" in output, output[-4000:]
    took = {"uninterrupted": time.monotonic() - started}
    reference = json.loads((tmp_path / "ref.json").read_text())
    assert len(reference["losses"]) == STEPS
    step, uri = latest_complete_checkpoint(ref_out)
    manifest = storage.read_manifest(uri)
    assert step == STEPS and manifest["metadata"]["world_size"] == 2
    # every rank's partitions are published, by the rank that wrote them; the shared files by rank 0
    assert {(owner(rel), info["rank"]) for rel, info in manifest["files"].items()} == {(None, 0), (0, 0), (1, 1)}
    assert sum(owner(rel) == 1 for rel in manifest["files"]) == 3  # model and optimizer partitions, RNG state
    node1 = sorted(p.relative_to(ref_nodes / "node1").as_posix() for p in (ref_nodes / "node1").rglob("*") if p.is_file())
    assert not [f for f in node1 if owner(f) == 0], "rank 1's disk holds rank 0's partitions: the disks are shared"
    assert sorted({f.split("/")[1] for f in node1 if f.startswith("checkpoints/")}) == ["checkpoint-4", "checkpoint-6"]

    # --- rank 1 SIGKILLed once a checkpoint is published ---------------------------------------------
    out, nodes = f"{prefix}/killed", tmp_path / "nodes"
    proc = launch(recipe, data, out, nodes, tmp_path / "killed.json")
    lines, reader = drain(proc)
    deadline = time.monotonic() + 300
    while latest_complete_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "".join(lines)[-4000:]
    os.kill(worker(proc, 1), signal.SIGKILL)
    proc.wait(timeout=120)  # torchrun stops rank 0 and fails
    reader.join(timeout=30)
    assert proc.returncode != 0, "".join(lines)[-3000:]
    assert not storage.exists(f"{out}/hf/{storage.MANIFEST_NAME}")
    took["killed"] = time.monotonic() - started - sum(took.values())
    step, uri = latest_complete_checkpoint(out)
    assert 0 < step < STEPS, f"killed at checkpoint-{step}: not in the middle of the stage"
    files = storage.read_manifest(uri)["files"]  # rotated away by the end of the restarted run

    # --- both restart: rank 1 on a new, empty disk, rank 0 on the one it had --------------------------
    shutil.rmtree(nodes / "node1")
    output = finish(launch(recipe, data, out, nodes, tmp_path / "resumed.json"))
    took["restarted"] = time.monotonic() - started - sum(took.values())
    assert "\n[train] done:" in output, output[-4000:]
    assert f"resuming from {uri} (step {step})" in output
    shared = sum(owner(rel) is None for rel in files)
    # rank 1 fetched the shared files and its own three; rank 0 had its part on its disk already
    assert f"rank 1: {uri}: {shared + 3} of {len(files)} files for ranks [1] ({shared + 3} fetched)" in output, output
    assert f"rank 0: {uri}: {shared + 3} of {len(files)} files for ranks [0] (0 fetched)" in output, output
    # the merge on rank 0 took rank 1's partitions of the final checkpoint from S3
    final = f"{out}/checkpoints/checkpoint-{STEPS}"
    assert f"rank 0: {final}: {len(files)} of {len(files)} files for every rank (3 fetched)" in output, output
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["losses"] == pytest.approx(reference["losses"], rel=1e-6)
    w_ref, w_res = hf_weights(ref_out, tmp_path / "hf-ref"), hf_weights(out, tmp_path / "hf-res")
    assert w_ref.keys() == w_res.keys()
    assert [k for k in w_ref if not torch.equal(w_ref[k], w_res[k])] == []
    # rotation kept the two newest complete checkpoints in S3
    names = {re.search(r"checkpoint-\d+", u).group() for u in storage.list_uris(f"{out}/checkpoints")}
    assert names == {"checkpoint-4", "checkpoint-6"}
    print(f"killed at checkpoint-{step};", ", ".join(f"{k} {v:.0f}s" for k, v in took.items()))

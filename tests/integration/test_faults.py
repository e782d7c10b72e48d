"""Faults the platform survives (issue 10): the S3 store restarting under a checkpoint upload, the MLflow
server down when a step starts, the trainer SIGKILLed three times in a row, the disk filling up during
curation. Each fault is real where it can be (processes stopped and killed, the kernel's ENOSPC from
/dev/full) and injected at the narrowest boundary where it cannot (a volume with N bytes free).

Everything runs on loopback, is bounded by timeouts, and leaves the session's stack as it found it: a
test that stops a service stops its own private instance. Training is the tiny recipe's Stage-1 for 12
steps on a 64-sample world, compared bit for bit with one uninterrupted run of the same seed.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from components.curate.core import DiskFullError, curate_stage, run
from model.shards import ShardDataset, open_shards
from model.train import fetch_checkpoint, latest_complete_checkpoint
from onevision import stack, storage, tracking
from onevision.recipe import load_recipe, parse_recipe
from tests.conftest import free_port_block
from tests.integration.test_train import small_recipe, train, weights

pytestmark = pytest.mark.integration

STEPS, SAVE_EVERY = 12, 3  # checkpoints 3, 6, 9, 12; 8 steps an epoch, so a resume may cross an epoch
UNTRACKED = {"MLFLOW_TRACKING_URI": ""}  # the trainer tracks only when this is set and non-empty


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that are not bit-identical (empty when the two models are the same)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(recipe path, local Stage-1 shards): the tiny recipe cut to STEPS steps, curated once."""
    tmp = tmp_path_factory.mktemp("faults")
    recipe = small_recipe(tmp, steps=STEPS, save_every=SAVE_EVERY)
    curate_stage(load_recipe(recipe), "stage1", str(tmp / "stage1"), work_dir=str(tmp / "work"), workers=1)
    return recipe, tmp / "stage1"


@pytest.fixture(scope="module")
def reference(world: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run: its --out (checkpoints 9 and 12 kept), summary and final weights."""
    recipe, data = world
    out = tmp_path_factory.mktemp("reference") / "ref"
    done, summary = train(recipe, "stage1", data, out, env=UNTRACKED)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert len(summary["losses"]) == STEPS
    return {"out": out, "summary": summary, "weights": weights(out)}


def drain(proc: subprocess.Popen) -> tuple[list[str], threading.Thread]:
    """Read proc's output into a list as it comes (a full pipe would stall the trainer)."""
    lines: list[str] = []

    def read() -> None:
        while line := proc.stdout.readline():
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


def kill_when(proc: subprocess.Popen, ready: Any, delay: float, timeout: float = 300) -> list[str]:
    """SIGKILL `proc` `delay` seconds after ready(lines so far) first holds; returns its output."""
    lines, reader = drain(proc)
    try:
        deadline = time.monotonic() + timeout
        while not ready(lines) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=30)
    return lines


# --- 1. S3 stopped during a checkpoint upload, then restarted ------------------------------------------

def test_s3_restart_during_a_checkpoint_upload(tmp_path: Path, world, reference, monkeypatch) -> None:
    """A private S3 server (the session's stays up) is stopped the moment the trainer starts publishing
    checkpoint-12 and started again. Storage retries with backoff carry the upload over the outage and
    the stage completes. The --out holds what an earlier attempt left: checkpoint-9 published, and
    checkpoint-12's upload cut (objects, one of them torn, no manifest); resume must take checkpoint-9."""
    recipe, data = world
    state, port = tmp_path / "s3", free_port_block(10)
    info = stack.stack_up(state, s3_port=port, services=("s3",))
    proc = None
    try:
        env = {**info.env(), **UNTRACKED}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        out = f"s3://onevision/faults-{uuid.uuid4().hex[:8]}/stage1"
        checkpoints = reference["out"] / "checkpoints"
        storage.publish_dir(checkpoints / "checkpoint-9", f"{out}/checkpoints/checkpoint-9")
        cut = storage.put_dir(checkpoints / "checkpoint-12", f"{out}/checkpoints/checkpoint-12")
        torn = next(u for u in cut if u.endswith("trainer_state.json"))
        storage.write_bytes(torn, b'{"global_step": 12, "log_hist')
        assert latest_complete_checkpoint(out) == (9, f"{out}/checkpoints/checkpoint-9")

        work = tmp_path / "work"
        proc = train(recipe, "stage1", data, out, "--work-dir", str(work), "--summary", str(tmp_path / "summary.json"),
                     env=env, wait=False)
        lines, reader = drain(proc)
        marker = work / "checkpoints" / "checkpoint-12" / "model_signature.json"  # written just before the upload
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, "the trainer ended before its checkpoint-12 upload:\n" + "".join(lines)[-3000:]
        started = time.monotonic()
        assert stack.stack_down(state) == ["s3"]  # SIGTERM: connections are refused from here on
        stack.stack_up(state, s3_port=port, services=("s3",))
        outage = time.monotonic() - started
        proc.wait(timeout=300)
        reader.join(timeout=30)
        output = "".join(lines)
        assert proc.returncode == 0, output[-4000:]
        retries = [line for line in output.splitlines() if re.search(r"; retry \d+ of \d+ in", line)]
        print(f"S3 was down for {outage:.1f}s; the trainer retried:", *retries, sep="\n  ")
        assert any("checkpoints/checkpoint-12/" in line for line in retries), (
            "the outage did not hit the checkpoint upload:\n" + "\n".join(retries or output.splitlines()[-30:]))
        assert f"resuming from {out}/checkpoints/checkpoint-9 (step 9)" in output, "the cut checkpoint-12 was taken"
        # what the restarted store holds verifies: both kept checkpoints and the HF folder (sizes, sha256)
        assert latest_complete_checkpoint(out) == (12, f"{out}/checkpoints/checkpoint-12")
        for step in (9, 12):
            storage.get_dir(f"{out}/checkpoints/checkpoint-{step}", tmp_path / "verify" / str(step))
        storage.get_dir(f"{out}/hf", tmp_path / "hf")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        stack.stack_down(state)
    from model.builder import load_pretrained

    assert same_weights(reference["weights"], load_pretrained(str(tmp_path / "hf"))[0].state_dict()) == []


def test_resume_skips_a_checkpoint_without_manifest_and_refetches_a_cut_download(tmp_path: Path, reference) -> None:
    """latest_complete_checkpoint ignores a prefix whose upload was cut (objects, no manifest), however
    new; a local copy of the chosen checkpoint whose download was cut is fetched again, not trusted."""
    out = tmp_path / "out"
    for step in (9, 12):
        name = f"checkpoint-{step}"
        shutil.copytree(reference["out"] / "checkpoints" / name, out / "checkpoints" / name)
    assert latest_complete_checkpoint(str(out)) == (12, str(out / "checkpoints" / "checkpoint-12"))
    (out / "checkpoints" / "checkpoint-12" / storage.MANIFEST_NAME).unlink()  # a republish cut after its first step
    shutil.copytree(out / "checkpoints" / "checkpoint-9", out / "checkpoints" / "checkpoint-15")
    (out / "checkpoints" / "checkpoint-15" / storage.MANIFEST_NAME).unlink()
    assert latest_complete_checkpoint(str(out)) == (9, str(out / "checkpoints" / "checkpoint-9"))

    uri, local = str(out / "checkpoints" / "checkpoint-9"), tmp_path / "work" / "checkpoints" / "checkpoint-9"
    files = storage.read_manifest(uri)["files"]
    fetch_checkpoint(uri, local)
    rng_state = next(local.glob("rng_state*.pth"))
    rng_state.unlink()  # the download was killed before its last files ...
    (local / "trainer_state.json").write_bytes(b"")  # ... and one file is empty
    assert fetch_checkpoint(uri, local) == local
    for rel, info in files.items():
        assert storage.sha256_file(local / rel) == info["sha256"], rel
    assert not list((tmp_path / "work").glob(".download-*"))


# --- 2. MLflow down when a step starts ------------------------------------------------------------------

def test_mlflow_down_fails_a_step_fast_and_a_rerun_loses_nothing(tmp_path: Path, world, reference, local_stack,
                                                                  monkeypatch) -> None:
    """With MLflow's own client settings (minutes of retries), a step whose tracking server is down fails
    in seconds, names the URI and leaves nothing behind; the same command with the server back completes
    (for training: the same weights as the reference run)."""
    from mlflow.tracking import MlflowClient

    recipe, data = world
    parent = tracking.ensure_pipeline_run(load_recipe(recipe), f"faults-{uuid.uuid4().hex[:8]}")
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # production defaults
        monkeypatch.delenv(key, raising=False)
    dead = f"http://127.0.0.1:{free_port_block(1)}"

    # the train step, as a pipeline pod runs it
    out = tmp_path / "stage1"
    started = time.monotonic()
    done, _ = train(recipe, "stage1", data, out, "--mlflow-parent", parent, env={"MLFLOW_TRACKING_URI": dead})
    took = time.monotonic() - started
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"MLflow tracking server {dead} is not reachable" in done.stderr
    assert took < 45, f"a down tracking server took {took:.0f}s to fail the step"
    print(f"train step, MLflow down: failed in {took:.1f}s (process start included)")
    assert not out.exists(), "nothing is written before the check"
    done, summary = train(recipe, "stage1", data, out, "--mlflow-parent", parent,
                          env={"MLFLOW_TRACKING_URI": local_stack.mlflow_uri})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert same_weights(reference["weights"], weights(out)) == []
    client = MlflowClient(local_stack.mlflow_uri)
    runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [(r.data.tags[tracking.TAG_STEP], r.info.status) for r in runs] == [("stage1", "FINISHED")]
    assert runs[0].data.metrics["eval_loss_after"] == pytest.approx(summary["eval_loss_after"])

    # curation, in process: a server that is down, then one that accepts connections and never answers
    curated, work = tmp_path / "curated", tmp_path / "curate-work"
    monkeypatch.setenv("ONEVISION_MLFLOW_CHECK_TIMEOUT", "2")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        for kind, uri in (("down", dead), ("silent", f"http://127.0.0.1:{silent.getsockname()[1]}")):
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            started = time.monotonic()
            with pytest.raises(tracking.TrackingError, match=f"tracking server {re.escape(uri)} is not reachable"):
                run(str(recipe), "stage1", str(curated), workers=1, mlflow_parent=parent, work_dir=str(work))
            took = time.monotonic() - started
            print(f"curation, MLflow {kind}: failed in {took:.1f}s")
            assert took < 10
    assert not curated.exists() and not list(work.glob("publish-*"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_stack.mlflow_uri)
    result = run(str(recipe), "stage1", str(curated), workers=1, mlflow_parent=parent, work_dir=str(work))
    assert result["manifest_sha256"] == storage.manifest_hash(str(curated)) and result["kept"] == 64
    steps = {r.data.tags[tracking.TAG_STEP]: r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert steps["curate_stage1"].info.status == "FINISHED" and steps["curate_stage1"].data.metrics["kept"] == 64


# --- 3. SIGKILL at random points, three times in a row --------------------------------------------------

def test_three_sigkills_at_random_points_then_the_uninterrupted_weights(tmp_path: Path, world, reference) -> None:
    """Kill points come from a seeded RNG. The first two fall anywhere in the training (where state is
    written): after the n-th step this process reports (its `[progress]` line) plus up to a step, so inside a step, a checkpoint
    save or its upload. The third falls in the last window: after the final checkpoint is published and
    before the stage's HF folder is (where a resumed Trainer used to train a 13th step). Each rerun keeps
    --out; the work dir is kept (a restarted container) or fresh (a new pod, which downloads)."""
    recipe, data = world
    rng = random.Random(20261110)
    out = tmp_path / "out"
    final = out / "checkpoints" / f"checkpoint-{STEPS}" / storage.MANIFEST_NAME
    kills = []
    for attempt in range(3):
        resumed = latest_complete_checkpoint(str(out))
        start = resumed[0] if resumed else 0
        after, delay, fresh = rng.randint(1, max(1, STEPS - start - 1)), rng.uniform(0.0, 0.05), rng.random() < 0.5
        work = tmp_path / (f"work-{attempt}" if fresh else "work")
        proc = train(recipe, "stage1", data, out, "--work-dir", str(work),
                     env={**UNTRACKED, "PYTHONUNBUFFERED": "1"}, wait=False)
        if attempt < 2:
            lines = kill_when(proc, lambda lines, n=after: sum(x.startswith("[progress] stage1 step ") for x in lines) >= n, delay)
            kills.append(f"from step {start}: after {after} steps + {delay * 1000:.0f} ms")
        else:
            lines = kill_when(proc, lambda lines: final.exists(), delay)
            kills.append(f"from step {start}: {delay * 1000:.0f} ms after checkpoint-{STEPS} was published")
        kills[-1] += f" ({'fresh' if fresh else 'same'} work dir)"
        assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
        assert (start > 0) == any("resuming from" in line for line in lines), "".join(lines)[-3000:]
    print("kills:", *kills, sep="\n  ")
    assert latest_complete_checkpoint(str(out)) == (STEPS, str(final.parent))
    assert not (out / "hf" / storage.MANIFEST_NAME).exists(), "the third kill came after the stage had finished"

    done, summary = train(recipe, "stage1", data, out, "--work-dir", str(tmp_path / "work"), env=UNTRACKED)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert summary["steps"] == STEPS, "the resumed Trainer stepped past the end of the schedule"
    assert summary["losses"] == reference["summary"]["losses"]
    assert "nothing left to train" in done.stdout
    for key in ("train_loss", "eval_loss_before", "eval_loss_after"):
        assert summary[key] == reference["summary"][key], key
    assert same_weights(reference["weights"], weights(out)) == []


def test_streamed_training_killed_then_resumed_gives_the_uninterrupted_weights(tmp_path: Path, world,
                                                                                 local_stack) -> None:
    """training.shard_cache_gb: the stage is read from S3 through a cache of three shards (of eight), a
    window of two shards at a time. One run straight through; one SIGKILLed after a few steps, resumed in a
    fresh work dir (a new pod: an empty cache). Same losses, same weights; the cache never held the stage."""
    import yaml

    from model.shard_writer import write_shards

    recipe, data = world
    local = ShardDataset(open_shards(str(data)))
    write_shards((local.raw(i) for i in range(len(local))), tmp_path / "resharded", max_per_shard=len(local) // 8 + 1)
    largest = max(p.stat().st_size for p in (tmp_path / "resharded").glob("*.tar"))
    shards = len(list((tmp_path / "resharded").glob("*.tar")))
    uri = f"s3://onevision/tests/faults/streamed-{uuid.uuid4().hex[:8]}"
    storage.publish_dir(tmp_path / "resharded", uri)
    streamed = tmp_path / "streamed.yaml"
    streamed.write_text(yaml.safe_dump({"extends": str(recipe), "training": {
        "shard_cache_gb": 3 * largest / 2**30, "shard_window": 2}}))

    done, straight = train(streamed, "stage1", uri, tmp_path / "ref", env=UNTRACKED)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    cache = tmp_path / "ref-work" / "data" / "stream" / storage.parse_s3(uri).key
    assert 0 < len(list(cache.glob("*.tar"))) <= 3 < shards  # never the whole stage on local disk

    out = tmp_path / "out"
    proc = train(streamed, "stage1", uri, out, "--work-dir", str(tmp_path / "pod-1"),
                 env={**UNTRACKED, "PYTHONUNBUFFERED": "1"}, wait=False)
    lines = kill_when(proc, lambda lines: sum(x.startswith("[progress] stage1 step ") for x in lines) >= 5, 0.01)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    done, resumed = train(streamed, "stage1", uri, out, "--work-dir", str(tmp_path / "pod-2"), env=UNTRACKED)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr
    assert resumed["losses"] == straight["losses"][-len(resumed["losses"]):]
    for key in ("train_loss", "eval_loss_before", "eval_loss_after"):
        assert resumed[key] == straight[key], key
    assert same_weights(weights(tmp_path / "ref"), weights(out)) == []


# --- 4. the disk fills up during curation ----------------------------------------------------------------

def test_disk_full_during_curation_publishes_nothing(tmp_path: Path, world, monkeypatch) -> None:
    """(a) The work volume is full when the second shard is written: its file is /dev/full, where every
    write gets the kernel's own ENOSPC through the real writer (model/shard_writer -> tarfile -> io). (b) The out
    volume fills up halfway through publishing the second shard: the one copy the publish makes goes onto
    a volume with that many bytes free, then write() fails with ENOSPC, as the kernel's would. Either
    way: a DiskFullError that says so and names the path, no manifest and no shard at `out`, no staged
    files left on the full disk; then the same call with space publishes everything."""
    recipe_path, _ = world
    doc = load_recipe(recipe_path).model_dump(mode="json")
    doc["curation"]["shard_max_records"] = 16  # 64 samples: 4 shards
    recipe = parse_recipe(doc)
    work = tmp_path / "work"

    def nothing_published(out: Path) -> None:
        with pytest.raises(storage.ManifestMissingError):
            storage.read_manifest(str(out))
        assert storage.list_uris(str(out)) == [], "objects of a failed publish stay behind"
        with pytest.raises(FileNotFoundError):
            open_shards(str(out))  # the training reader finds nothing to read, even without the manifest
        assert not list(work.glob("publish-*")), "staged shards stay on the full disk"

    # (a) the work volume is full from the second shard on
    real_mkdtemp = tempfile.mkdtemp

    def staging_on_a_full_disk(*args: Any, **kwargs: Any) -> str:
        path = real_mkdtemp(*args, **kwargs)
        if Path(path).name.startswith("publish-"):
            os.symlink("/dev/full", Path(path) / "shard-000001.tar")
        return path

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkdtemp", staging_on_a_full_disk)
        with pytest.raises(DiskFullError) as err:
            curate_stage(recipe, "stage1", str(tmp_path / "out-a"), work_dir=str(work), workers=1)
    assert err.value.errno == errno.ENOSPC and isinstance(err.value.__cause__, OSError)
    assert "disk full (No space left on device)" in str(err.value) and str(work / "publish-stage1-") in str(err.value)
    nothing_published(tmp_path / "out-a")

    # (b) the out volume fills up in the middle of shard-000001.tar
    out = tmp_path / "out-b"
    real_copy = shutil.copyfileobj

    def onto_a_small_volume(src: Any, dst: Any, length: int = 0) -> None:
        target = os.readlink(f"/proc/self/fd/{dst.fileno()}")
        if not (target.startswith(str(out)) and ".shard-000001.tar." in target):
            return real_copy(src, dst, length)
        free = os.fstat(src.fileno()).st_size // 2
        dst.write(src.read(free))
        dst.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write(2) returns on a full volume

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "copyfileobj", onto_a_small_volume)
        with pytest.raises(DiskFullError) as err:
            curate_stage(recipe, "stage1", str(out), work_dir=str(work), workers=1)
    assert err.value.errno == errno.ENOSPC
    assert "disk full" in str(err.value) and str(out / "shard-000001.tar") in str(err.value)
    nothing_published(out)
    assert not [p for p in out.rglob("*") if p.is_file()], "a temporary .part file stays behind"

    # with space again, the same call publishes all four shards
    summary = curate_stage(recipe, "stage1", str(out), work_dir=str(work), workers=1)
    assert [s["name"] for s in summary["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert len(ShardDataset(open_shards(str(out)))) == storage.read_manifest(str(out))["metadata"]["kept"] == 64

"""Checkpoints of processes that share no disk (model/checkpoints.py), without training: who owns which file,
when a manifest is complete, resume and rotation choosing complete checkpoints only, a rank's partial fetch,
and the publish collective of two real gloo processes (each with its own folder), one of which fails."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from model.checkpoints import (CheckpointError, CheckpointPublisher, fetch_checkpoint, latest_complete_checkpoint,
                               missing_parts, owner)
from onevision import storage

SHARED = ["trainer_state.json", "model_signature.json", "config.json", "latest", "scheduler.pt"]


def rank_files(rank: int, step: int) -> list[str]:
    """What rank `rank` writes in a ZeRO-3 checkpoint of several processes (names as DeepSpeed and the Trainer write them)."""
    return [f"global_step{step}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
            f"global_step{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"rng_state_{rank}.pth"]


def publish(root: Path, step: int, ranks: list[int], world: int | None, drop: set[str] = frozenset()) -> str:
    """A checkpoint under root/checkpoints with these ranks' files (less `drop`) and a manifest naming them."""
    uri = str(root / "checkpoints" / f"checkpoint-{step}")
    files = {}
    for rel in SHARED + [f for r in ranks for f in rank_files(r, step)]:
        if rel in drop:
            continue
        data = f"{rel} at {step}".encode()
        storage.write_bytes(storage.join(uri, rel), data)
        files[rel] = {"size": len(data), "sha256": storage.sha256_file(storage.join(uri, rel))}
    storage.write_manifest(uri, files, {"step": step, **({"world_size": world} if world else {})})
    return uri


def test_each_file_has_its_owner() -> None:
    assert owner("global_step8/zero_pp_rank_11_mp_rank_00_optim_states.pt") == 11
    assert owner("global_step8/bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert owner("rng_state_1.pth") == 1
    for shared in ["rng_state.pth", "global_step8/mp_rank_00_model_states.pt", "latest", "trainer_state.json"]:
        assert owner(shared) is None, shared


def test_a_manifest_missing_one_ranks_files_is_incomplete(tmp_path: Path) -> None:
    files = {rel: {} for rel in SHARED + rank_files(0, 4) + rank_files(1, 4)}
    assert missing_parts({"files": files, "metadata": {"world_size": 2}}) == []
    lost = dict(files)
    del lost["global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert missing_parts({"files": lost, "metadata": {"world_size": 2}}) == [
        "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    only_rank0 = {rel: {} for rel in SHARED + rank_files(0, 4)}
    assert len(missing_parts({"files": only_rank0, "metadata": {"world_size": 2}})) == 3
    # what the rank-0-only publisher wrote for a run of several processes: no world size, rank 0's files
    assert missing_parts({"files": only_rank0, "metadata": {}})
    one_process = {rel: {} for rel in SHARED + ["rng_state.pth", "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt"]}
    assert missing_parts({"files": one_process, "metadata": {"world_size": 1}}) == []
    assert missing_parts({"files": {"rng_state.pth": {}}, "metadata": {}}) == ["trainer_state.json", "model_signature.json"]


def test_resume_and_rotation_take_complete_checkpoints_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    publish(out, 2, [0, 1], 2)
    publish(out, 4, [0, 1], 2)
    publish(out, 6, [0], 2)  # rank 1's files never came
    publish(out, 8, [0, 1], 2, drop={"rng_state_1.pth"})
    newest = publish(out, 10, [0, 1], 2)
    storage.delete(storage.join(newest, "global_step10/zero_pp_rank_1_mp_rank_00_model_states.pt"))  # named, not there
    (out / "checkpoints" / "checkpoint-12").mkdir()
    (out / "checkpoints" / "checkpoint-12" / storage.MANIFEST_NAME).write_text("{not json")
    assert latest_complete_checkpoint(str(out)) == (4, str(out / "checkpoints" / "checkpoint-4"))

    publish(out, 14, [0, 1], 2)
    storage.put_dir(out / "checkpoints" / "checkpoint-2", str(out / "checkpoints" / "checkpoint-16"))  # cut: no manifest
    CheckpointPublisher(str(out), {}, keep=2)._rotate()
    # 4 and 14 are the two newest complete; 2 is old; 6-12 are debris; 16 (newer, torn) is left to be republished
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if any(f.is_file() for f in p.rglob("*"))) == [
        "checkpoint-14", "checkpoint-16", "checkpoint-4"]
    assert latest_complete_checkpoint(str(out)) == (14, str(out / "checkpoints" / "checkpoint-14"))


def test_a_rank_fetches_its_own_part_and_an_incomplete_checkpoint_is_refused(tmp_path: Path) -> None:
    uri = publish(tmp_path / "out", 4, [0, 1], 2)
    local = tmp_path / "node1" / "checkpoints" / "checkpoint-4"
    fetch_checkpoint(uri, local, ranks=[1])
    got = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert got == sorted(SHARED + rank_files(1, 4))
    (local / "rng_state_1.pth").write_bytes(b"cut")  # a download cut short is fetched again, not trusted
    fetch_checkpoint(uri, local, ranks=[1])
    assert (local / "rng_state_1.pth").read_bytes() == b"rng_state_1.pth at 4"
    assert not list((tmp_path / "node1").glob(".download-*"))
    with pytest.raises(CheckpointError, match="incomplete"):
        fetch_checkpoint(publish(tmp_path / "out", 6, [0], 2), tmp_path / "x" / "checkpoints" / "checkpoint-6")


# --- the publish collective: two gloo processes, a folder each ---------------------------------------

class _Args:
    def __init__(self, output_dir: Path):
        self.output_dir = str(output_dir)


class _State:
    global_step = 4


def _node(rank: int, port: int, root: str, queue) -> None:
    """One 'node': its own folder, its own files; publishes checkpoint-4 twice: rank 1's upload fails the
    first time (S3 refuses its rng_state), then succeeds."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    folder = Path(root) / f"node{rank}" / "checkpoints"
    for rel in (SHARED if rank == 0 else []) + rank_files(rank, 4):
        (folder / "checkpoint-4" / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / "checkpoint-4" / rel).write_text(f"{rel} by {rank}")
    real_put = storage.put_file

    def refused(local, uri):
        if "rng_state" in str(local):
            raise storage.StorageError(f"put {uri}: connection refused")
        return real_put(local, uri)

    publisher = CheckpointPublisher(str(Path(root) / "out"), {"w": [1]})
    for attempt in ("refused", "ok"):
        storage.put_file = refused if rank == 1 and attempt == "refused" else real_put
        try:
            publisher.on_save(_Args(folder), _State(), None)
            queue.put((attempt, rank, "published"))
        except CheckpointError as err:
            queue.put((attempt, rank, str(err)))
        torch.distributed.barrier()
        if rank == 0 and attempt == "refused":  # what the refused publish left: objects, and a manifest or not
            queue.put(("manifest", 0, storage.exists(str(Path(root) / "out/checkpoints/checkpoint-4" / storage.MANIFEST_NAME))))
    torch.distributed.destroy_process_group()


def test_every_rank_uploads_its_files_and_rank0_writes_the_manifest_last(tmp_path: Path) -> None:
    """Two real processes (fork: no second interpreter start-up) in a gloo world, a folder each."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_node, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    results = {(attempt, rank): message for attempt, rank, message in (queue.get(timeout=5) for _ in range(5))}
    # the failed upload: both ranks raise, naming rank 1's error; no manifest was written
    assert all("rank 1: StorageError: put" in results["refused", r] for r in (0, 1)), results
    assert results["manifest", 0] is False
    assert results["ok", 0] == results["ok", 1] == "published"
    uri = str(tmp_path / "out" / "checkpoints" / "checkpoint-4")
    manifest = storage.read_manifest(uri)
    assert manifest["metadata"] == {"step": 4, "world_size": 2}
    assert {rel: info["rank"] for rel, info in manifest["files"].items()} == {
        **{rel: 0 for rel in SHARED + rank_files(0, 4)}, **{rel: 1 for rel in rank_files(1, 4)}}
    signature = tmp_path / "node0" / "checkpoints" / "checkpoint-4" / "model_signature.json"
    assert json.loads(signature.read_text()) == {"w": [1]}
    assert latest_complete_checkpoint(str(tmp_path / "out")) == (4, uri)



def test_each_process_gets_its_local_folder_from_one_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model.train import local_dir

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("GROUP_RANK", "1")
    monkeypatch.setenv("ONEVISION_LOCAL_DIR", str(tmp_path / "node{GROUP_RANK}" / "rank{RANK}"))
    assert local_dir(None, "stage1") == tmp_path / "node1" / "rank3"
    assert local_dir(str(tmp_path / "w{RANK}"), "stage1") == tmp_path / "w3"  # --work-dir comes first
    monkeypatch.delenv("ONEVISION_LOCAL_DIR")
    made = local_dir(None, "stage1")  # one process, no setting: a fresh temporary folder, as before
    assert made.is_dir() and made.name.startswith("onevision-stage1-")
    made.rmdir()

"""Checkpoints of a training stage in S3, for processes that share no disk: every rank publishes the files
it wrote, rank 0 writes the manifest last (after every rank confirmed its upload), resume fetches only what
a process needs, the final merge works from the published prefix, rotation deletes complete ones only.

    publisher = CheckpointPublisher(out, model_signature(model))        # a Trainer callback, on every rank
    step, uri = latest_complete_checkpoint(out)                          # the newest one with every rank's files
    local = fetch_own_part(uri, work / "checkpoints" / f"checkpoint-{step}")   # collective: this folder's part
    local = fetch_checkpoint(uri, scratch)                               # one process: every rank's files
    state = merge_zero_checkpoint(local, model_signature(model))

Who owns a file: a name that carries a rank is that rank's (DeepSpeed's `*zero_pp_rank_<r>_*` model and
optimizer partitions, the Trainer's `rng_state_<r>.pth`); only rank r wrote it, on its own disk, so rank r
uploads it. Every other file (config, trainer_state.json, scheduler.pt, DeepSpeed's `latest`, ...) is
written by global rank 0 alone and uploaded by it. Owner-uploads (rather than one uploader per node) need no
knowledge of which ranks share a disk, spread the upload over every process, and each rank uploads a file
as soon as its own save returned it. The data-parallel rank in ZeRO's names is the global rank: this
trainer has no tensor or pipeline parallelism.

A published checkpoint's manifest (onevision.storage's format) lists every rank's files, each with the
rank that uploaded it, and `metadata.world_size`. It is *complete* when every rank in the world has each
kind of per-rank file (so a manifest that lacks one rank's files is never resumed from, nor kept over a
complete one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from onevision import storage

REQUIRED = ("trainer_state.json", "model_signature.json")  # what a resume reads besides DeepSpeed's files
_OWNED = (re.compile(r"zero_pp_rank_(\d+)_"), re.compile(r"^rng_state_(\d+)\.pth$"))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and what is wrong."""


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", "0"))


def _world() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _say(message: str) -> None:
    print(f"[checkpoints] rank {_rank()}: {message}", file=sys.stderr, flush=True)


# --- who owns what, and is it all there -------------------------------------------------------------

def owner(rel: str) -> int | None:
    """The rank whose file this is (it carries the rank in its name), or None: a file of rank 0's that
    every rank reads (shared)."""
    name = rel.rsplit("/", 1)[-1]
    for pattern in _OWNED:
        if match := pattern.search(name):
            return int(match.group(1))
    return None


def _kind(rel: str) -> str:
    """The file's name with its rank replaced by {r}: the same kind of file for every rank."""
    head, _, name = rel.rpartition("/")
    for pattern in _OWNED:
        if match := pattern.search(name):
            name = name[:match.start(1)] + "{r}" + name[match.end(1):]
            break
    return f"{head}/{name}" if head else name


def missing_parts(manifest: dict[str, Any]) -> list[str]:
    """What a checkpoint's manifest lacks to be resumed from or merged (empty when it is complete).

    Every rank of `metadata.world_size` must have every kind of per-rank file that any rank has (and its
    rng_state when there were several); a manifest without world_size (written before it was recorded)
    counts the ranks it names, which cannot be short of one unless only rank 0's files are there.
    """
    files = manifest.get("files", {})
    owned = {rel: r for rel in files if (r := owner(rel)) is not None}
    world = manifest.get("metadata", {}).get("world_size")
    problems = [name for name in REQUIRED if name not in files]
    if world is None:
        world = 1 + max(owned.values(), default=0)
        if world == 1 and "rng_state_0.pth" in files:  # several processes wrote it; only rank 0's part is here
            return [*problems, "every rank's files but rank 0's (the manifest names no world size)"]
    kinds = {_kind(rel) for rel in owned} | ({"rng_state_{r}.pth"} if world > 1 else set())
    present = {(_kind(rel), r) for rel, r in owned.items()}
    problems += [kind.replace("{r}", str(r)) for kind in sorted(kinds) for r in range(world) if (kind, r) not in present]
    problems += [f"{rel} (rank {r} of a world of {world})" for rel, r in sorted(owned.items()) if r >= world]
    return problems


def _step(prefix: str, uri: str) -> int | None:
    name = uri[len(prefix):].strip("/").split("/")[0]
    digits = name[len("checkpoint-"):]
    return int(digits) if name.startswith("checkpoint-") and digits.isdigit() else None


def _complete_steps(prefix: str) -> tuple[list[int], list[int]]:
    """(every checkpoint step with objects under `prefix`, the complete ones), both ascending. Complete:
    a manifest that misses no rank's part, and every file it names is there."""
    uris = storage.list_uris(prefix)
    listed = set(uris)
    steps = sorted({s for u in uris if (s := _step(prefix, u)) is not None})
    complete = []
    for step in steps:
        uri = storage.join(prefix, f"checkpoint-{step}")
        if storage.join(uri, storage.MANIFEST_NAME) not in listed:
            continue  # an upload cut before its manifest
        try:
            manifest = storage.read_manifest(uri)
            problems = missing_parts(manifest) + [rel for rel in manifest["files"] if storage.join(uri, rel) not in listed]
        except storage.StorageError as err:  # unreadable: as good as none (a crash here would stop training)
            problems = [f"a readable manifest ({err})"]
        if problems:
            if _rank() == 0:
                _say(f"checkpoint-{step} is incomplete, never resumed from: missing {problems[:4]}")
            continue
        complete.append(step)
    return steps, complete


def latest_complete_checkpoint(out: str) -> tuple[int, str] | None:
    """(step, uri) of the newest complete checkpoint under <out>/checkpoints (see _complete_steps)."""
    prefix = storage.join(out, "checkpoints")
    _, complete = _complete_steps(prefix)
    return (complete[-1], storage.join(prefix, f"checkpoint-{complete[-1]}")) if complete else None


# --- fetching ---------------------------------------------------------------------------------------

def _matches(path: Path, info: dict[str, Any]) -> bool:
    return path.is_file() and path.stat().st_size == info["size"] and storage.sha256_file(path) == info["sha256"]


def fetch_checkpoint(uri: str, local: Path, ranks: Iterable[int] | None = None) -> Path:
    """A local copy of the published checkpoint at `uri`: the shared files plus the per-rank files of
    `ranks` (None: every rank's, e.g. for the merge), each matching the manifest (size, sha256).

    A file already in `local` (a restarted container keeps its disk; rank 0 keeps its own partitions) is
    trusted only if it matches: a download cut by a kill leaves files missing or short. Others are
    fetched into a staging folder beside checkpoints/ (the Trainer's rotation lists that one) and moved
    into place verified, one by one; the staging folder is removed at the end. Not collective.
    """
    manifest = storage.read_manifest(uri)
    if problems := missing_parts(manifest):
        raise CheckpointError(f"{uri} is incomplete: missing {problems[:4]}")
    wanted = None if ranks is None else set(ranks)
    files = {rel: info for rel, info in manifest["files"].items()
             if wanted is None or owner(rel) is None or owner(rel) in wanted}
    staging = local.parent.parent / f".download-{local.name}"
    fetched = 0
    for rel, info in sorted(files.items()):
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{uri}: manifest names an unsafe path {rel!r}")
        if _matches(local / rel, info):
            continue
        part = storage.get_file(storage.join(uri, rel), staging / rel)
        if not _matches(part, info):
            raise storage.StorageError(f"{storage.join(uri, rel)}: size/sha256 differ from the manifest")
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, local / rel)
        fetched += 1
    shutil.rmtree(staging, ignore_errors=True)
    which = "every rank" if wanted is None else f"ranks {sorted(wanted)}"
    _say(f"{uri}: {len(files)} of {len(manifest['files'])} files for {which} ({fetched} fetched)")
    return local


def folder_peers(folder: Path) -> list[int]:
    """The ranks whose local folder is this very one (the processes of a node that share its disk, or
    just this rank): each rank drops a token file there and reads back whose tokens it sees. Collective.
    A token, not a host name or path: pods on one host mount their own emptyDir at the same path."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [_rank()]
    folder.mkdir(parents=True, exist_ok=True)
    nonce = [uuid.uuid4().hex if _rank() == 0 else None]
    torch.distributed.broadcast_object_list(nonce, src=0)
    mine = folder / f".peer-{nonce[0]}-{_rank()}"
    mine.touch()
    torch.distributed.barrier()
    peers = sorted(int(p.name.rsplit("-", 1)[1]) for p in folder.glob(f".peer-{nonce[0]}-*"))
    torch.distributed.barrier()
    mine.unlink()
    return peers


def fetch_own_part(uri: str, local: Path) -> Path:
    """Collective: every process gets what its resume reads (the shared files, its own partitions and RNG
    state) and no other rank's partitions. The lowest rank of each local folder fetches for the folder's
    ranks; the rest wait. A checkpoint of another world size is refused: ZeRO partitions do not re-split."""
    manifest = storage.read_manifest(uri)
    ranks = [r for rel in manifest["files"] if (r := owner(rel)) is not None]
    written_by = manifest["metadata"].get("world_size", 1 + max(ranks, default=0))
    if ranks and written_by != _world():
        raise CheckpointError(f"{uri} was written by {written_by} processes and this run has {_world()}: "
                              f"resume with {written_by} processes, or start from <out>/hf with a new --out")
    peers = folder_peers(local.parent)
    if _rank() == peers[0]:
        fetch_checkpoint(uri, local, ranks=peers)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return local


def merge_zero_checkpoint(checkpoint_dir: Path, signature: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO checkpoint (any stage, any world size) as one state dict,
    checked against the model's parameter names and shapes. Every rank's partitions must be in the folder
    (fetch_checkpoint(uri, folder) with ranks=None)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    wrong = [k for k, shape in signature.items() if k not in state or list(state[k].shape) != shape]
    if wrong:
        raise CheckpointError(f"merging {checkpoint_dir}: missing or misshapen {wrong[:5]}")
    return {k: v.contiguous() for k, v in state.items()}


# --- publishing -------------------------------------------------------------------------------------

class CheckpointPublisher(TrainerCallback):
    """After each Trainer save, on every rank: upload the files this rank owns, confirm to the others
    (all_gather of each rank's files, or its error), and on rank 0 write the manifest of all of them
    last, then drop published checkpoints older than the `keep` newest complete ones. A folder without
    rank 0 in it (another node's disk) is rotated here too: the Trainer rotates rank 0's only."""

    def __init__(self, out: str, signature: dict[str, list[int]], keep: int = 2):
        self.out, self.signature, self.keep = out, signature, keep
        self.peers: list[int] | None = None

    def on_save(self, args, state, control, **kwargs):
        rank, distributed = _rank(), torch.distributed.is_initialized()
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        target = storage.join(self.out, "checkpoints", local.name)
        if self.peers is None:
            self.peers = folder_peers(Path(args.output_dir))  # collective: on_save runs on every rank together
        report: dict[str, Any] = {"rank": rank, "files": {}, "error": None}
        try:
            if rank == 0:
                (local / "model_signature.json").write_text(json.dumps(self.signature))
            report["files"] = self._upload(local, target, rank)
        except Exception as err:  # reported to every rank below: nobody waits for a rank that failed
            report["error"] = f"{type(err).__name__}: {err}"
        reports = [None] * _world() if distributed else [report]
        if distributed:
            torch.distributed.all_gather_object(reports, report)
        failed = [f"rank {r['rank']}: {r['error']}" for r in reports if r["error"]]
        if failed:
            raise CheckpointError(f"{target} not published: {'; '.join(failed)}")
        files = {rel: info for r in reports for rel, info in r["files"].items()}
        metadata = {"step": state.global_step, "world_size": len(reports)}
        if problems := missing_parts({"files": files, "metadata": metadata}):
            raise CheckpointError(f"{target} not published: no rank uploaded {problems[:4]}")
        if rank == 0:
            storage.write_manifest(target, files, metadata)
            self._rotate()
        elif rank == self.peers[0] and 0 not in self.peers:
            self._rotate_local(Path(args.output_dir))

    @staticmethod
    def _upload(local: Path, target: str, rank: int) -> dict[str, dict[str, Any]]:
        """Upload this rank's files of `local` (see the module's docstring); {relative path: size, sha256, rank}."""
        # every rank drops the manifest first: an old one (a republished step) must not vouch for objects
        # being replaced; rank 0 writes the new one only after every rank's upload
        storage.delete(storage.join(target, storage.MANIFEST_NAME))
        files = {}
        for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != storage.MANIFEST_NAME):
            rel = path.relative_to(local).as_posix()
            if owner(rel) == rank or (owner(rel) is None and rank == 0):
                files[rel] = {"size": path.stat().st_size, "sha256": storage.sha256_file(path), "rank": rank}
                storage.put_file(path, storage.join(target, rel))
        return files

    def _rotate(self) -> None:
        prefix = storage.join(self.out, "checkpoints")
        steps, complete = _complete_steps(prefix)
        # keep the newest `keep` complete ones; a torn or incomplete one older than the newest complete one
        # is debris, and it must never count among the kept (it would push a complete checkpoint out)
        doomed = complete[: -self.keep] + [s for s in steps if s not in complete and complete and s < complete[-1]]
        for step in sorted(doomed):
            old = storage.join(prefix, f"checkpoint-{step}")
            storage.delete(storage.join(old, storage.MANIFEST_NAME))  # unpublish first, then remove
            for uri in storage.list_uris(old):
                storage.delete(uri)

    def _rotate_local(self, folder: Path) -> None:
        """Keep this disk's `keep` newest checkpoint folders, as the Trainer does on rank 0's."""
        local = sorted((int(p.name.split("-", 1)[1]), p) for p in folder.glob("checkpoint-*")
                       if p.name.split("-", 1)[1].isdigit())
        for _, path in local[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

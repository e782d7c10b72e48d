"""Checkpoints of a training stage in S3: published atomically (manifest last), found, fetched, rotated,
and merged into one state dict.

    publisher = CheckpointPublisher(out, model_signature(model), is_main=rank() == 0)   # a Trainer callback
    step, uri = latest_complete_checkpoint(out)            # the newest one with a manifest
    local = fetch_checkpoint(uri, work / "checkpoints" / f"checkpoint-{step}")
    state = merge_zero_checkpoint(local, model_signature(model))
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from onevision import storage


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and what is wrong."""


def latest_complete_checkpoint(out: str) -> tuple[int, str] | None:
    """(step, uri) of the newest checkpoint under <out>/checkpoints that has a manifest."""
    prefix = storage.join(out, "checkpoints")
    steps = set()
    for uri in storage.list_uris(prefix):
        if uri.endswith(storage.MANIFEST_NAME):
            name = uri[len(prefix):].strip("/").split("/")[0]
            if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
                steps.add(int(name[len("checkpoint-"):]))
    if not steps:
        return None
    step = max(steps)
    return step, storage.join(prefix, f"checkpoint-{step}")


def fetch_checkpoint(uri: str, local: Path) -> Path:
    """A local copy of the published checkpoint at `uri` that matches its manifest (sizes, sha256).

    A copy already in the work dir (a restarted container keeps it) is trusted only if it matches: a
    download cut by a kill leaves files missing, and resuming from it would fail or, worse, resume
    without the RNG or scheduler state. Otherwise it is fetched again, under a temporary name first.
    One process per node fetches (the work dir is the node's); the others wait at a barrier.
    """
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        files = storage.read_manifest(uri)["files"]
        if not (local.is_dir() and all(
                (local / rel).is_file() and (local / rel).stat().st_size == info["size"]
                and storage.sha256_file(local / rel) == info["sha256"] for rel, info in files.items())):
            partial = local.parent.parent / f".download-{local.name}"  # outside the Trainer's checkpoints/
            shutil.rmtree(partial, ignore_errors=True)
            storage.get_dir(uri, partial)
            shutil.rmtree(local, ignore_errors=True)
            local.parent.mkdir(parents=True, exist_ok=True)
            partial.rename(local)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return local


def merge_zero_checkpoint(checkpoint_dir: Path, signature: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO checkpoint (any stage, any world size) as one state dict,
    checked against the model's parameter names and shapes."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    wrong = [k for k, shape in signature.items() if k not in state or list(state[k].shape) != shape]
    if wrong:
        raise CheckpointError(f"merging {checkpoint_dir}: missing or misshapen {wrong[:5]}")
    return {k: v.contiguous() for k, v in state.items()}


class CheckpointPublisher(TrainerCallback):
    """After each Trainer save: stamp the model signature, publish the checkpoint (manifest last),
    and drop published checkpoints older than the previous one."""

    def __init__(self, out: str, signature: dict[str, list[int]], is_main: bool, keep: int = 2):
        self.out, self.signature, self.is_main, self.keep = out, signature, is_main, keep

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's ZeRO shard is on disk
        if self.is_main:
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (local / "model_signature.json").write_text(json.dumps(self.signature))
            storage.publish_dir(local, storage.join(self.out, "checkpoints", local.name),
                                metadata={"step": state.global_step})
            self._rotate()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _rotate(self) -> None:
        prefix = storage.join(self.out, "checkpoints")
        relative = [u[len(prefix):].strip("/") for u in storage.list_uris(prefix)]
        names = {r.split("/")[0] for r in relative}
        steps = sorted(int(n.split("-", 1)[1]) for n in names if n.startswith("checkpoint-") and n[11:].isdigit())
        complete = [s for s in steps if f"checkpoint-{s}/{storage.MANIFEST_NAME}" in relative]
        # keep the newest `keep` complete ones; a torn upload older than the newest complete one is debris,
        # and it must never count among the kept (it would push a complete checkpoint out)
        doomed = complete[: -self.keep] + [s for s in steps if s not in complete and complete and s < complete[-1]]
        for step in sorted(doomed):
            old = storage.join(prefix, f"checkpoint-{step}")
            storage.delete(storage.join(old, storage.MANIFEST_NAME))  # unpublish first, then remove
            for uri in storage.list_uris(old):
                storage.delete(uri)

"""The stage trainer as a pipeline step runs it: `python -m model.train` in a subprocess, on CPU.

Short stages of the tiny recipe on a small shapes world: trainable parts, the loss falling, ZeRO-3 on
two processes matching one process, SIGKILL + restart reproducing the uninterrupted run, and each
failure mode's message and exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from components.curate.core import curate_stage
from onevision import storage
from onevision.recipe import STAGE_NAMES as STAGES
from onevision.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def small_recipe(tmp: Path, zero: int = 2, steps: int = 6, save_every: int = 3, per_device: int = 4,
                 global_batch: int = 8, lr: float | None = None) -> Path:
    """tiny.yaml with short stages and a 64-per-kind world."""
    base = load_recipe(ROOT / "recipes/tiny.yaml")
    stages = {}
    for name, spec in base.stages.enabled():
        data = [{"dataset_uri": f"{d.dataset_uri}?n=64", "sampling_strategy": d.sampling_strategy} for d in spec.data]
        stages[name] = {"max_steps": steps, "per_device_batch_size": per_device,
                        "global_batch_size": global_batch, "data": data, **({"lr": lr} if lr else {})}
    doc = {"extends": str(ROOT / "recipes/tiny.yaml"), "name": "tiny-test",
           "training": {"zero_stage": zero, "save_every_steps": save_every}, "stages": stages}
    path = tmp / f"recipe-z{zero}-s{steps}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("curated")
    recipe = load_recipe(small_recipe(tmp))
    return {name: Path(tmp / name) for name in STAGES
            if curate_stage(recipe, name, str(tmp / name), work_dir=str(tmp / "work"))["totals"]["kept"]}


def train(recipe: Path, stage: str, data: Path, out: Path, *extra: str, procs: int = 1,
          env: dict[str, str] | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "model.train"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "model.train"]
    cmd += ["--recipe", str(recipe), "--stage", stage, "--data", str(data), "--out", str(out),
            "--work-dir", str(out) + "-work", "--summary", str(out) + "-summary.json", "--holdout", "16", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900)
    summary = Path(str(out) + "-summary.json")
    return done, json.loads(summary.read_text()) if done.returncode == 0 and summary.exists() else None


def weights(out: Path) -> dict[str, torch.Tensor]:
    from model.builder import load_pretrained

    return load_pretrained(str(out / "hf"))[0].state_dict()


def test_stage1_trains_only_the_projector_and_loss_falls(tmp_path: Path, curated) -> None:
    recipe = small_recipe(tmp_path)
    done, summary = train(recipe, "stage1", curated["stage1"], tmp_path / "s1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert summary["trainable"]["vision_tower"] == 0 and summary["trainable"]["language_model"] == 0
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    # the same tiny model, untrained, built from the recipe (seeded): only the projector moved
    from model.builder import build_tiny

    start, _ = build_tiny(load_recipe(recipe))
    before, after = start.state_dict(), weights(tmp_path / "s1")
    for name, value in after.items():
        moved = not torch.equal(before[name], value)
        assert moved == ("multi_modal_projector" in name or "image_newline" in name), name
    assert storage.read_manifest(str(tmp_path / "s1" / "hf"))["metadata"]["steps"] == 6


def test_zero0_is_plain_ddp_on_two_processes_with_parameters_that_get_no_gradient(tmp_path: Path, curated) -> None:
    # ZeRO 0 trains under DDP. SigLIP's post_layernorm never gets a gradient (the features are a hidden
    # state before it), and a text-only micro-batch leaves the whole vision side without one: DDP must be
    # told, or it refuses the second step.
    recipe = small_recipe(tmp_path, zero=0, steps=3, save_every=3, per_device=2, global_batch=4)
    done, summary = train(recipe, "stage2_ov", curated["stage2_ov"], tmp_path / "z0", procs=2)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert len(summary["losses"]) == 3
    from model.builder import build_tiny

    before, after = build_tiny(load_recipe(recipe))[0].state_dict(), weights(tmp_path / "z0")
    unused = [k for k in after if "post_layernorm" in k]
    assert unused and all(torch.equal(before[k], after[k]) for k in unused)
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("model.vision_tower.encoder"))


@pytest.mark.parametrize("stage,init", [("stage1_5", "stage1"), ("stage2_ov", "stage1")])
def test_full_model_stages_train_everything(tmp_path: Path, curated, stage: str, init: str) -> None:
    recipe = small_recipe(tmp_path, steps=4, save_every=4)
    done, _ = train(recipe, init, curated[init], tmp_path / init)
    assert done.returncode == 0, done.stderr[-3000:]
    done, summary = train(recipe, stage, curated[stage], tmp_path / stage, "--init", str(tmp_path / init / "hf"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(summary["trainable"][part] > 0 for part in ("vision_tower", "projector", "language_model"))
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    before, after = weights(tmp_path / init), weights(tmp_path / stage)
    for prefix in ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix


def test_zero3_two_processes_match_one(tmp_path: Path, curated) -> None:
    recipe = small_recipe(tmp_path, zero=3, steps=4, save_every=4, per_device=4, global_batch=8)
    one, s_one = train(recipe, "stage1", curated["stage1"], tmp_path / "one")
    two, s_two = train(recipe, "stage1", curated["stage1"], tmp_path / "two", procs=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert len(s_one["losses"]) == len(s_two["losses"]) == 4
    assert s_one["losses"] == pytest.approx(s_two["losses"], rel=1e-4)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_sigkill_then_restart_reproduces_the_uninterrupted_run(tmp_path: Path, curated) -> None:
    recipe = small_recipe(tmp_path, steps=24, save_every=4)
    done, reference = train(recipe, "stage1", curated["stage1"], tmp_path / "ref")
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    proc = train(recipe, "stage1", curated["stage1"], out, wait=False)
    marker = out / "checkpoints" / "checkpoint-8" / storage.MANIFEST_NAME
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run was killed mid-stage"
    assert not (out / "hf").exists()

    done, resumed = train(recipe, "stage1", curated["stage1"], out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    assert resumed["eval_loss_before"] == reference["eval_loss_before"]
    assert resumed["losses"] == pytest.approx(reference["losses"], rel=1e-6)
    w_ref, w_res = weights(tmp_path / "ref"), weights(out)
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)


def test_failures_give_clear_messages(tmp_path: Path, curated) -> None:
    recipe = small_recipe(tmp_path)
    empty = tmp_path / "empty"
    from model.shard_writer import write_shards

    write_shards([], empty)
    storage.publish_dir(empty, str(tmp_path / "empty-pub"))
    done, _ = train(recipe, "stage1", tmp_path / "empty-pub", tmp_path / "e")
    assert done.returncode == 3 and "no samples" in done.stderr

    nan_recipe = small_recipe(tmp_path, lr=1e30, steps=4)
    done, _ = train(nan_recipe, "stage1", curated["stage1"], tmp_path / "nan2")
    assert done.returncode == 3 and "at step" in done.stderr and ("nan" in done.stderr or "inf" in done.stderr)

    # a checkpoint from a model of another shape under the same --out
    done, _ = train(recipe, "stage1", curated["stage1"], tmp_path / "shape")
    assert done.returncode == 0
    ckpt = tmp_path / "shape" / "checkpoints" / "checkpoint-6"
    signature = json.loads((ckpt / "model_signature.json").read_text())
    signature["lm_head.weight"] = [1, 1]
    (ckpt / "model_signature.json").write_text(json.dumps(signature))
    storage.publish_dir(ckpt, str(ckpt))
    (tmp_path / "shape-work").rename(tmp_path / "shape-work-old")
    import shutil

    shutil.rmtree(tmp_path / "shape" / "hf")  # as if the stage had been killed before its end
    done, _ = train(recipe, "stage1", curated["stage1"], tmp_path / "shape")
    assert done.returncode == 3 and "another shape" in done.stderr


def test_out_of_disk_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from model.builder import build_tiny
    from model.train import TrainingError, check_disk

    model, _ = build_tiny(load_recipe(ROOT / "recipes/tiny.yaml"))
    check_disk(tmp_path, model)  # plenty here
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(TrainingError, match="not enough disk"):
        check_disk(tmp_path, model)


def test_a_finished_stage_is_not_trained_again(tmp_path: Path, curated) -> None:
    recipe = small_recipe(tmp_path, steps=3, save_every=3)
    done, first = train(recipe, "stage1", curated["stage1"], tmp_path / "s")
    assert done.returncode == 0, done.stderr[-3000:]
    mtime = (tmp_path / "s" / "hf" / "model.safetensors").stat().st_mtime
    done, again = train(recipe, "stage1", curated["stage1"], tmp_path / "s")
    assert done.returncode == 0 and "already complete" in done.stdout
    assert again["eval_loss_after"] == first["eval_loss_after"]
    assert (tmp_path / "s" / "hf" / "model.safetensors").stat().st_mtime == mtime

"""Train one LLaVA-OneVision stage: transformers Trainer + DeepSpeed ZeRO, resumable, tracked.

    torchrun --nproc_per_node 2 -m model.train --recipe recipes/tiny.yaml --stage stage1 \\
        --data s3://onevision/runs/r1/curate/stage1 --out s3://onevision/runs/r1/stage1
    python -m model.train --recipe recipes/tiny.yaml --stage stage1_5 --init s3://.../stage1/hf --data ... --out ...

On GPUs this is NCCL + bf16; on a CPU, gloo + fp32 (DS_ACCELERATOR=cpu). One process needs no launcher.

What the stage does, in order:
1. builds the model (from `--init`, the previous stage's HF folder, or from the recipe for Stage-1) and
   applies the stage's AnyRes settings, trainable parts and learning rates (vision tower apart);
2. resumes by itself from the newest *complete* checkpoint under `<out>/checkpoints/` (a retried pod
   continues where the killed one stopped: same data order, same losses);
3. trains with the recipe's global batch at any world size (gradient accumulation), cosine schedule with
   warmup, ZeRO-2/3, checkpoints every `save_every_steps`, published atomically (manifest last);
4. measures the held-out loss before and after, merges the final ZeRO checkpoint into one HF folder
   (`<out>/hf`, model + processor, fp32 master weights) and publishes it. Optimizer state stays behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import metrics
from model.batching import (Collator, ModalityLengthGroupedSampler, PackedCollator, ShardWindowSampler,
                            use_varlen_sdpa)
from model.builder import build_model_and_processor, configure_stage
from model.checkpoints import (CheckpointError, CheckpointPublisher, fetch_checkpoint, fetch_own_part,
                               latest_complete_checkpoint, merge_zero_checkpoint)
from model.processing import SampleProcessor
from model.rank_sampler import RankShardSampler
from model.shards import ShardDataset, open_shards
from onevision import storage, tracking
from onevision.recipe import STAGE_NAMES, Recipe, StageSpec, load_recipe, numel, part_of
from onevision.cli_exit import run_command

EXIT_USAGE, EXIT_FAILED = 2, 3


class TrainingError(RuntimeError):
    """A stage cannot start or continue; the message says why and what to do."""


class TrainingComplete(Exception):
    """Raised by the trainer before a step past the stage's last: the resumed checkpoint was the final one."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def log(message: str) -> None:
    if rank() == 0:
        print(f"[train] {message}", flush=True)


# --- model parts ------------------------------------------------------------------------------------

def apply_trainable_parts(model: torch.nn.Module, stage: StageSpec) -> dict[str, int]:
    """Freeze everything outside the stage's trainable parts; returns trainable parameter counts."""
    counts = {"vision_tower": 0, "projector": 0, "language_model": 0}
    for name, param in model.named_parameters():
        param.requires_grad = part_of(name) in stage.trainable
        if param.requires_grad:
            counts[part_of(name)] += numel(param)
    return counts


def model_signature(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(getattr(p, "ds_shape", None) or p.shape) for name, p in model.named_parameters()}


# --- data -------------------------------------------------------------------------------------------

def build_datasets(recipe: Recipe, stage: StageSpec, stage_name: str, processor: Any, data_uri: str,
                   cache_dir: Path, holdout: int) -> tuple[Any, Any]:
    template = "plain" if stage_name == "stage1" else "qwen_1_5"
    sp = SampleProcessor(processor, template, stage.model_max_length, video_frames=stage.video_frames,
                         square=stage.image_aspect_ratio == "square")
    if recipe.training.shard_cache_gb and storage.is_s3(data_uri):  # read in place, a window of shards at a time
        dataset = ShardDataset.streaming(data_uri, cache_dir / "stream", int(recipe.training.shard_cache_gb * 2**30), sp)
    else:
        dataset = ShardDataset(open_shards(data_uri, cache_dir), sp)
    if len(dataset) == 0:
        raise TrainingError(f"{stage_name}: the dataset at {data_uri} has no samples")
    train, held = split_holdout(len(dataset), holdout, recipe.training.seed,
                                dataset.shard_of() if dataset.cache is not None else None)
    return torch.utils.data.Subset(dataset, train), torch.utils.data.Subset(dataset, held.tolist()) if len(held) else None


def split_holdout(n: int, holdout: int, seed: int, shard_of: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), both sorted int64 arrays: at most n // 10 held out.

    The held-out slice is a fixed, seeded choice, so that before/after losses compare like with like; given
    `shard_of` (a streamed stage) it is drawn from the 10 x holdout samples of the last shards, so that
    measuring it fetches a few shards, not all. Arrays, not lists of Python ints: a 3M-sample stage's
    indices are 24 MB, not ~110 MB of objects whose refcounts every forked DataLoader worker copies."""
    holdout = min(holdout, n // 10)
    candidates = np.arange(n)
    if shard_of is not None:
        candidates = np.sort(np.argsort(-shard_of, kind="stable")[:10 * holdout])
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed)).numpy()
    held = np.sort(candidates[order[:holdout]])
    return np.setdiff1d(np.arange(n), held, assume_unique=True), held


def heldout_loss(model: torch.nn.Module, eval_set: Any, collate: Any, batch_size: int) -> float:
    """Token-weighted mean loss over the held-out samples (ZeRO-3 weights gathered for the pass)."""
    import contextlib

    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    was_training, total, tokens = model.training, 0.0, 0
    model.eval()
    device = next(iter(params)).device
    with gather, torch.no_grad():
        for start in range(0, len(eval_set), batch_size):
            batch = collate([eval_set[i] for i in range(start, min(start + batch_size, len(eval_set)))])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch, use_cache=False).loss) * n
            tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


# --- trainer ----------------------------------------------------------------------------------------

def deepspeed_config(recipe: Recipe, on_gpu: bool) -> dict[str, Any] | None:
    """ZeRO per the recipe; bf16 only on GPUs. No optimizer block: the Trainer's torch AdamW is used
    (DeepSpeed's FusedAdam would JIT-compile for a minute on a CPU)."""
    if recipe.training.zero_stage == 0:
        return None
    config: dict[str, Any] = {
        "zero_optimization": {"stage": recipe.training.zero_stage, "overlap_comm": on_gpu,
                              "contiguous_gradients": True},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": on_gpu and recipe.training.precision == "bf16"},
        "fp16": {"enabled": on_gpu and recipe.training.precision == "fp16"},
    }
    if recipe.training.zero_stage == 3:
        config["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False)
    return config


def make_args(recipe: Recipe, stage: StageSpec, stage_name: str, work: Path) -> Any:
    """TrainingArguments; created before the model so that ZeRO-3 builds it partitioned (zero.Init)."""
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    per_device = stage.per_device_batch_size
    accumulation, remainder = divmod(stage.global_batch_size, per_device * world_size())
    if remainder or accumulation == 0:
        raise TrainingError(f"{stage_name}: global_batch_size {stage.global_batch_size} is not a multiple of "
                            f"per_device_batch_size {per_device} x world size {world_size()}")
    return TrainingArguments(
        output_dir=str(work / "checkpoints"), per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device, gradient_accumulation_steps=accumulation,
        learning_rate=stage.lr, weight_decay=stage.weight_decay, lr_scheduler_type=stage.lr_scheduler,
        warmup_steps=stage.warmup_ratio,  # a float < 1 is a ratio of the total steps
        num_train_epochs=stage.epochs, max_steps=stage.max_steps or -1,
        max_grad_norm=1.0, bf16=on_gpu and recipe.training.precision == "bf16",
        gradient_checkpointing=recipe.training.gradient_checkpointing,
        save_strategy="steps", save_steps=recipe.training.save_every_steps, save_total_limit=2,
        logging_steps=1, report_to=[], seed=recipe.training.seed, data_seed=recipe.training.seed,
        remove_unused_columns=False, dataloader_num_workers=int(os.environ.get("ONEVISION_DATA_WORKERS", "0")),
        deepspeed=deepspeed_config(recipe, on_gpu), use_cpu=not on_gpu,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, eval_strategy="no",
        save_only_model=False, ddp_backend=None if on_gpu else "gloo",
        # ZeRO 0 trains under DDP, which refuses a step where a parameter got no gradient. Some always
        # get none (SigLIP's post_layernorm: the features are a hidden state taken before it), and a
        # micro-batch of text alone leaves the vision tower and projector without one.
        ddp_find_unused_parameters=recipe.training.zero_stage == 0,
    )


def make_trainer(recipe: Recipe, stage: StageSpec, stage_name: str, args: Any, model: Any, processor: Any,
                 train_set: Any, eval_set: Any, callbacks: list[Any], on_batch: Any = None) -> Any:
    from transformers import PrinterCallback, Trainer, TrainerCallback

    class StopAtTheEnd(TrainerCallback):
        """transformers resumed from the checkpoint of the final step trains one step more (its loop tests
        max_steps after a step, not before): a stage killed between that checkpoint and its HF publish
        would step past its schedule. Stop before such a step, with the checkpoint's state loaded."""

        def on_step_begin(self, args, state, control, **kwargs):
            if 0 < state.max_steps <= state.global_step:
                raise TrainingComplete(f"step {state.global_step} of {state.max_steps}")

    square = stage.image_aspect_ratio == "square"
    vision_lr = stage.vision_tower_lr or stage.lr
    global_batch = stage.global_batch_size

    class StageTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            base = self.train_dataset.dataset
            lengths, visual = base.lengths()  # (N,) arrays over the whole stage
            keep = np.asarray(self.train_dataset.indices, dtype=np.int64)  # less the held-out samples
            # batches of one *global* batch: the same samples meet in a step at any world size
            if base.cache is not None:  # streamed: a window of shards at a time (the cache holds a window)
                shard_of = base.shard_of()
                kept = (lengths[keep], visual[keep], shard_of[keep])
                if self.args.world_size > 1:  # each rank reads only the shards it owns this epoch
                    try:
                        return RankShardSampler(*kept, global_batch=global_batch, ranks=self.args.world_size,
                                                micro_batch=self.args.per_device_train_batch_size,
                                                window_shards=recipe.training.shard_window, seed=recipe.training.seed)
                    except ValueError as err:
                        print(f"[shards] {err}: every rank reads every shard", flush=True)
                return ShardWindowSampler(*kept, batch_size=global_batch, window_shards=recipe.training.shard_window,
                                          seed=recipe.training.seed)
            return ModalityLengthGroupedSampler(lengths[keep], visual[keep], batch_size=global_batch,
                                                seed=recipe.training.seed)

        def create_optimizer(self, model=None):
            opt_model = self.model if model is None else model
            if self.optimizer is None:
                groups: dict[str, list[torch.nn.Parameter]] = {"vision_tower": [], "rest": []}
                for name, param in opt_model.named_parameters():
                    if param.requires_grad:
                        groups["vision_tower" if part_of(name) == "vision_tower" else "rest"].append(param)
                param_groups = [{"params": groups["rest"], "lr": stage.lr, "weight_decay": stage.weight_decay,
                                 "name": "rest"}]
                if groups["vision_tower"]:
                    param_groups.append({"params": groups["vision_tower"], "lr": vision_lr,
                                         "weight_decay": stage.weight_decay, "name": "vision_tower"})
                # fused: one kernel per step on CPU and GPU alike (what the Trainer default, adamw_torch_fused, uses)
                self.optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8, fused=True)
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if on_batch is not None and model.training:
                on_batch(inputs)
            loss_and_outputs = super().compute_loss(model, {**inputs, "use_cache": False}, return_outputs,
                                                    num_items_in_batch)
            loss = loss_and_outputs[0] if return_outputs else loss_and_outputs
            if model.training and not torch.isfinite(loss.detach()).all():
                raise TrainingError(f"{stage_name}: loss is {loss.item()} at step {self.state.global_step + 1}; "
                                    "stopping (lower the learning rate or check the data)")
            return loss_and_outputs

        def _track_num_input_tokens(self, inputs):
            # A padding-free row has no attention_mask and no padding: every token counts. (Without a
            # processing_class the stock "non_padding" count falls back to numel() too, warning every batch.)
            if not packing or "attention_mask" in inputs or self.args.include_num_input_tokens_seen == "no":
                return super()._track_num_input_tokens(inputs)
            tokens = torch.as_tensor(inputs["input_ids"].numel(), device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    packing = recipe.training.packing
    if packing:  # one padding-free row per micro-batch, attention per sample (flash varlen, or sdpa per sample)
        attention = getattr(getattr(model.config, "text_config", model.config), "_attn_implementation", None)
        varlen = use_varlen_sdpa(model) or str(attention or "").startswith("flash")
        collator: Any = PackedCollator(square=square, flash_kwargs=varlen)
    else:
        collator = Collator(processor.tokenizer.pad_token_id, square=square)
    trainer = StageTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                           data_collator=collator, callbacks=[*callbacks, StopAtTheEnd()])
    # with disable_tqdm the Trainer prints every step's log dict (strings); the tracker prints one
    # `[progress]` line per step instead, and MLflow has the numbers
    trainer.remove_callback(PrinterCallback)
    return trainer


# --- checkpoints (model/checkpoints.py) ----------------------------------------------------------

def check_disk(path: Path, model: torch.nn.Module) -> None:
    """Weights + grads + two Adam moments in fp32, twice over (save_total_limit=2), plus headroom."""
    need = sum(numel(p) for p in model.parameters()) * 4 * 4 * 2 * 1.2
    free = shutil.disk_usage(path).free
    if free < need:
        raise TrainingError(f"not enough disk for checkpoints at {path}: need ~{need / 1e9:.2f} GB, "
                            f"{free / 1e9:.2f} GB free (set --work-dir to a larger volume)")


def local_dir(work_dir: str | None, stage_name: str) -> Path:
    """This process's local scratch (shards, checkpoints before publishing): --work-dir, else
    $ONEVISION_LOCAL_DIR, else a new temporary folder. {RANK}, {LOCAL_RANK} and {GROUP_RANK} (the node's
    rank) are filled from torchrun's environment, so one setting gives each process or node its own
    folder: e.g. ONEVISION_LOCAL_DIR=/scratch on a TrainJob (a per-node emptyDir), /tmp/x/node{RANK} to
    play a node per process on one machine. Nothing is shared through it: S3 is the only shared store."""
    setting = work_dir or os.environ.get("ONEVISION_LOCAL_DIR")
    if not setting:
        return Path(tempfile.mkdtemp(prefix=f"onevision-{stage_name}-"))
    for key in ("RANK", "LOCAL_RANK", "GROUP_RANK"):
        setting = setting.replace(f"{{{key}}}", os.environ.get(key, "0"))
    return Path(setting)


# --- the stage --------------------------------------------------------------------------------------

def train_stage(recipe: Recipe, stage_name: str, data_uri: str, out: str, init: str | None = None,
                work_dir: str | None = None, holdout: int = 64, mlflow_parent: str | None = None) -> dict[str, Any]:
    """Run (or resume) one stage; returns its summary (losses, checkpoint URIs)."""
    stage = getattr(recipe.stages, stage_name, None)
    if stage is None:
        raise TrainingError(f"the recipe has no stage {stage_name!r}; it has {[n for n, _ in recipe.stages.enabled()]}")
    try:  # a retried step whose stage already finished: nothing to do
        done = storage.read_manifest(storage.join(out, "hf"))["metadata"]
        log(f"{stage_name}: already complete at {storage.join(out, 'hf')}")
        return {**done, "hf_uri": storage.join(out, "hf"), "losses": []}
    except storage.ManifestMissingError:
        pass
    if rank() == 0 and os.environ.get("MLFLOW_TRACKING_URI"):
        tracking.check_server()  # before any work: a down server fails the step in seconds, not minutes
    work = local_dir(work_dir, stage_name)
    work.mkdir(parents=True, exist_ok=True)
    # A random tiny model is built whole before the DeepSpeed config exists, so its seeded weights are
    # the same at any world size; real models load under the config, i.e. partitioned by zero.Init.
    materialise_first = init is None and recipe.model.init_from is None and recipe.model.vision_tower == "tiny"
    if materialise_first:
        model, processor = build_model_and_processor(recipe)
    args = make_args(recipe, stage, stage_name, work)
    if args.deepspeed:  # zero.Init partitions over DeepSpeed's world: initialise it before loading
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if not materialise_first:
        model, processor = build_model_and_processor(recipe, init_from=init)
    configure_stage(model, processor, stage, recipe.model.image_size)
    model.config.use_cache = False
    trainable = apply_trainable_parts(model, stage)
    log(f"{stage_name}: trainable {trainable} of {sum(numel(p) for p in model.parameters())} parameters")
    check_disk(work, model)
    train_set, eval_set = build_datasets(recipe, stage, stage_name, processor, data_uri, work / "data", holdout)

    args.device  # sets up torch.distributed on every path (DDP too): the checkpoint fetch below is collective
    resume = latest_complete_checkpoint(out)  # every rank reads the same manifests: the same answer
    resume_dir = None
    if resume:
        step, uri = resume
        # the shared files and this rank's own partitions, from S3 (the nodes share no disk)
        resume_dir = fetch_own_part(uri, work / "checkpoints" / f"checkpoint-{step}")
        signature = json.loads((resume_dir / "model_signature.json").read_text())
        if signature != model_signature(model):
            diff = [k for k in signature if signature[k] != model_signature(model).get(k)][:3]
            raise TrainingError(f"checkpoint {uri} was written by a model of another shape ({diff}...); "
                                f"use a new --out or the matching recipe")
        log(f"{stage_name}: resuming from {uri} (step {step})")

    tracker = metrics.StageTracker(recipe, stage_name, stage, model, out, mlflow_parent, rank() == 0, data_uri)
    publisher = CheckpointPublisher(out, model_signature(model))  # every rank uploads its own files
    trainer = make_trainer(recipe, stage, stage_name, args, model, processor, train_set, eval_set,
                           [tracker.callback(), publisher], on_batch=tracker.count_batch)

    def measure() -> float | None:
        if eval_set is None:
            return None
        return heldout_loss(model, eval_set, trainer.data_collator, stage.per_device_batch_size * 4)

    before_uri = storage.join(out, "heldout_before.json")  # survives a restart: the loss before *this stage*
    if storage.exists(before_uri):
        before = json.loads(storage.read_bytes(before_uri))["loss"]
    else:
        before = measure()
        if rank() == 0:
            storage.write_bytes(before_uri, json.dumps({"loss": before}).encode())
    try:
        trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    except TrainingComplete as done:
        log(f"{stage_name}: {resume_dir.name} is the last step's ({done}); nothing left to train")
    except OSError as err:
        if err.errno == 28:  # ENOSPC
            raise TrainingError(f"{stage_name}: out of disk while writing to {work}: {err}") from None
        raise
    after = measure()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # all steps, resumed or not
    summary = {"stage": stage_name, "steps": trainer.state.global_step,
               "train_loss": sum(losses) / len(losses) if losses else None,
               "eval_loss_before": before, "eval_loss_after": after, "trainable": trainable, "losses": losses}
    if rank() == 0:
        hf_dir = work / "hf"
        # the Trainer saved and published a checkpoint at the last step; with ZeRO its fp32 master weights
        # are merged from every rank's partitions, fetched from the published prefix (rank 0's own files,
        # verified, are not fetched again)
        state = None
        if trainer.is_deepspeed_enabled:
            name = f"checkpoint-{trainer.state.global_step}"
            final = fetch_checkpoint(storage.join(out, "checkpoints", name), work / "checkpoints" / name)
            state = merge_zero_checkpoint(final, model_signature(model))
        model.save_pretrained(hf_dir, state_dict=state)
        processor.save_pretrained(hf_dir)
        storage.publish_dir(hf_dir, storage.join(out, "hf"), metadata={k: v for k, v in summary.items() if k != "losses"})
        summary["hf_uri"] = storage.join(out, "hf")
        tracker.finish(summary)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def single_process_env() -> None:
    """Without a launcher, be a world of one on loopback (DeepSpeed always initialises torch.distributed)."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def add_stage_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of one stage's training. The train step's CLI (`python -m components.train.core`) takes
    these same flags, plus its own --run-id, and hands them on to this module."""
    parser.add_argument("--recipe", required=True, help="recipe YAML: local path or s3://")
    parser.add_argument("--stage", required=True, choices=STAGE_NAMES)
    parser.add_argument("--data", required=True, help="the stage's curated shards: local dir or s3:// prefix")
    parser.add_argument("--out", required=True, help="stage output: checkpoints/ and hf/ go below it")
    parser.add_argument("--init", default=None, help="HF folder to start from (the previous stage's <out>/hf)")
    parser.add_argument("--work-dir", default=None, help="local scratch for shards and checkpoints "
                        "(default: $ONEVISION_LOCAL_DIR, else a temporary folder; {RANK} is filled in)")
    parser.add_argument("--holdout", type=int, default=64, help="held-out samples for before/after loss")
    parser.add_argument("--mlflow-parent", default=os.environ.get("ONEVISION_MLFLOW_PARENT_RUN"),
                        help="parent MLflow run id (the pipeline run); tracking is off without MLFLOW_TRACKING_URI")
    parser.add_argument("--summary", default=None, help="write the stage summary JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = add_stage_arguments(argparse.ArgumentParser(prog="python -m model.train",
                                                         description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    single_process_env()
    try:
        summary = train_stage(load_recipe(args.recipe), args.stage, args.data, args.out, args.init,
                              args.work_dir, args.holdout, args.mlflow_parent)
    except (TrainingError, CheckpointError, storage.StorageError, tracking.TrackingError, FileNotFoundError) as err:
        print(f"[train] FAILED: {err}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    if args.summary and rank() == 0:
        Path(args.summary).write_text(json.dumps(summary, indent=1, default=str))
    log(f"done: {json.dumps({k: v for k, v in summary.items() if k != 'losses'}, default=str)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("train", main))

"""What a training stage reports and publishes while it runs (Trainer callbacks).

    tracker = StageTracker(recipe, "stage1", stage, model, out="s3://.../stage1", parent_run=None, is_main=True)
    trainer = Trainer(..., callbacks=[tracker.callback(), ...])

StageTracker: an MLflow run per stage (nested under the pipeline's run when a parent is given; the same
run again after a resume), with the stage's resolved hyper-parameters, and per step: loss, learning
rate of each parameter group, grad norm, samples/s, tokens/s, estimated MFU and peak memory.

MFU = model FLOPs per second / device peak. Model FLOPs per step, per component c (vision tower,
projector, LLM) with N_c parameters over T_c tokens: 2 N_c T_c forward, + 2 N_c T_c if a gradient flows
back through c (it or something before it trains), + 2 N_c T_c if c itself trains. Attention's
T^2 term and activation recomputation are left out (the usual MFU convention, PaLM appendix B).
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any

import torch
from transformers import TrainerCallback

from onevision import storage, tracking
from onevision.recipe import Recipe, StageSpec

GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
ORDER = ("vision_tower", "projector", "language_model")


def unknown_peak_reason() -> str | None:
    """Why no MFU can be given on this device (a GPU missing from GPU_PEAK_BF16, no override), else None."""
    if device_peak_flops() is not None:
        return None
    return (f"no dense bf16 peak known for {torch.cuda.get_device_name()!r} (model.metrics.GPU_PEAK_BF16 has {sorted(GPU_PEAK_BF16)}): "
            "MFU not computed; set ONEVISION_PEAK_FLOPS to the device's dense bf16 FLOP/s to get it")


def device_peak_flops() -> float | None:
    """Dense peak of one device: ONEVISION_PEAK_FLOPS, a GPU table (bf16), or cores x GHz x 32 (fp32 FMA).
    None for a GPU the table does not know: another device's peak would give a wrong MFU silently."""
    if override := os.environ.get("ONEVISION_PEAK_FLOPS"):
        return float(override)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)
    mhz = 2500.0
    try:
        mhz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        pass
    return torch.get_num_threads() * mhz * 1e6 * 32


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def flops_per_token_factor(trainable: set[str]) -> dict[str, int]:
    """Multiplier of N_c * T_c per component: 2 (forward) + 2 (grad flows through) + 2 (trains)."""
    factors, upstream = {}, False
    for part in ORDER:
        upstream = upstream or part in trainable
        factors[part] = 2 + (2 if upstream else 0) + (2 if part in trainable else 0)
    return factors


class StageTracker:
    def __init__(self, recipe: Recipe, stage_name: str, stage: StageSpec, model: torch.nn.Module, out: str,
                 parent_run: str | None, is_main: bool, data_uri: str | None = None):
        from model.train import numel, part_of

        self.recipe, self.stage_name, self.stage, self.out = recipe, stage_name, stage, out
        self.enabled = is_main and bool(os.environ.get("MLFLOW_TRACKING_URI"))
        self.parent_run, self.data_uri = parent_run, data_uri
        self.params = {part: 0 for part in ORDER}
        for name, param in model.named_parameters():
            self.params[part_of(name)] += numel(param)
        self.factors = flops_per_token_factor(set(stage.trainable))
        self.tokens_per_tile = recipe.model.tokens_per_tile
        peak = device_peak_flops()
        self.peak = peak * int(os.environ.get("WORLD_SIZE", "1")) if peak else None
        if self.peak is None and is_main:
            print(f"[metrics] {unknown_peak_reason()}", flush=True)
        self.vision_tokens = 0  # since the last log, counted by count_batch
        self.text_tokens = 0
        self.step_started = time.perf_counter()
        self.run_id: str | None = None

    # called by the trainer for every micro-batch
    def count_batch(self, inputs: dict[str, Any]) -> None:
        tiles = inputs["pixel_values"].shape[0] if "pixel_values" in inputs else 0
        if "pixel_values_videos" in inputs:
            tiles += inputs["pixel_values_videos"].shape[0] * inputs["pixel_values_videos"].shape[1]
        self.vision_tokens += tiles * self.tokens_per_tile
        mask = inputs.get("attention_mask")
        self.text_tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())

    def step_flops(self, vision_tokens: int, text_tokens: int) -> float:
        return (self.factors["vision_tower"] * self.params["vision_tower"] * vision_tokens
                + self.factors["projector"] * self.params["projector"] * vision_tokens
                + self.factors["language_model"] * self.params["language_model"] * text_tokens)

    def _start_run(self) -> None:
        import mlflow

        marker = storage.join(self.out, "mlflow_run.json")
        if storage.exists(marker):  # a resumed stage continues its run
            self.run_id = json.loads(storage.read_bytes(marker))["run_id"]
            mlflow.start_run(run_id=self.run_id)
            return
        if self.parent_run:
            parent = mlflow.MlflowClient().get_run(self.parent_run)
            tags = {k: v for k, v in parent.data.tags.items() if k.startswith("onevision.") and k != tracking.TAG_STEP}
            run = mlflow.start_run(run_name=self.stage_name, experiment_id=parent.info.experiment_id,
                                   parent_run_id=self.parent_run, nested=True,
                                   tags={**tags, tracking.TAG_STEP: self.stage_name})
        else:
            mlflow.set_experiment(tracking.experiment_name(self.recipe))
            run = mlflow.start_run(run_name=self.stage_name, tags={
                **tracking.lineage_tags(self.recipe, os.environ.get("ONEVISION_PIPELINE_RUN_ID", "standalone")),
                tracking.TAG_STEP: self.stage_name})
        self.run_id = run.info.run_id
        mlflow.log_params(tracking.flatten_params({"stage": self.stage.model_dump(mode="json"),
                                                   "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                                                   "params": self.params}))
        self._log_data_card()
        storage.write_bytes(marker, json.dumps({"run_id": self.run_id}).encode())

    def _log_data_card(self) -> None:
        """The curated data this stage trains on, in its run: URI, manifest hash, counts and the card (curation
        is cached across pipeline runs, so the stage's run, not a curate run, is where the lineage lives)."""
        import mlflow

        if not self.data_uri:
            return
        try:  # a data folder with no card (hand-made shards) trains without one
            card = json.loads(storage.read_bytes(storage.join(self.data_uri, "data_card.json")))
            card_markdown = storage.read_bytes(storage.join(self.data_uri, "data_card.md")).decode()
        except storage.StorageNotFoundError:
            return
        mlflow.log_params({"data_uri": self.data_uri, "data_manifest_sha256": storage.manifest_hash(self.data_uri),
                           "data_recipe_hash": card.get("data_recipe_hash", "")})
        mlflow.log_metrics({f"data_{k}": v for k, v in card["totals"].items()})
        mlflow.log_dict(card, "data_card.json")
        mlflow.log_text(card_markdown, "data_card.md")

    def callback(self) -> TrainerCallback:
        tracker = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if tracker.enabled:
                    tracker._start_run()
                tracker.step_started = time.perf_counter()

            def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
                if not logs or "loss" not in logs:
                    return
                elapsed = max(time.perf_counter() - tracker.step_started, 1e-9)
                flops = tracker.step_flops(tracker.vision_tokens, tracker.text_tokens)
                world = int(os.environ.get("WORLD_SIZE", "1"))
                row = {"loss": logs["loss"], "grad_norm": logs.get("grad_norm", float("nan")),
                       "samples_per_s": tracker.stage.global_batch_size * args.logging_steps / elapsed,
                       "tokens_per_s": tracker.text_tokens * world / elapsed,
                       "peak_memory_gb": peak_memory_bytes() / 1e9}
                if tracker.peak:  # no MFU on a device whose peak is unknown
                    row["mfu"] = flops * world / elapsed / tracker.peak
                for group in (optimizer.param_groups if optimizer is not None else []):
                    row[f"lr_{group.get('name', 'group')}"] = group["lr"]
                logs.update({k: v for k, v in row.items() if k not in logs})
                tracker.vision_tokens = tracker.text_tokens = 0
                tracker.step_started = time.perf_counter()
                if tracker.enabled:
                    import mlflow

                    mlflow.log_metrics({k: float(v) for k, v in row.items()}, step=state.global_step)

        return _Callback()

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        import mlflow

        for key in ("eval_loss_before", "eval_loss_after", "train_loss"):
            if summary.get(key) is not None:
                mlflow.log_metric(key, float(summary[key]))
        mlflow.set_tag("onevision.checkpoint_uri", summary.get("hf_uri", ""))
        mlflow.end_run()

"""What a training stage reports and publishes while it runs (Trainer callbacks).

    tracker = StageTracker(recipe, "stage1", stage, model, out="s3://.../stage1", parent_run=None, is_main=True)
    trainer = Trainer(..., callbacks=[tracker.callback(), ...])

StageTracker: an MLflow run per stage (nested under the pipeline's run when a parent is given; the same
run again after a resume), with the stage's resolved hyper-parameters, and per step: loss, learning
rate of each parameter group, grad norm, samples/s, tokens/s, estimated MFU and peak memory. Every call
to MLflow goes through a tracking.RunWriter queue on its own thread: an outage mid-stage never blocks or
stops training, and what was queued is sent when the server is back.

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
from onevision.recipe import Recipe, StageSpec, numel, part_of

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
        self.recipe, self.stage_name, self.stage, self.out = recipe, stage_name, stage, out
        self.is_main = is_main
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
        # everything MLflow gets goes through this queue, on its own thread
        self.writer = tracking.RunWriter(os.environ["MLFLOW_TRACKING_URI"], label="[metrics]") if self.enabled else None

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
        """Queue the run's opening: each piece is its own call, so a retry after an outage repeats none that
        went through (a second create_run would leave a stray run)."""
        marker = storage.join(self.out, "mlflow_run.json")
        if storage.exists(marker):  # a resumed stage continues its run
            self.writer.set_run_id(json.loads(storage.read_bytes(marker))["run_id"])
            self.writer.call(lambda client: client.update_run(self.writer.run_id, status="RUNNING"))
            return
        self.writer.call(self._create_run)
        params = tracking.flatten_params({"stage": self.stage.model_dump(mode="json"),
                                          "world_size": int(os.environ.get("WORLD_SIZE", "1")), "params": self.params})
        self.writer.call(lambda client: self._log_params(client, params))
        self.writer.call(self._log_data_card)
        self.writer.call(lambda client: storage.write_bytes(marker, json.dumps({"run_id": self.writer.run_id}).encode()))

    def _create_run(self, client: Any) -> None:
        if self.parent_run:  # nested under the pipeline's run, with its lineage tags
            parent = client.get_run(self.parent_run)
            tags = {k: v for k, v in parent.data.tags.items() if k.startswith("onevision.") and k != tracking.TAG_STEP}
            experiment_id = parent.info.experiment_id
            tags["mlflow.parentRunId"] = self.parent_run
        else:
            name = tracking.experiment_name(self.recipe)
            found = client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found else client.create_experiment(name)
            tags = tracking.lineage_tags(self.recipe, os.environ.get("ONEVISION_PIPELINE_RUN_ID", "standalone"))
        run = client.create_run(experiment_id, run_name=self.stage_name, tags={**tags, tracking.TAG_STEP: self.stage_name})
        self.writer.set_run_id(run.info.run_id)

    def _log_params(self, client: Any, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit of params per batch
            client.log_batch(self.writer.run_id, params=items[i:i + 100])

    def _log_data_card(self, client: Any) -> None:
        """The curated data this stage trains on, in its run: URI, manifest hash, counts and the card (curation
        is cached across pipeline runs, so the stage's run, not a curate run, is where the lineage lives)."""
        from mlflow.entities import Metric

        if not self.data_uri:
            return
        try:  # a data folder with no card (hand-made shards) trains without one
            card = json.loads(storage.read_bytes(storage.join(self.data_uri, "data_card.json")))
            card_markdown = storage.read_bytes(storage.join(self.data_uri, "data_card.md")).decode()
        except storage.StorageNotFoundError:
            return
        run_id = self.writer.run_id
        self._log_params(client, {"data_uri": self.data_uri, "data_manifest_sha256": storage.manifest_hash(self.data_uri),
                                  "data_recipe_hash": card.get("data_recipe_hash", "")})
        stamp = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"data_{k}", float(v), stamp, 0) for k, v in card["totals"].items()])
        client.log_dict(run_id, card, "data_card.json")
        client.log_text(run_id, card_markdown, "data_card.md")

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
                if tracker.enabled:  # queued: an MLflow outage does not stop training
                    tracker.writer.log_metrics({k: float(v) for k, v in row.items()}, state.global_step)
                if tracker.is_main:  # one line per step, which `onevision run` turns into a progress bar
                    print(f"[progress] {tracker.stage_name} step {state.global_step}/{state.max_steps} "
                          f"loss {float(logs['loss']):.3f}", flush=True)

        return _Callback()

    def finish(self, summary: dict[str, Any]) -> None:
        """The stage's summary metrics and checkpoint tag, the run's end; waits a bounded time for the queue."""
        if not self.enabled:
            return
        final = {k: float(summary[k]) for k in ("eval_loss_before", "eval_loss_after", "train_loss")
                 if summary.get(k) is not None}
        self.writer.log_metrics(final, summary.get("steps", 0))
        self.writer.call(lambda client: client.set_tag(self.writer.run_id, "onevision.checkpoint_uri",
                                                       summary.get("hf_uri", "")))
        self.writer.call(lambda client: client.set_terminated(self.writer.run_id, "FINISHED"))
        self.writer.close(float(os.environ.get("ONEVISION_TRACKING_FLUSH_S", "120")))

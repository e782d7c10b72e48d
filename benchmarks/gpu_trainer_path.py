"""The product's training path on one GPU, for gpu_bench.py: the recipe's Stage-2 settings through
`model.train.make_trainer` (its ZeRO stage, precision, gradient checkpointing, modality-length sampler,
optimizer groups), fed by the real data pipeline (curate_stage -> shards -> ShardDataset ->
SampleProcessor -> Collator). gpu_bench's bare forward/backward loop is the upper bound this path is read
against: the gap is what the trainer and the data pipeline cost.

    python benchmarks/gpu_bench.py --shapes 0.5b             # the trainer row comes with each shape
    python benchmarks/gpu_bench.py --cpu-smoke --no-serving  # the same code path on tiny shapes, a minute

Data: `steps x batch` generated records, each one random-noise JPEG of (grid x tile) px square (the
stage's largest square AnyRes grid, as in the bare loop; noise so that pHash dedup keeps them all) and a
question + answer of about `--text-tokens` tokens, curated with the recipe's own curation settings.
With `mix`, the data is the OneVision-shaped mix instead (model/shapes_world.py `ov_mix` at the recipe's
384-px tile: text-only, single images on 1x1..3x3 grids up to 7,290 visual tokens, 2-6 images, videos at the
stage's 32 frames x 196 tokens) in micro-batches of `--mix-batch`, once padded and once packed
(`training.packing`): the padding-free comparison on the real shape.
A step's time is measured from one `on_step_end` to the next (data loading, forward, backward, the ZeRO
optimizer step), after the warm-up steps, with the device synchronised.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_records(folder: Path, count: int, side: int, text_tokens: int, seed: int = 0) -> Path:
    """`count` single-image records (LLaVA JSON) over noise JPEGs of side x side px; the JSON's path."""
    import numpy as np
    from PIL import Image

    from model.builder import tiny_corpus

    rng = random.Random(seed)
    words = " ".join(tiny_corpus()).split()
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        pixels = np.random.default_rng(seed * 100_003 + i).integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "img" / f"{i}.jpg", quality=90)
        # ~1.3 tiny-tokenizer tokens a word: about text_tokens in all, a quarter in the question
        answer = " ".join(rng.choice(words) for _ in range(max(1, text_tokens * 3 // 5)))
        question = " ".join(rng.choice(words) for _ in range(max(1, text_tokens // 5)))
        records.append({"id": f"gpu-{i}", "image": f"img/{i}.jpg", "conversations": [
            {"from": "human", "value": f"<image>\n{question}?"}, {"from": "gpt", "value": answer}]})
    path = folder / "records.json"
    path.write_text(json.dumps(records))
    return path


def profile_start(device: Any) -> Any:
    """torch.profiler over CPU (and CUDA) activity, started now; stopped by profile_write."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


def profile_write(profiler: Any, path: Path) -> None:
    """Stop `profiler`; write its op tables (by self CPU time, and by self device time on a GPU) to `path`."""
    profiler.stop()
    averages = profiler.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    if any(getattr(e, "self_device_time_total", 0) for e in averages):
        tables.append(averages.table(sort_by="self_device_time_total", row_limit=30))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables) + "\n")
    print(f"trainer step profile: {path}", flush=True)


def bench_trainer_path(shape: str, layers: int, args: argparse.Namespace, device: Any, settings: dict,
                       mix: bool = False, packing: bool = False, shared: Path | None = None) -> dict[str, Any]:
    """tokens/s, model FLOP/s and MFU of `make_trainer(...).train()` on the `shape`'s recipe and stage.

    `mix`: the OneVision-shaped mix (synthetic://shapes/ov_mix at the recipe's tile) in micro-batches of
    `args.mix_batch` instead of uniform largest-grid images; `packing` sets `training.packing`; the mix is
    curated once into `shared` and reused, so the padded and the packed row train on the same shards."""
    import torch
    from transformers import TrainerCallback

    from benchmarks.gpu_bench import SHAPES, TINY, build, grid_for, stage_of, sync
    from components.curate.core import curate_stage
    from model.builder import configure_stage, make_processor, tiny_corpus, train_tiny_tokenizer
    from model.chat import IMAGE_TOKEN, VIDEO_TOKEN
    from model.metrics import device_peak_flops, flops_per_token_factor, unknown_peak_reason
    from model.train import apply_trainable_parts, build_datasets, make_args, make_trainer, single_process_env
    from onevision.recipe import load_recipe, numel, part_of

    base, base_stage = stage_of(shape, args.stage)
    tile = TINY["tile"] if args.cpu_smoke else base.model.image_size
    grid = grid_for(base_stage, base.model.tokens_per_tile)
    batch = args.mix_batch if mix else (args.batch or base_stage.per_device_batch_size)
    steps = settings["warmup"] + settings["steps"] + (1 if args.profile_trainer else 0)  # + the profiled one
    tmp = Path(tempfile.mkdtemp(prefix="gpu-trainer-path-"))
    try:
        if mix:  # a few spare samples: curation may drop a duplicate
            data = [{"dataset_uri": f"synthetic://shapes/ov_mix?n={steps * batch + 8}&tile={tile}",
                     "sampling_strategy": "all"}]
        else:
            records = write_records(tmp / "src", steps * batch, grid * tile, args.text_tokens)
            data = [{"json_path": str(records), "media_root": str(records.parent)}]
        recipe_path = tmp / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump({
            "extends": str(ROOT / SHAPES[shape]["recipe"]),
            "training": {"save_every_steps": 10**6, "packing": packing,
                         **({"zero_stage": args.trainer_zero_stage} if args.trainer_zero_stage is not None else {})},
            "curation": {"workers": 1 if args.cpu_smoke else 0},
            "stages": {args.stage: {"max_steps": steps, "epochs": 1, "per_device_batch_size": batch,
                                    "global_batch_size": batch, "data": data}}}))
        recipe = load_recipe(recipe_path)
        stage = getattr(recipe.stages, args.stage)
        data_dir = (shared or tmp) / "data"
        if not (mix and shared and data_dir.exists()):
            curated = curate_stage(recipe, args.stage, str(data_dir), work_dir=str(tmp / "work"))
            kept = curated["totals"]["kept"] if isinstance(curated, dict) and "totals" in curated else None
            if mix and shared:
                (shared / "kept.json").write_text(json.dumps(kept))
        else:
            kept = json.loads((shared / "kept.json").read_text())

        single_process_env()
        tokenizer = train_tiny_tokenizer(tiny_corpus(), 560)  # offline; the model keeps Qwen2's vocabulary size
        processor = make_processor(tokenizer, recipe)
        processor.image_processor.size = {"height": tile, "width": tile}
        processor.video_processor.size = {"height": tile, "width": tile}  # the mix has videos
        processor.num_image_tokens = (tile // recipe.model.patch_size) ** 2
        training_args = make_args(recipe, stage, args.stage, tmp / "out")  # before the model: ZeRO-3 zero.Init
        dtype = torch.bfloat16 if training_args.bf16 else torch.float32
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model, _ = build(shape, layers, stage, recipe, device, dtype, args.cpu_smoke,
                         tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(VIDEO_TOKEN))
        configure_stage(model, processor, stage, tile)
        model.config.use_cache = False
        apply_trainable_parts(model, stage)
        train_set, _ = build_datasets(recipe, stage, args.stage, processor, str(data_dir), tmp / "cache", 0)
        params = {"vision_tower": 0, "projector": 0, "language_model": 0}  # as gpu_bench.step_flops counts them
        for name, p in model.named_parameters():
            if "embed_tokens" not in name:
                params[part_of(name)] += numel(p)  # ZeRO-3 built the model partitioned: ds_numel, not numel

        per_tile = (tile // recipe.model.patch_size) ** 2
        counted = {"llm": 0, "vision": 0, "computed": 0}
        marks: list[float] = []

        def on_batch(inputs: dict[str, Any]) -> None:  # every micro-batch the trainer takes
            # non-padding tokens: the attention mask of padded rows; a padding-free row is all tokens
            counted["llm"] += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
            counted["computed"] += inputs["input_ids"].numel()
            tiles = inputs["pixel_values"].shape[0] if "pixel_values" in inputs else 0
            if "pixel_values_videos" in inputs:  # every frame goes through the vision tower as a tile
                tiles += inputs["pixel_values_videos"].shape[0] * inputs["pixel_values_videos"].shape[1]
            counted["vision"] += tiles * per_tile

        per_step: list[tuple[int, int]] = []

        profiler = None
        label = f"{shape}-{'mix-packed' if packing else 'mix-padded' if mix else 'uniform'}-zero{recipe.training.zero_stage}"

        class StepClock(TrainerCallback):
            def on_step_end(self, args_, state, control, **kwargs):
                nonlocal profiler
                sync(device)
                marks.append(time.perf_counter())
                per_step.append((counted["llm"], counted["vision"], counted["computed"]))
                if args.profile_trainer and len(marks) == steps - 1:  # the last step, from this mark to its end
                    profiler = profile_start(device)
                elif profiler is not None and len(marks) == steps:
                    profile_write(profiler, Path(args.profile_trainer) / f"trainer-step-{label}.txt")

        trainer = make_trainer(recipe, stage, args.stage, training_args, model, processor, train_set, None,
                               [StepClock()], on_batch=on_batch)
        trainer.train()
        warm = settings["warmup"]
        if profiler is not None:  # the profiled step, one more than the settings ask for, ran slower: not timed
            marks.pop()
            per_step.pop()
        if len(marks) <= warm + 1:
            raise RuntimeError(f"trainer path: {len(marks)} steps ran, need more than {warm + 1}")
        spans = [b - a for a, b in zip(marks[warm:], marks[warm + 1:])]
        llm = per_step[-1][0] - per_step[warm][0]  # tokens of the timed steps (after the first timed mark)
        vision = per_step[-1][1] - per_step[warm][1]
        computed = per_step[-1][2] - per_step[warm][2]
        seconds = sum(spans)
        factors = flops_per_token_factor(set(stage.trainable))
        flops = (factors["vision_tower"] * params["vision_tower"] * vision
                 + factors["projector"] * params["projector"] * vision
                 + factors["language_model"] * params["language_model"] * llm)
        peak = device_peak_flops()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result = {
            "shape": shape, "path": "make_trainer", "recipe": SHAPES[shape]["recipe"], "stage": args.stage,
            "zero_stage": recipe.training.zero_stage, "deepspeed": training_args.deepspeed is not None,
            "dtype": str(dtype).replace("torch.", ""), "llm_layers": layers,
            "llm_layers_full_model": SHAPES[shape]["full_layers"], "batch": batch,
            "records_curated": kept, "params_counted": params,
            "data": "ov_mix" if mix else "uniform", "packing": packing,
            "padding_share": round(1 - llm / computed, 3) if computed else None,
            "image_grid": "1x1..3x3 + base tile (OneVision mix)" if mix else f"{grid}x{grid} + base tile",
            "timed_steps": len(spans), "median_step_s": round(statistics.median(spans), 4),
            "step_s": [round(s, 4) for s in spans], "tokens_per_s": round(llm / seconds, 1),
            "model_flops_per_s": flops / seconds, "peak_flops": peak,
            "mfu": round(flops / seconds / peak, 4) if peak else None, "mfu_refused": unknown_peak_reason(),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
            "final_loss": round(losses[-1], 4) if losses else None,
        }
        del trainer, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return result
    finally:
        # TrainingArguments(deepspeed=ZeRO-3) leaves a process-wide flag that makes every later
        # from_config build partitioned weights (zero.Init): the next shape's bare loop needs whole ones.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        shutil.rmtree(tmp, ignore_errors=True)

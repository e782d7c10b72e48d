"""Training throughput: our stage trainer vs. a plain transformers Trainer on the same tiny data.

    .venv/bin/python benchmarks/bench_training.py                 # writes benchmarks/results/training.json
    .venv/bin/python benchmarks/bench_training.py --steps 10      # quicker

Both train the same seeded tiny model on the same curated shards of `--stage` (default Stage-2 SI: single
images of mixed AnyRes grids; stage2_ov adds multi-image and video) for the same number of steps and
global batch, one process, no ZeRO, so that only the data side differs. Baseline: `transformers.Trainer` with its default random sampler, each
batch padded to its longest sample. Ours: `model.train.make_trainer` (modality-length grouped
megabatches, concatenated AnyRes patches). Reported: non-padding tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def measure(steps: int, stage_name: str = "stage2_si", repeats: int = 2) -> dict:
    """Naive and ours, alternating; the raw result (what results/training.json holds), losses included."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from transformers import Trainer

    from components.curate.core import curate_stage
    from model.batching import Collator
    from model.builder import build_model_and_processor, configure_stage
    from model.train import apply_trainable_parts, build_datasets, make_args, make_trainer, single_process_env
    from onevision.recipe import load_recipe

    single_process_env()
    tmp = Path(tempfile.mkdtemp(prefix="bench-training-"))
    recipe_path = tmp / "recipe.yaml"
    base = load_recipe(ROOT / "recipes/tiny.yaml")
    stage = getattr(base.stages, stage_name)
    recipe_path.write_text(yaml.safe_dump({
        "extends": str(ROOT / "recipes/tiny.yaml"), "training": {"zero_stage": 0, "save_every_steps": 10**6},
        "stages": {stage_name: {"max_steps": steps, "per_device_batch_size": 8, "global_batch_size": 8,
                                "data": [{"dataset_uri": f"{d.dataset_uri}?n=200", "sampling_strategy": d.sampling_strategy}
                                         for d in stage.data]}}}))
    recipe = load_recipe(recipe_path)
    stage = getattr(recipe.stages, stage_name)
    curate_stage(recipe, stage_name, str(tmp / "data"), work_dir=str(tmp / "work"))

    results: dict[str, dict] = {}
    for name in ("naive", "ours") * repeats:  # alternating, best of each: warm-up and drift cancel
        model, processor = build_model_and_processor(recipe)
        configure_stage(model, processor, stage, recipe.model.image_size)
        model.config.use_cache = False
        apply_trainable_parts(model, stage)
        train_set, _ = build_datasets(recipe, stage, stage_name, processor, str(tmp / "data"), tmp / "cache", 0)
        training_args = make_args(recipe, stage, stage_name, tmp / name)
        if name == "naive":
            square = stage.image_aspect_ratio == "square"
            trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                              data_collator=Collator(processor.tokenizer.pad_token_id, square=square))
        else:
            trainer = make_trainer(recipe, stage, stage_name, training_args, model, processor, train_set, None, [])
        trainer.train()
        runtime = trainer.state.log_history[-1]["train_runtime"]
        row = {"tokens": int(trainer.state.num_input_tokens_seen), "seconds": round(runtime, 2),
               "tokens_per_s": round(trainer.state.num_input_tokens_seen / runtime, 1),
               "loss": [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]}
        if name not in results or row["tokens_per_s"] > results[name]["tokens_per_s"]:
            results[name] = row
    shutil.rmtree(tmp, ignore_errors=True)
    return {"benchmark": "training tokens/s (non-padding)", "stage": stage_name, "steps": steps,
            "baseline": "transformers.Trainer, random sampler, pad to longest", "machine":
            f"{platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads", **results,
            "repeats": repeats,
            "ratio_ours_vs_naive": round(results["ours"]["tokens_per_s"] / results["naive"]["tokens_per_s"], 2)}


def run(quick: bool = False) -> dict:
    """The common benchmark protocol (benchmarks/README.md)."""
    raw = measure(8 if quick else 30, "stage2_si", 1 if quick else 2)

    def steps(losses: list[float]) -> list[int]:
        return list(range(1, len(losses) + 1))

    ours, naive = raw["ours"], raw["naive"]
    tail = min(10, len(ours["loss"]), len(naive["loss"]))  # one step's loss swings with its length group
    final = (f"; mean loss of the last {tail} steps {sum(ours['loss'][-tail:]) / tail:.2f} vs "
             f"{sum(naive['loss'][-tail:]) / tail:.2f}") if tail else ""
    return {"name": "training", "title": "training",
            "measures": f"non-padding tokens/s, tiny model, {raw['stage']} data, {raw['steps']} steps of batch 8, "
                        "one process",
            "baseline": "plain transformers.Trainer: random sampler, each batch padded to its longest sample",
            "metric": "tokens/s", "higher_is_better": True,
            "rows": [{"label": raw["stage"], "ours": ours["tokens_per_s"], "baseline": naive["tokens_per_s"],
                      "notes": f"best of {raw['repeats']}, torch threads {raw['machine'].split(', ')[-1].split()[0]}{final}"}],
            "series": {"loss": {"kind": "line", "title": f"training loss, {raw['stage']} (same seed and data, own batch order)",
                                "xlabel": "step", "ylabel": "loss",
                                "lines": {"ours (make_trainer)": {"x": steps(ours["loss"]), "y": ours["loss"]},
                                          "baseline (Trainer)": {"x": steps(naive["loss"]), "y": naive["loss"]}}}},
            "details": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--stage", default="stage2_si")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/training.json"))
    args = parser.parse_args()
    report = measure(args.steps, args.stage, args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

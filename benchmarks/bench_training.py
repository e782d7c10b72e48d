"""Training throughput on OneVision-shaped lengths: packed vs. padded vs. a plain transformers Trainer.

    .venv/bin/python benchmarks/bench_training.py                 # writes benchmarks/results/training.json
    .venv/bin/python benchmarks/bench_training.py --steps 10      # quicker

Data: `synthetic://shapes/ov_mix` (model/shapes_world.py: 10% text-only, 40% single images on 1x1..3x3
AnyRes grids, 30% 2-6 images, 20% videos), at 112-px tiles (64 tokens a tile: the tiny model's vision
tower at the scale where the mix keeps OneVision's length ratios best; OV_MIX_CARD says why), videos at
16 frames. Sequence lengths run from ~60 (text) to ~700 tokens (a 3x3 grid), as OneVision's run from ~100
to ~7,400.

Three trainers on the same seeded tiny model, the same curated shards, the same steps and global batch
(8), one process, no ZeRO, so that only the batching differs:
- `naive`: `transformers.Trainer` with its default random sampler, each batch padded to its longest;
- `padded`: `model.train.make_trainer` with `training.packing: false` (modality-length grouped
  megabatches, rows padded to the longest of the batch);
- `packed`: `make_trainer` with `training.packing: true` (the same sampler; each micro-batch is one
  padding-free row, attention kept per sample from the restarting position ids).
Reported: non-padding tokens/s (the Trainer's `num_input_tokens_seen`, "non_padding") of each, best of
`repeats` runs taken in alternation (naive, padded, packed, naive, ...) so that drift on a shared machine
hits all three alike, the ratios within each round, the same by this process's CPU time (what other load
on a shared machine inflates least), and the per-step losses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TILE = 112          # px; 64 tokens a tile with the tiny recipe's patch 14
VIDEO_FRAMES = 16   # OneVision samples 8-32; one count per batch (transformers' pixel_values_videos)
CONFIGS = ("naive", "padded", "packed")


def write_recipes(tmp: Path, steps: int, samples: int) -> dict[str, Path]:
    """The tiny recipe at 112-px tiles, Stage-2 OV on the OneVision mix; padded and packed variants."""
    per_tile = (TILE // 14) ** 2
    stage = {"max_steps": steps, "per_device_batch_size": 8, "global_batch_size": 8, "video_frames": VIDEO_FRAMES,
             "max_visual_tokens": 11 * per_tile, "model_max_length": 12 * per_tile,
             "data": [{"dataset_uri": f"synthetic://shapes/ov_mix?n={samples}&tile={TILE}", "sampling_strategy": "all"}]}
    paths = {}
    for packing in (False, True):
        path = tmp / f"recipe-{'packed' if packing else 'padded'}.yaml"
        path.write_text(yaml.safe_dump({
            "extends": str(ROOT / "recipes/tiny.yaml"), "model": {"image_size": TILE},
            "training": {"zero_stage": 0, "save_every_steps": 10**6, "packing": packing},
            "stages": {"stage2_ov": stage}}))
        paths["packed" if packing else "padded"] = path
    return paths


def measure(steps: int, repeats: int = 2) -> dict:
    """naive / padded / packed, alternating; the raw result (what results/training.json holds), losses included."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from transformers import Trainer

    from components.curate.core import curate_stage
    from model.batching import Collator
    from model.builder import build_model_and_processor, configure_stage
    from model.train import apply_trainable_parts, build_datasets, make_args, make_trainer, single_process_env
    from onevision.recipe import load_recipe

    single_process_env()
    stage_name = "stage2_ov"
    tmp = Path(tempfile.mkdtemp(prefix="bench-training-"))
    paths = write_recipes(tmp, steps, steps * 8 + 16)  # one epoch and a little: curation may drop a duplicate
    recipes = {"naive": load_recipe(paths["padded"]), "padded": load_recipe(paths["padded"]),
               "packed": load_recipe(paths["packed"])}
    curated = curate_stage(recipes["padded"], stage_name, str(tmp / "data"), work_dir=str(tmp / "work"))

    results: dict[str, dict] = {}
    for name in CONFIGS * repeats:
        recipe = recipes[name]
        stage = getattr(recipe.stages, stage_name)
        model, processor = build_model_and_processor(recipe)
        configure_stage(model, processor, stage, recipe.model.image_size)
        model.config.use_cache = False
        apply_trainable_parts(model, stage)
        train_set, _ = build_datasets(recipe, stage, stage_name, processor, str(tmp / "data"), tmp / "cache", 0)
        training_args = make_args(recipe, stage, stage_name, tmp / name)
        if name == "naive":
            trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                              data_collator=Collator(processor.tokenizer.pad_token_id))
        else:
            trainer = make_trainer(recipe, stage, stage_name, training_args, model, processor, train_set, None, [])
        counted = {"real": 0, "computed": 0}
        collate = trainer.data_collator

        def counting(items, collate=collate, counted=counted):  # padding share of what the model computes on
            batch = collate(items)
            counted["real"] += sum(len(item) for item in items)
            counted["computed"] += batch["input_ids"].numel()
            return batch

        trainer.data_collator = counting
        cpu_started = time.process_time()
        trainer.train()
        cpu_seconds = time.process_time() - cpu_started  # this process's CPU time: what other load cannot inflate
        runtime = trainer.state.log_history[-1]["train_runtime"]
        tokens = int(trainer.state.num_input_tokens_seen)
        row = {"tokens": tokens, "computed_tokens": counted["computed"],
               "padding_share": round(1 - counted["real"] / max(counted["computed"], 1), 3), "seconds": round(runtime, 2),
               "tokens_per_s": round(tokens / runtime, 1), "cpu_seconds": round(cpu_seconds, 2),
               "tokens_per_cpu_s": round(tokens / cpu_seconds, 1),
               "loss": [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]}
        print(f"[bench_training] {name}: {row['tokens_per_s']} tokens/s, {row['seconds']} s, "
              f"padding {row['padding_share']:.0%}", flush=True)
        for key in ("tokens_per_s", "tokens_per_cpu_s"):
            row[f"runs_{key}"] = results.get(name, {}).get(f"runs_{key}", []) + [row[key]]
        if name in results and row["tokens_per_s"] <= results[name]["tokens_per_s"]:
            row = {**results[name], "runs_tokens_per_s": row["runs_tokens_per_s"],
                   "runs_tokens_per_cpu_s": row["runs_tokens_per_cpu_s"]}
        results[name] = row
    shutil.rmtree(tmp, ignore_errors=True)
    ratio = lambda a, b: round(results[a]["tokens_per_s"] / results[b]["tokens_per_s"], 2)  # noqa: E731

    def per_round(a: str, b: str, key: str) -> list[float]:  # a/b within each alternation round
        return [round(x / y, 2) for x, y in zip(results[a][f"runs_{key}"], results[b][f"runs_{key}"])]

    return {"benchmark": "training tokens/s (non-padding), OneVision-shaped mix", "stage": stage_name,
            "steps": steps, "batch": 8, "tile_px": TILE, "video_frames": VIDEO_FRAMES,
            "records_kept": curated.get("totals", {}).get("kept") if isinstance(curated, dict) else None,
            "baseline": "transformers.Trainer, random sampler, pad to longest", "machine":
            f"{platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads", **results,
            "repeats": repeats, "ratio_packed_vs_naive": ratio("packed", "naive"),
            "ratio_packed_vs_padded": ratio("packed", "padded"), "ratio_padded_vs_naive": ratio("padded", "naive"),
            "rounds": {f"{a}_vs_{b}": {"wall": per_round(a, b, "tokens_per_s"), "cpu": per_round(a, b, "tokens_per_cpu_s")}
                       for a, b in (("packed", "naive"), ("packed", "padded"), ("padded", "naive"))}}


def run(quick: bool = False) -> dict:
    """The common benchmark protocol (benchmarks/README.md)."""
    raw = measure(8 if quick else 30, 1 if quick else 2)

    def steps(losses: list[float]) -> list[int]:
        return list(range(1, len(losses) + 1))

    def tail_mean(name: str) -> float:
        losses = raw[name]["loss"][-10:]
        return sum(losses) / max(len(losses), 1)

    def note(name: str) -> str:
        r = raw[name]
        return f"padding {r['padding_share']:.0%} of computed tokens, {r['seconds']} s"

    def rounds(pair: str) -> str:  # per alternation round, wall clock and this process's CPU time
        r = raw["rounds"][pair]
        return f"per round {' / '.join(map(str, r['wall']))} (CPU time: {' / '.join(map(str, r['cpu']))})"

    best = f"best of {raw['repeats']}, alternating"
    tails = ", ".join(f"{n} {tail_mean(n):.2f}" for n in CONFIGS)
    return {"name": "training", "title": "training",
            "measures": f"non-padding tokens/s, tiny model at {raw['tile_px']}-px tiles, OneVision-shaped mix "
                        f"(synthetic://shapes/ov_mix), {raw['steps']} steps of batch {raw['batch']}, one process",
            "baseline": "plain transformers.Trainer (random sampler, pad to longest); our padded make_trainer",
            "metric": "tokens/s", "higher_is_better": True,
            "rows": [
                {"label": "packed vs plain Trainer", "ours": raw["packed"]["tokens_per_s"],
                 "baseline": raw["naive"]["tokens_per_s"],
                 "notes": f"{best}; {rounds('packed_vs_naive')}; packed {note('packed')}; Trainer {note('naive')}"},
                {"label": "packed vs our padded trainer", "ours": raw["packed"]["tokens_per_s"],
                 "baseline": raw["padded"]["tokens_per_s"],
                 "notes": f"{rounds('packed_vs_padded')}; padded {note('padded')}"},
                {"label": "our padded trainer vs plain Trainer", "ours": raw["padded"]["tokens_per_s"],
                 "baseline": raw["naive"]["tokens_per_s"],
                 "notes": f"{rounds('padded_vs_naive')}; mean loss of the last 10 steps: {tails}"}],
            "series": {"loss": {"kind": "line", "title": "training loss, OneVision-shaped mix (same seed and data)",
                                "xlabel": "step", "ylabel": "loss",
                                "lines": {"packed (make_trainer)": {"x": steps(raw["packed"]["loss"]), "y": raw["packed"]["loss"]},
                                          "padded (make_trainer)": {"x": steps(raw["padded"]["loss"]), "y": raw["padded"]["loss"]},
                                          "plain Trainer": {"x": steps(raw["naive"]["loss"]), "y": raw["naive"]["loss"]}}}},
            "details": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/training.json"))
    args = parser.parse_args()
    report = measure(args.steps, args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in CONFIGS}, indent=1))


if __name__ == "__main__":
    main()

"""Samples -> training batches: our pipeline vs. calling the processor per sample, as a ratio.

    .venv/bin/python benchmarks/bench_batching.py                 # writes benchmarks/results/batching.json
    .venv/bin/python benchmarks/bench_batching.py --samples 60    # quicker

Baseline ("naive"): what a first training script does - per sample, render the chat template, open
the media with PIL/PyAV, call `LlavaOnevisionProcessor(text=..., images=..., videos=...)`, then pad
the batch with the tokenizer. Ours: `model.processing.SampleProcessor` + `model.batching.Collator`
(visual token runs inserted as ids instead of tokenizing thousands of "<image>" strings, labels masked),
once in-process and once through a DataLoader with 2 workers. Two scales of the same shapes world:
`tiny` (56-px tiles, 16 tokens/tile) and `ov` (384-px tiles, 729 tokens/tile, grid (1x1)..(6x6),
images upscaled 6x), both measured in the same run; the ratio is the result, not the seconds.
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
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from model.batching import Collator
from model.builder import configure_stage, make_processor, train_tiny_tokenizer, tiny_corpus
from model.media import load_video
from model.processing import SampleProcessor
from model.shapes_world import generate_world
from onevision.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8


def world_samples(root: Path, n: int, upscale: int) -> list[dict]:
    generate_world(root, seed=0, n_per_kind=max(4, n // 4), n_eval=2)
    samples = []
    for kind in ("captions", "vqa", "multi_image", "video"):
        samples += json.loads((root / f"{kind}.json").read_text())[: n // 4]
    if upscale > 1:
        for path in (root / "images").glob("*.png"):
            image = Image.open(path)
            image.resize((image.width * upscale, image.height * upscale), Image.NEAREST).save(path)
    return samples


def naive_batches(processor, samples: list[dict], root: Path, frames: int) -> int:
    tokenizer = processor.tokenizer
    count = 0
    for start in range(0, len(samples), BATCH):
        features, pixels, clips = [], [], []
        for sample in samples[start: start + BATCH]:
            messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                        for t in sample["conversations"]]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            paths = sample.get("image")
            images = [Image.open(root / p).convert("RGB") for p in ([paths] if isinstance(paths, str) else paths or [])]
            videos = [load_video(root / sample["video"], frames)] if "video" in sample else None
            out = processor(text=text, images=[images] if images else None, videos=videos, return_tensors="pt")
            features.append({"input_ids": out["input_ids"][0]})
            pixels += list(out.get("pixel_values", []))
            clips += list(out.get("pixel_values_videos", []))
            count += 1
        tokenizer.pad(features, return_tensors="pt")
        if pixels:  # the stock processor's batch layout: (images, max patches, 3, S, S), zero-padded
            most = max(p.shape[0] for p in pixels)
            torch.stack([torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) for p in pixels])
        if clips:
            torch.stack(clips)
    return count


class _Stream(Dataset):
    def __init__(self, sp: SampleProcessor, samples: list[dict]):
        self.sp, self.samples = sp, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.sp(self.samples[i])


def ours_batches(sp: SampleProcessor, samples: list[dict], workers: int) -> int:
    collate = Collator(sp.tokenizer.pad_token_id)
    if workers == 0:
        for start in range(0, len(samples), BATCH):
            collate([sp(s) for s in samples[start: start + BATCH]])
        return len(samples)
    loader = DataLoader(_Stream(sp, samples), batch_size=BATCH, num_workers=workers, collate_fn=collate)
    return sum(batch["input_ids"].shape[0] for batch in loader)


def measure(fn, *args) -> float:
    started = time.perf_counter()
    n = fn(*args)
    return n / (time.perf_counter() - started)


def bench_scale(name: str, n: int) -> dict:
    tiny = load_recipe(ROOT / "recipes/tiny.yaml")
    if name == "tiny":
        recipe, upscale = tiny, 1
    else:  # the ov-0.5b visual geometry (384-px SigLIP tiles, (1x1)..(6x6)) with the tiny tokenizer
        doc = tiny.model_dump(mode="json")
        doc["model"].update(image_size=384)
        doc["stages"]["stage2_ov"].update(grid_pinpoints="(1x1),...,(6x6)", max_visual_tokens=7290)
        recipe, upscale = parse_recipe(doc), 6
    stage = recipe.stages.stage2_ov
    processor = make_processor(train_tiny_tokenizer(tiny_corpus(), recipe.model.tiny.vocab_size), recipe)

    class _Holder:  # configure_stage writes the config too; here only the processor matters
        config = type("C", (), {})()
    configure_stage(_Holder, processor, stage, recipe.model.image_size)
    root = Path(tempfile.mkdtemp(prefix=f"bench-batching-{name}-"))
    samples = world_samples(root, n, upscale)
    sp = SampleProcessor(processor, "qwen_1_5", 32768, video_frames=stage.video_frames, media_root=root)
    ours_batches(sp, samples[:BATCH], 0)  # warm-up: imports, tokenizer caches
    naive_batches(processor, samples[:BATCH], root, stage.video_frames)
    naive = measure(naive_batches, processor, samples, root, stage.video_frames)
    ours = measure(ours_batches, sp, samples, 0)
    ours_workers = measure(ours_batches, sp, samples, 2)
    shutil.rmtree(root, ignore_errors=True)
    return {"samples": len(samples), "naive_samples_per_s": round(naive, 2),
            "ours_samples_per_s": round(ours, 2), "ours_2_workers_samples_per_s": round(ours_workers, 2),
            "ratio_ours_vs_naive": round(ours / naive, 2), "ratio_ours_2_workers_vs_naive": round(ours_workers / naive, 2)}


def measure_all(samples: int) -> dict:
    """Both scales; the raw result (what results/batching.json holds)."""
    torch.set_num_threads(1)
    return {"benchmark": "samples -> batches", "baseline": "per-sample LlavaOnevisionProcessor call + tokenizer.pad",
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "batch_size": BATCH,
            "tiny": bench_scale("tiny", samples), "ov": bench_scale("ov", max(8, samples // 4))}


def run(quick: bool = False) -> dict:
    """The common benchmark protocol (benchmarks/README.md)."""
    raw = measure_all(48 if quick else 160)
    rows, scales = [], {"tiny": "tiny (56-px tiles)", "ov": "OV scale (384-px tiles, grid to 6x6)"}
    for key, label in scales.items():
        r = raw[key]
        rows.append({"label": f"{label}, in-process", "ours": r["ours_samples_per_s"], "baseline": r["naive_samples_per_s"],
                     "notes": f"{r['samples']} samples, batch {BATCH}"})
        rows.append({"label": f"{label}, 2 DataLoader workers", "ours": r["ours_2_workers_samples_per_s"],
                     "baseline": r["naive_samples_per_s"], "notes": "baseline in-process (one thread)"})
    return {"name": "batching", "title": "samples -> batches",
            "measures": "samples/s from raw samples to padded training batches (batch 8)",
            "baseline": "per-sample LlavaOnevisionProcessor(...) call, tokenizer.pad, pixels zero-padded to the longest image",
            "metric": "samples/s", "higher_is_better": True, "rows": rows,
            "series": {"throughput": {"kind": "bar", "title": "samples -> batches", "ylabel": "samples/s",
                                      "x": list(scales.values()),
                                      "lines": {"naive (baseline)": [raw[k]["naive_samples_per_s"] for k in scales],
                                                "ours": [raw[k]["ours_samples_per_s"] for k in scales],
                                                "ours, 2 workers": [raw[k]["ours_2_workers_samples_per_s"] for k in scales]},
                                      "log_y": True}},
            "details": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=160, help="samples per scale (tiny); ov uses a quarter")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/batching.json"))
    args = parser.parse_args()
    results = measure_all(args.samples)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

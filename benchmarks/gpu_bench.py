"""GPU benchmark, one command on one GPU (--quick ran in under 5 min on an H200): training tokens/s + MFU
of a 0.5B- and a 7B-shaped LLaVA-OneVision with the recipes' settings, both as a bare forward/backward
loop and through the product's trainer (make_trainer, the recipe's ZeRO stage, the data pipeline:
gpu_trainer_path.py), the same trainer on the OneVision-shaped mix padded vs packed (`training.packing`,
micro-batches of `--mix-batch`, on the 0.5B shape), and serving requests/s (continuous batching vs batch 1).

    python benchmarks/gpu_bench.py                     # on a GPU: writes benchmarks/results/gpu-<date>.json
    python benchmarks/gpu_bench.py --quick             # fewer steps and requests
    python benchmarks/gpu_bench.py --cpu-smoke         # tiny shapes on the CPU: the same code path, seconds
    python benchmarks/gpu_bench.py --layers-7b 12      # more of the 7B's 28 layers (memory permitting)
    python benchmarks/gpu_bench.py --trainer-shapes    # bare loops only (no make_trainer rows)

Without a CUDA device it stops at once with a message (exit 2), unless --cpu-smoke.

Training (random weights, synthetic batch, no hub access needed): per shape, the recipe's Stage-2 OV
settings - recipes/ov-0.5b.yaml and recipes/ov-7b.yaml: bf16 (`training.precision`), gradient
checkpointing, sdpa attention, `per_device_batch_size` samples per step, each one image on the largest
square AnyRes grid inside the stage's `max_visual_tokens` (3x3 + base tile = 10 tiles x 729 for 7,290)
plus `--text-tokens` of text; the whole model trains (Stage-2), AdamW. Shapes: SigLIP-so400m (1152
hidden, 26 layers, 384-px tiles) + Qwen2-0.5B (896 hidden, 24 layers) or Qwen2-7B (3584 hidden, 28
layers, cut to `--layers-7b` so that weights, gradients and AdamW state fit one GPU: per-layer shapes,
and so per-token arithmetic intensity, are the real ones). One GPU, no DeepSpeed: the recipes' ZeRO-3
shards the same per-GPU work across GPUs, so this is the single-GPU compute rate ZeRO starts from.
MFU = model FLOPs/s over the device's dense bf16 peak (model.metrics table; 6 N T per trained
component, input-embedding lookups not counted, attention's T^2 term not counted: the usual
convention). Named baseline measured in the same run: the FLOP/s of a large bf16 matmul on the same
GPU (the ratio is the fraction of achievable dense throughput the training step reaches).

Serving: serving.engine.Engine on the 0.5B shape (bf16, random weights, the in-process tokenizer, the
recipe's 384-px tiles and grid), one `--image-px` image + a question per request, greedy,
`--max-tokens` new tokens (random weights never stop early); N asyncio clients keep one request each in
flight; ours: max_batch_size 16, max_wait 10 ms; baseline: the same engine with max_batch_size 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/gpu_bench.py`: the repo root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onevision.recipe import STAGE_NAMES  # noqa: E402 (after the path fix above)

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = ("gpu_bench: no CUDA device found (no NVIDIA driver, or torch.cuda.is_available() is False). It needs one "
          "GPU; run it on a GPU node, or use --cpu-smoke to check the code path on a CPU.")
VISION_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26, "num_attention_heads": 16}
SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": {"recipe": "recipes/ov-0.5b.yaml", "vision": VISION_SO400M, "full_layers": 24,
             "text": {"vocab_size": 151648, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
                      "num_key_value_heads": 2}},
    "7b": {"recipe": "recipes/ov-7b.yaml", "vision": VISION_SO400M, "full_layers": 28,
           "text": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                    "num_key_value_heads": 4}},
}
TINY = {"vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
        "text": {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                 "num_key_value_heads": 2}, "tile": 56, "layers": 2}
SETTINGS = {  # (warm-up steps, timed steps, serving requests per concurrency, concurrency levels)
    "full": {"warmup": 3, "steps": 10, "requests": 48, "concurrency": (1, 8, 32)},
    "quick": {"warmup": 2, "steps": 5, "requests": 24, "concurrency": (1, 8, 32)},
    "smoke": {"warmup": 1, "steps": 2, "requests": 4, "concurrency": (1, 2)},
}


def fail_without_gpu() -> None:
    """SystemExit with NO_GPU, at once when no GPU device node or driver tool exists (before importing torch)."""
    if not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")) \
            and shutil.which("nvidia-smi") is None:
        raise SystemExit(NO_GPU)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(NO_GPU)


def stage_of(shape: str, stage_name: str) -> tuple[Any, Any]:
    from onevision.recipe import load_recipe

    recipe = load_recipe(ROOT / SHAPES[shape]["recipe"])
    return recipe, getattr(recipe.stages, stage_name)


def build(shape: str, layers: int, stage: Any, recipe: Any, device: Any, dtype: Any, smoke: bool,
          image_token: int | None = None, video_token: int | None = None) -> tuple[Any, int]:
    """A random LLaVA-OneVision of `shape` with `layers` LLM layers, built on `device` in `dtype`; (model, tile)."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    spec = TINY if smoke else SHAPES[shape]
    tile = TINY["tile"] if smoke else recipe.model.image_size
    vision = SiglipVisionConfig(**spec["vision"], image_size=tile, patch_size=recipe.model.patch_size, vision_use_head=False)
    text = Qwen2Config(**spec["text"], num_hidden_layers=layers, max_position_embeddings=32768, tie_word_embeddings=False)
    vocab = text.vocab_size
    aspect = stage.image_aspect_ratio if stage.image_aspect_ratio != "square" else "anyres_max_1"
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, vision_feature_select_strategy="full",
        vision_feature_layer=recipe.model.vision_feature_layer, vision_aspect_ratio=aspect,
        image_token_index=vocab - 2 if image_token is None else image_token,
        video_token_index=vocab - 1 if video_token is None else video_token,
        image_grid_pinpoints=stage.grid_pinpoints_pixels(tile), tie_word_embeddings=False)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=recipe.training.attn_implementation)
    return model, tile


def grid_for(stage: Any, tokens_per_tile: int) -> int:
    """The largest g such that a g x g AnyRes image (plus its base tile) stays within the stage's budget."""
    g = 1
    while (1 + (g + 1) ** 2) * tokens_per_tile <= stage.max_visual_tokens:
        g += 1
    return g


def training_batch(model: Any, tile: int, grid: int, batch: int, text_tokens: int, device: Any) -> tuple[dict, int]:
    """`batch` samples, each one (grid x grid)-tile image + text; (inputs, vision-tower tokens per step)."""
    import torch

    tiles = 1 + grid * grid
    sizes = torch.tensor([[grid * tile, grid * tile]] * batch)
    dtype = next(model.parameters()).dtype
    pixel_values = torch.randn(batch, tiles, 3, tile, tile)
    with torch.no_grad():  # the feature count the model produces = the image tokens it needs
        probe = model.model.get_image_features(pixel_values=pixel_values[:1].to(device, dtype),
                                               image_sizes=sizes[:1].to(device),
                                               vision_aspect_ratio=model.config.vision_aspect_ratio)
    features = probe.pooler_output if hasattr(probe, "pooler_output") else probe
    n_image = features[0].shape[0]
    text = torch.randint(0, model.config.text_config.vocab_size - 2, (batch, text_tokens))
    image = torch.full((batch, n_image), model.config.image_token_id)
    input_ids = torch.cat([image, text], dim=1)
    labels = input_ids.clone()
    labels[:, :n_image] = -100
    inputs = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": pixel_values.to(dtype), "image_sizes": sizes}
    per_tile = (tile // model.config.vision_config.patch_size) ** 2
    return {k: v.to(device) for k, v in inputs.items()}, batch * tiles * per_tile


def step_flops(model: Any, trainable: set[str], llm_tokens: int, vision_tokens: int) -> tuple[float, dict[str, int]]:
    """Model FLOPs of one training step (model.metrics' factors; input embeddings are lookups, not counted)."""
    from model.metrics import flops_per_token_factor
    from onevision.recipe import part_of

    params = {"vision_tower": 0, "projector": 0, "language_model": 0}
    for name, p in model.named_parameters():
        if "embed_tokens" not in name:
            params[part_of(name)] += p.numel()
    factors = flops_per_token_factor(trainable)
    flops = (factors["vision_tower"] * params["vision_tower"] * vision_tokens
             + factors["projector"] * params["projector"] * vision_tokens
             + factors["language_model"] * params["language_model"] * llm_tokens)
    return float(flops), params


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device: Any, dtype: Any, n: int, repeats: int = 20) -> float:
    """Achieved FLOP/s of an n x n x n matmul (the dense-compute ceiling measured on this device)."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 * repeats / best


def bench_training(shape: str, layers: int, args: argparse.Namespace, device: Any, settings: dict) -> dict[str, Any]:
    import torch

    from model.metrics import device_peak_flops, unknown_peak_reason
    from model.train import apply_trainable_parts

    recipe, stage = stage_of(shape, args.stage)
    dtype = torch.bfloat16 if (device.type == "cuda" and recipe.training.precision == "bf16") else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, tile = build(shape, layers, stage, recipe, device, dtype, args.cpu_smoke)
    if recipe.training.gradient_checkpointing:  # renamed in transformers 5 (the old name warns)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.config.use_cache = False
    model.train()
    apply_trainable_parts(model, stage)  # the stage's trainable parts (Stage-2: everything)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=stage.lr,
                                  fused=device.type == "cuda")
    grid = grid_for(stage, recipe.model.tokens_per_tile)
    batch = args.batch or stage.per_device_batch_size
    inputs, vision_tokens = training_batch(model, tile, grid, batch, args.text_tokens, device)
    llm_tokens = inputs["input_ids"].numel()
    flops, params = step_flops(model, set(stage.trainable), llm_tokens, vision_tokens)
    timings, loss = [], None
    for step in range(settings["warmup"] + settings["steps"]):
        sync(device)
        started = time.perf_counter()
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= settings["warmup"]:
            timings.append(time.perf_counter() - started)
    seconds = statistics.median(timings)
    peak_mem = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    result = {
        "shape": shape, "recipe": SHAPES[shape]["recipe"], "stage": args.stage, "dtype": str(dtype).replace("torch.", ""),
        "llm_layers": layers, "llm_layers_full_model": SHAPES[shape]["full_layers"],
        "trainable": list(stage.trainable), "gradient_checkpointing": recipe.training.gradient_checkpointing,
        "attn_implementation": recipe.training.attn_implementation,
        "params_counted": params, "params_total": sum(p.numel() for p in model.parameters()),
        "batch": batch, "image_grid": f"{grid}x{grid} + base tile", "llm_tokens_per_step": llm_tokens,
        "image_tokens_per_sample": llm_tokens // batch - args.text_tokens, "text_tokens_per_sample": args.text_tokens,
        "vision_tokens_per_step": vision_tokens, "median_step_s": round(seconds, 4),
        "step_s": [round(t, 4) for t in timings], "tokens_per_s": round(llm_tokens / seconds, 1),
        "model_flops_per_s": flops / seconds, "peak_flops": device_peak_flops(),
        "mfu": round(flops / seconds / device_peak_flops(), 4) if device_peak_flops() else None,
        "mfu_refused": unknown_peak_reason(),
        "peak_memory_gb": round(peak_mem, 2) if peak_mem is not None else None, "final_loss": round(float(loss.detach()), 4),
    }
    del model, optimizer, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def request_body(i: int, px: int, max_tokens: int) -> dict:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (px, px), ((40 * i) % 255, 120, 200)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": f"Describe image {i} in detail."}]}],
            "max_tokens": max_tokens, "temperature": 0}


def bench_serving(args: argparse.Namespace, device: Any, settings: dict) -> dict[str, Any]:
    import torch

    from benchmarks.bench_serving import drive  # the same clients as the CPU serving benchmark
    from model.builder import configure_stage, make_processor, tiny_corpus, train_tiny_tokenizer
    from model.chat import IMAGE_TOKEN, VIDEO_TOKEN
    from serving.engine import Engine

    recipe, stage = stage_of("0.5b", "stage2_ov")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = train_tiny_tokenizer(tiny_corpus(), 560)  # offline; the model keeps Qwen2's vocabulary size
    image_id, video_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    layers = TINY["layers"] if args.cpu_smoke else SHAPES["0.5b"]["full_layers"]
    model, tile = build("0.5b", layers, stage, recipe, device, dtype, args.cpu_smoke, image_id, video_id)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = make_processor(tokenizer, recipe)
    processor.image_processor.size = {"height": tile, "width": tile}
    processor.num_image_tokens = (tile // recipe.model.patch_size) ** 2
    configure_stage(model, processor, stage, tile)
    px = TINY["tile"] * 2 if args.cpu_smoke else args.image_px
    engines = {"batch_1": Engine(model, processor, max_batch_size=1, max_wait_ms=0),
               "dynamic_batching": Engine(model, processor, max_batch_size=16, max_wait_ms=10)}
    bodies = [request_body(i, px, args.max_tokens) for i in range(settings["requests"])]
    asyncio.run(drive(engines["dynamic_batching"], bodies[:4], 2))  # warm-up (kernels, allocator)
    rows = {}
    for concurrency in settings["concurrency"]:
        row: dict[str, Any] = {}
        for name, engine in engines.items():
            rate, latencies = asyncio.run(drive(engine, bodies, concurrency))
            row[name] = {"requests_per_s": round(rate, 2), "p50_s": round(statistics.median(latencies), 3),
                         "p99_s": round(sorted(latencies)[int(0.99 * (len(latencies) - 1))], 3),
                         "tokens_per_s": round(rate * args.max_tokens, 1)}
        row["ratio"] = round(row["dynamic_batching"]["requests_per_s"] / row["batch_1"]["requests_per_s"], 2)
        rows[f"concurrency_{concurrency}"] = row
        print(f"serving, concurrency {concurrency}: {row}", flush=True)
    del engines, model
    return {"model": "0.5B-shaped (SigLIP-so400m + Qwen2-0.5B, 24 layers), random weights" if not args.cpu_smoke
            else "tiny (smoke)", "dtype": str(dtype).replace("torch.", ""), "image_px": px,
            "max_tokens": args.max_tokens, "requests": settings["requests"], "results": rows}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from model.metrics import device_peak_flops, unknown_peak_reason

    if not args.cpu_smoke:
        fail_without_gpu()
    device = torch.device("cuda" if not args.cpu_smoke else "cpu")
    settings = SETTINGS["smoke" if args.cpu_smoke else "quick" if args.quick else "full"]
    began = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    matmul = matmul_flops(device, dtype, 256 if args.cpu_smoke else 8192)
    peak = device_peak_flops()
    print(f"matmul: {matmul / 1e12:.3g} TFLOP/s measured, spec peak "
          + (f"{peak / 1e12:.3g}" if peak else f"unknown ({unknown_peak_reason()})"), flush=True)
    training = []
    for shape in args.shapes:
        layers = TINY["layers"] if args.cpu_smoke else args.layers_7b if shape == "7b" else SHAPES[shape]["full_layers"]
        got = bench_training(shape, layers, args, device, settings)
        got["ratio_vs_matmul"] = round(got["model_flops_per_s"] / matmul, 3)
        training.append(got)
        if shape in args.trainer_shapes:  # the product's path on the same shape, read against the bare loop
            from benchmarks.gpu_trainer_path import bench_trainer_path

            path = bench_trainer_path(shape, layers, args, device, settings)
            path["ratio_vs_matmul"] = round(path["model_flops_per_s"] / matmul, 3)
            path["ratio_vs_bare_loop"] = round(path["tokens_per_s"] / got["tokens_per_s"], 3)
            training.append(path)
            if args.mix_batch > 1:  # the OneVision mix through make_trainer, padded then packed, same shards
                import tempfile

                shared = Path(tempfile.mkdtemp(prefix="gpu-mix-"))
                try:
                    padded = bench_trainer_path(shape, layers, args, device, settings, mix=True, shared=shared)
                    packed = bench_trainer_path(shape, layers, args, device, settings, mix=True, packing=True,
                                                shared=shared)
                finally:
                    shutil.rmtree(shared, ignore_errors=True)
                for row in (padded, packed):
                    row["ratio_vs_matmul"] = round(row["model_flops_per_s"] / matmul, 3)
                packed["ratio_vs_padded"] = round(packed["tokens_per_s"] / padded["tokens_per_s"], 3)
                training += [padded, packed]
    for got in training:
        mfu = f"MFU {got['mfu']:.3f}" if got["mfu"] is not None else "MFU not computed (unknown device peak)"
        data = f", OV mix {'packed' if got['packing'] else 'padded'}" if got.get("data") == "ov_mix" else ""
        print(f"training {got['shape']} ({got.get('path', 'bare loop')}{data}): {got['tokens_per_s']:.0f} tokens/s, {mfu}, "
              f"{got['ratio_vs_matmul']:.2f} of measured matmul, peak {got['peak_memory_gb']} GB", flush=True)
    serving = bench_serving(args, device, settings) if not args.no_serving else None
    return {
        "benchmark": "GPU training tokens/s + MFU, serving requests/s",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()}), smoke",
        "mode": "smoke" if args.cpu_smoke else "quick" if args.quick else "full",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "matmul_flops_per_s": matmul, "spec_peak_flops": device_peak_flops(),
        "training": training, "serving": serving, "bench_wall_s": round(time.perf_counter() - began, 1),
    }


def to_protocol(raw: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for t in raw["training"]:
        path = (f", make_trainer (ZeRO-{t['zero_stage']}, data pipeline)" if t.get("path") == "make_trainer"
                else ", bare fwd/bwd loop")
        if t.get("data") == "ov_mix":
            path += f", OneVision mix {'packed' if t['packing'] else 'padded'}, batch {t['batch']}"
        label = f"train {t['shape']}{path}" + (f" (LLM cut to {t['llm_layers']} of {t['llm_layers_full_model']} layers)"
                                               if t["llm_layers"] != t["llm_layers_full_model"] else "")
        rows.append({"label": label, "ours": t["model_flops_per_s"] / 1e12, "baseline": raw["matmul_flops_per_s"] / 1e12,
                     "unit": "TFLOP/s", "notes": f"{t['tokens_per_s']:.0f} tokens/s, "
                     + (f"MFU {t['mfu']:.3f} of the {t['peak_flops'] / 1e12:.0f} TFLOP/s spec peak"
                        if t["mfu"] is not None else f"MFU refused: {t['mfu_refused']}")
                     + f", {t['peak_memory_gb']} GB"
                     + (f", {t['ratio_vs_bare_loop']:.2f}x the bare loop's tokens/s" if "ratio_vs_bare_loop" in t else "")
                     + (f", padding {t['padding_share']:.0%} of computed tokens" if t.get("data") == "ov_mix" else "")})
    mixes = [t for t in raw["training"] if t.get("data") == "ov_mix"]
    for padded, packed in zip(mixes[::2], mixes[1::2]):  # tokens/s: packed against padded, same shards and steps
        rows.append({"label": f"train {packed['shape']}, make_trainer OneVision mix: packed vs padded",
                     "ours": packed["tokens_per_s"], "baseline": padded["tokens_per_s"], "unit": "tokens/s",
                     "notes": f"non-padding tokens/s; padding {padded['padding_share']:.0%} padded vs 0% packed; "
                              f"MFU {packed['mfu'] if packed['mfu'] is not None else '-'} vs "
                              f"{padded['mfu'] if padded['mfu'] is not None else '-'}"})
    serving = raw.get("serving") or {"results": {}}
    levels = [int(k.split("_")[1]) for k in serving["results"]]
    for c, r in zip(levels, serving["results"].values(), strict=True):
        rows.append({"label": f"serve 0.5B, concurrency {c}", "ours": r["dynamic_batching"]["requests_per_s"],
                     "baseline": r["batch_1"]["requests_per_s"], "unit": "req/s",
                     "notes": f"p50 {r['dynamic_batching']['p50_s'] * 1000:.0f} vs {r['batch_1']['p50_s'] * 1000:.0f} ms"})
    series = {}
    if levels:
        res = list(serving["results"].values())
        series["serving"] = {"kind": "line", "title": f"GPU serving throughput ({raw['device']})", "x": levels,
                             "log_x": True, "xlabel": "concurrent clients", "ylabel": "requests/s",
                             "lines": {"dynamic batching (ours)": [r["dynamic_batching"]["requests_per_s"] for r in res],
                                       "batch 1 (baseline)": [r["batch_1"]["requests_per_s"] for r in res]}}
    return {"name": "gpu", "title": f"GPU ({raw['device']})",
            "measures": "training model TFLOP/s (recipe settings, bf16) and serving requests/s on one GPU",
            "baseline": "training: a large bf16 matmul's TFLOP/s on the same GPU; serving: the engine at batch 1",
            "metric": "", "higher_is_better": True, "rows": rows, "series": series, "details": raw}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and requests")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: check the code path")
    parser.add_argument("--shapes", nargs="+", default=["0.5b", "7b"], choices=list(SHAPES))
    parser.add_argument("--stage", default="stage2_ov", choices=STAGE_NAMES,
                        help="whose batch, visual-token budget and grid are used")
    parser.add_argument("--layers-7b", type=int, default=8, help="LLM layers of the 7B shape (full: 28)")
    parser.add_argument("--batch", type=int, default=0, help="samples per step (0: the stage's per_device_batch_size)")
    parser.add_argument("--text-tokens", type=int, default=1024, help="text tokens per training sample")
    parser.add_argument("--image-px", type=int, default=768, help="serving: square image side (768: base + 2x2 tiles)")
    parser.add_argument("--max-tokens", type=int, default=32, help="serving: new tokens per request")
    parser.add_argument("--trainer-shapes", nargs="*", default=["0.5b"], choices=list(SHAPES),
                        help="shapes also measured through make_trainer + the data pipeline (none: bare loops only)")
    parser.add_argument("--trainer-zero-stage", type=int, default=None, choices=(0, 1, 2, 3),
                        help="the make_trainer rows' ZeRO stage instead of the recipe's (0: no DeepSpeed)")
    parser.add_argument("--profile-trainer", default=None, metavar="DIR",
                        help="profile the make_trainer rows' last step (torch.profiler op tables to DIR; that step is not timed)")
    parser.add_argument("--mix-batch", type=int, default=4,
                        help="micro-batch of the OneVision-mix trainer rows, padded and packed (<= 1: no such rows)")
    parser.add_argument("--no-serving", action="store_true")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/gpu-<date>.json (smoke: print only)")
    return parser.parse_args(argv)


def run(quick: bool = False) -> dict[str, Any]:
    """The common benchmark protocol (benchmarks/README.md); needs a GPU."""
    fail_without_gpu()
    return to_protocol(measure(parse_args(["--quick"] if quick else [])))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        args.text_tokens = min(args.text_tokens, 32)
        args.max_tokens = min(args.max_tokens, 4)
    try:
        if not args.cpu_smoke:
            fail_without_gpu()  # before torch is imported: seconds, not half a minute
        raw = measure(args)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    raw["report_rows"] = to_protocol(raw)["rows"]
    out = args.out or (None if args.cpu_smoke else str(ROOT / f"benchmarks/results/gpu-{dt.date.today().isoformat()}.json"))
    text = json.dumps(raw, indent=1, default=str)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        print(f"written: {out}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

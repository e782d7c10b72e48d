"""Training tokens/s and MFU of a 0.5B-shaped LLaVA-OneVision on one GPU (random weights, synthetic batch).

    python benchmarks/gpu_train_mfu.py                       # on a GPU: writes benchmarks/results/gpu_train_mfu.json
    python benchmarks/gpu_train_mfu.py --tiny --steps 2      # the same code path on a CPU, in seconds

Shape: SigLIP-so400m (1152 hidden, 26 layers, 384-px tiles, 729 tokens/tile) + Qwen2-0.5B (896 hidden,
24 layers, 14 heads, 2 KV heads, vocab 151,646 + 2). Each sample is one 768x768 image (AnyRes: base tile
+ 2x2 tiles) and `--text-tokens` of text; full model trains (Stage-2), bf16, gradient checkpointing,
AdamW. MFU uses model.metrics' FLOPs model against the device's dense bf16 peak; the baseline the ratio
is taken against is that peak, measured nowhere else.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from model.metrics import device_peak_flops, flops_per_token_factor, peak_memory_bytes
from model.train import part_of

ROOT = Path(__file__).resolve().parents[1]


def build(tiny: bool) -> tuple[LlavaOnevisionForConditionalGeneration, int]:
    if tiny:
        vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=56, patch_size=14, vision_use_head=False)
        text = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
        tile = 56
    else:
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                    num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
        text = Qwen2Config(vocab_size=151648, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                           tie_word_embeddings=False)
        tile = 384
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size - 2,
                                  video_token_index=text.vocab_size - 1, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
                                  image_grid_pinpoints=[[i * tile, j * tile] for i in range(1, 7) for j in range(1, 7)])
    return LlavaOnevisionForConditionalGeneration(config), tile


def synthetic_batch(model: LlavaOnevisionForConditionalGeneration, tile: int, batch: int, text_tokens: int,
                    device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """Batch of `batch` samples, each one 2x2-tile image; returns (inputs, vision tokens)."""
    size = 2 * tile
    sizes = torch.tensor([[size, size]] * batch)
    pixel_values = torch.randn(batch * 5, 3, tile, tile)  # base + 2x2 tiles per image
    with torch.no_grad():  # the feature count the model will produce = image tokens needed
        probe = model.model.get_image_features(pixel_values=pixel_values[:5].to(device, model.dtype),
                                               image_sizes=sizes[:1].to(device),
                                               batch_num_images=torch.tensor([1], device=device),
                                               vision_aspect_ratio="anyres_max_9")
    n_image = probe.pooler_output[0].shape[0]
    text = torch.randint(0, model.config.text_config.vocab_size - 2, (batch, text_tokens))
    image = torch.full((batch, n_image), model.config.image_token_id)
    input_ids = torch.cat([image, text], dim=1)
    labels = input_ids.clone()
    labels[:, :n_image] = -100
    inputs = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": pixel_values.to(model.dtype), "image_sizes": sizes,
              "batch_num_images": torch.ones(batch, dtype=torch.long)}
    tokens_per_tile = (tile // model.config.vision_config.patch_size) ** 2
    return {k: v.to(device) for k, v in inputs.items()}, batch * 5 * tokens_per_tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: check the script on a CPU")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_train_mfu.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tile = build(args.tiny)
    model = model.to(device, dtype)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    inputs, vision_tokens = synthetic_batch(model, tile, args.batch, args.text_tokens, device)
    params = {"vision_tower": 0, "projector": 0, "language_model": 0}
    for name, p in model.named_parameters():
        params[part_of(name)] += p.numel()
    factors = flops_per_token_factor({"vision_tower", "projector", "language_model"})
    text_tokens = inputs["input_ids"].numel()
    step_flops = (factors["vision_tower"] * params["vision_tower"] * vision_tokens
                  + factors["projector"] * params["projector"] * vision_tokens
                  + factors["language_model"] * params["language_model"] * text_tokens)
    timings = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            timings.append(time.perf_counter() - started)
    seconds = sorted(timings)[len(timings) // 2]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
        "shape": "tiny" if args.tiny else "0.5B (SigLIP-so400m + Qwen2-0.5B)", "dtype": str(dtype),
        "params": params, "batch": args.batch, "text_tokens_per_step": text_tokens,
        "vision_tokens_per_step": vision_tokens, "median_step_s": round(seconds, 4),
        "tokens_per_s": round(text_tokens / seconds, 1),
        "mfu": round(step_flops / seconds / device_peak_flops(), 4),
        "peak_flops": device_peak_flops(), "peak_memory_gb": round(peak_memory_bytes() / 1e9, 2),
        "final_loss": float(loss),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

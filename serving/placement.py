"""Where the served model lives: bf16 on the pod's GPUs when there are any, fp32 on the CPU otherwise.

    device_map, dtype = choose_placement(torch.cuda.is_available(), torch.cuda.device_count())
    model, processor = load_placed("/mnt/models")      # the KServe predictor and the Triton model

One GPU: the whole model on cuda:0. Several (the 72B endpoint asks for 4): device_map="auto", which lets
accelerate spread the layers over every visible GPU, one copy of the model in all, each GPU holding a
slice; its hooks move activations between them, so the engine feeds inputs to the first parameter's
device as before. No GPU: the CPU in fp32 (bf16 matmuls on most CPUs are far slower than fp32, and the
CPU pod's tests and answers stay as they were). GPUs without bf16 (pre-Ampere) get fp16.
"""

from __future__ import annotations

from typing import Any

import torch


def choose_placement(cuda_available: bool, gpu_count: int,
                     bf16_supported: bool = True) -> tuple[str | None, torch.dtype]:
    """(device_map for from_pretrained, dtype): None = plain CPU load, "cuda" = one GPU, "auto" = spread."""
    if not cuda_available or gpu_count < 1:
        return None, torch.float32
    dtype = torch.bfloat16 if bf16_supported else torch.float16
    return ("auto" if gpu_count > 1 else "cuda"), dtype


def detect_placement() -> tuple[str | None, torch.dtype]:
    """choose_placement for this process's visible devices."""
    available = torch.cuda.is_available()
    return choose_placement(available, torch.cuda.device_count() if available else 0,
                            bool(available and torch.cuda.is_bf16_supported()))


def load_placed(source: str, device_map: str | None = None, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, processor) of an HF folder (local or s3://), placed by `detect_placement` unless given."""
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    from onevision.storage import resolve_source

    if dtype is None:
        device_map, dtype = detect_placement()
    path = resolve_source(source)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:  # needs accelerate; the CPU path loads exactly as model.builder does
        kwargs["device_map"] = device_map
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, **kwargs)
    return model, LlavaOnevisionProcessor.from_pretrained(path)

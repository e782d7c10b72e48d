"""Work budgets per request, derived from the model, so one request cannot take the server's CPU or memory.

    budgets = model_budgets(model.config, context_length=8192)
    # {"max_text_bytes": 131072, "max_messages": 4096, "max_request_pixels": 16777216, "max_call_pixels": ...}

Each budget is checked before the expensive step it guards (serving.requests):
- text: UTF-8 bytes of all text parts, before tokenizing. A token covers a few bytes (English ~4, CJK ~3),
  so a prompt averaging more than BYTES_PER_TOKEN bytes per token is pathological; text over
  context x BYTES_PER_TOKEN cannot fit the context and is refused (413) without tokenizing it.
- messages: each renders to at least two template tokens (<|im_start|>, <|im_end|>), so more than
  context / 2 messages cannot fit either.
- pixels: from image headers, before decoding. AnyRes resizes every image to at most the largest grid
  pinpoint (multi-image requests use the base tile only), so pixels beyond PIXEL_HEADROOM x that area
  are decoded only to be thrown away. The floor keeps an ordinary photo (12 MP) acceptable for small
  models. One HTTP call carrying several bodies (v1 instances, v2 or Triton rows) gets CALL_FACTOR
  request budgets in all.
"""

from __future__ import annotations

from typing import Any

BYTES_PER_TOKEN = 16
PIXEL_HEADROOM = 4
MIN_REQUEST_PIXELS = 4096 * 4096
CALL_FACTOR = 4
DEFAULT_CONTEXT = 32768  # Qwen2's; used when no model is known (parse_chat_request with a bare Limits())


def text_bytes(context_length: int) -> int:
    return context_length * BYTES_PER_TOKEN


def request_pixels(model_config: Any | None) -> int:
    """PIXEL_HEADROOM x the largest image the model's AnyRes grid feeds it, at least MIN_REQUEST_PIXELS."""
    pinpoints = getattr(model_config, "image_grid_pinpoints", None) or []
    largest = max((int(h) * int(w) for h, w in pinpoints), default=0)
    tile = int(getattr(getattr(model_config, "vision_config", None), "image_size", 0) or 0)
    return max(MIN_REQUEST_PIXELS, PIXEL_HEADROOM * max(largest, tile * tile))


def model_budgets(model_config: Any | None, context_length: int) -> dict[str, int]:
    """The Limits fields that serving.requests leaves to the model (None there), for this model."""
    pixels = request_pixels(model_config)
    return {"max_text_bytes": text_bytes(context_length), "max_messages": max(1, context_length // 2),
            "max_request_pixels": pixels, "max_call_pixels": CALL_FACTOR * pixels}


DEFAULTS = model_budgets(None, DEFAULT_CONTEXT)

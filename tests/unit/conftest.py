"""Fixtures for model tests: the tiny recipe's model and processor, and a folder of test images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from onevision.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


@pytest.fixture()
def tiny(tiny_recipe: Recipe):
    """A fresh tiny model + processor configured for Stage-2 OV (AnyRes + multi-image + video)."""
    from model.builder import build_tiny, configure_stage

    model, processor = build_tiny(tiny_recipe)
    configure_stage(model, processor, tiny_recipe.stages.stage2_ov, tiny_recipe.model.image_size)
    return model, processor


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of many sizes/aspect ratios and one short video."""
    import av
    import numpy as np

    root = tmp_path_factory.mktemp("media")
    for h, w in SIZES:
        image = Image.new("RGB", (w, h), (230, 230, 230))
        image.paste((200, 30, 30), (w // 4, h // 4, max(w // 4 + 1, 3 * w // 4), max(h // 4 + 1, 3 * h // 4)))
        image.save(root / f"{h}x{w}.png")
    container = av.open(str(root / "clip.mp4"), "w")
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for k in range(12):
        frame = np.full((48, 64, 3), 240, np.uint8)
        frame[10:30, 4 * k: 4 * k + 16] = (30, 30, 200)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return root


# (H, W): square, tall, wide, extreme both ways, sizes off the 56-px grid
SIZES = [(56, 56), (30, 1000), (1000, 30), (100, 200), (200, 100), (57, 300), (168, 168), (90, 60), (13, 17)]

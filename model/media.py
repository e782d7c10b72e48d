"""Decode images and videos from real-world files into what the processor takes.

    from model.media import load_image, load_video
    image = load_image("photo.jpg")               # RGB PIL image, EXIF-rotated, any source mode
    frames = load_video("clip.mp4", num_frames=32)  # (T, H, W, 3) uint8, uniformly sampled

Images: any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) becomes RGB; transparency is composited on white
(LLaVA data has transparent PNGs whose RGB under alpha 0 is often black noise); EXIF orientation is
applied; an animated GIF gives its first frame. Videos are decoded with PyAV and sampled uniformly to
exactly `num_frames` frames, so every video of a stage stacks into one tensor.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 64_000_000  # ~8000x8000: larger is a decompression bomb or a mistake, not training data
MAX_VIDEO_BYTES = 2 << 30


class MediaError(ValueError):
    """A media file is missing, unreadable or unsafe; the message names the file."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the actual range instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        return _to_rgb(Image.fromarray(np.asarray(image).astype(np.int32)))
    if image.mode == "P":
        image = image.convert("RGBA")  # palette transparency becomes alpha
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Bytes -> RGB image, validated (size cap, full decode)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"{name}: {image.width}x{image.height} exceeds {MAX_IMAGE_PIXELS} pixels")
            if getattr(image, "is_animated", False):
                image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
            image = ImageOps.exif_transpose(image) or image
            rgb = _to_rgb(image)
    except MediaError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise MediaError(f"{name}: not a decodable image ({type(err).__name__}: {err})") from None
    if min(rgb.size) < 1:
        raise MediaError(f"{name}: empty image {rgb.size}")
    return rgb


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise MediaError(f"{path}: cannot read image ({err.strerror or err})") from None
    return decode_image(data, str(path))


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread evenly over [0, total) (repeats frames of a video shorter than that)."""
    return np.linspace(0, total - 1, num_frames).round().astype(int)


def load_video(path: str | os.PathLike[str], num_frames: int, data: bytes | None = None) -> np.ndarray:
    """Decode and uniformly sample exactly `num_frames` RGB frames: (T, H, W, 3) uint8.

    With `data`, decode those bytes (a shard member) and use `path` only in messages.
    """
    import av

    if data is None:
        if not Path(path).is_file():
            raise MediaError(f"{path}: no such video file")
        if Path(path).stat().st_size > MAX_VIDEO_BYTES:
            raise MediaError(f"{path}: larger than {MAX_VIDEO_BYTES} bytes")
    elif len(data) > MAX_VIDEO_BYTES:
        raise MediaError(f"{path}: larger than {MAX_VIDEO_BYTES} bytes")
    try:
        with av.open(io.BytesIO(data) if data is not None else str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError) as err:
        raise MediaError(f"{path}: not a decodable video ({type(err).__name__}: {err})") from None
    if not frames:
        raise MediaError(f"{path}: video has no frames")
    return np.stack([frames[i] for i in uniform_indices(len(frames), num_frames)])

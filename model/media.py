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
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 64_000_000  # ~8000x8000: larger is a decompression bomb or a mistake, not training data
MAX_VIDEO_BYTES = 2 << 30


class MediaError(ValueError):
    """A media file is missing, unreadable or unsafe; the message names the file."""


class ImageBombError(MediaError):
    """An image whose header claims more than MAX_IMAGE_PIXELS: refused before any pixel is decoded."""


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # repr of a Python object, e.g. <_io.BytesIO ... at 0x7f..>


def describe_error(err: BaseException) -> str:
    """`Type: message` of a decoder's exception, without object reprs (their addresses differ per run)."""
    return f"{type(err).__name__}: {_ADDRESS.sub('the data', str(err))}"


_SIGNATURES = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF",
               b"MM\x00*": "TIFF"}


def not_an_image(data: bytes) -> str:
    """Why bytes that no image decoder recognises are not an image, from the bytes alone (deterministic)."""
    if not data:
        return "empty file"
    known = next((fmt for magic, fmt in _SIGNATURES.items() if data.startswith(magic)), None)
    if known is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        known = "WebP"
    if known:
        return f"not a decodable image: a {known} header, corrupt or truncated ({len(data)} bytes)"
    return f"not an image: starts with bytes {data[:4].hex()}"


def image_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """(width, height) from the header alone; ImageBombError over MAX_IMAGE_PIXELS, MediaError if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as header:  # parses the header only; no pixel is decoded
            width, height = header.size
    except Image.DecompressionBombError as err:  # PIL's own cap (2x its warning limit) fired first
        raise ImageBombError(f"{name}: {err}") from None
    except Image.UnidentifiedImageError:
        raise MediaError(f"{name}: {not_an_image(data)}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise MediaError(f"{name}: not a decodable image ({describe_error(err)})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageBombError(f"{name}: {width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels (from its header)")
    return width, height


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
    """Bytes -> RGB image, validated (size cap from the header before decoding, then a full decode)."""
    image_size(data, name)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if getattr(image, "is_animated", False):
                image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
            image = ImageOps.exif_transpose(image) or image
            rgb = _to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise MediaError(f"{name}: not a decodable image ({describe_error(err)})") from None
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
        raise MediaError(f"{path}: not a decodable video ({describe_error(err)})") from None
    if not frames:
        raise MediaError(f"{path}: video has no frames")
    return np.stack([frames[i] for i in uniform_indices(len(frames), num_frames)])

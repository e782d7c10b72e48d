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
MAX_VIDEO_DECODED_PIXELS = 1 << 34  # ~17 G pixels: 1080p x 8,000 frames (4.5 min at 30 fps) decoded to sample


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


def _video_frames(source: str | bytes) -> tuple[int, int, int]:
    """(frames, width, height) of the first video stream from its header, without decoding a frame;
    frames are counted by demuxing packets when the header does not say (GIF, some WebM)."""
    import av

    with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
        stream = container.streams.video[0]  # IndexError: no video stream
        width, height = stream.codec_context.width, stream.codec_context.height
        frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    return frames, width, height


def _decode_frames(source: str | bytes, wanted: np.ndarray, path: str, max_decoded_pixels: int
                   ) -> tuple[dict[int, np.ndarray], int]:
    """({index: frame} for the indices in `wanted`, frames decoded); stops after the last wanted one."""
    import av

    kept: dict[int, np.ndarray] = {}
    targets, decoded, pixels = set(wanted.tolist()), 0, 0
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
        for decoded, frame in enumerate(container.decode(video=0), start=1):
            pixels += frame.width * frame.height  # the header may lie: the budget holds for what is decoded
            if frame.width * frame.height > MAX_IMAGE_PIXELS or pixels > max_decoded_pixels:
                raise MediaError(f"{path}: decoding passed {max_decoded_pixels} pixels at frame {decoded}")
            if decoded - 1 in targets:
                kept[decoded - 1] = frame.to_ndarray(format="rgb24")
            if decoded > wanted[-1]:
                break
    return kept, decoded


def load_video(path: str | os.PathLike[str], num_frames: int, data: bytes | None = None,
               max_decoded_pixels: int = MAX_VIDEO_DECODED_PIXELS) -> np.ndarray:
    """Decode and uniformly sample exactly `num_frames` RGB frames: (T, H, W, 3) uint8.

    With `data`, decode those bytes (a shard member) and use `path` only in messages. The frame count
    and size come from the header first: frames over MAX_IMAGE_PIXELS, or more than `max_decoded_pixels`
    pixels to decode in all, are refused before decoding. Only the sampled frames are kept, so memory is
    `num_frames` frames however long the video.
    """
    import av

    if data is None:
        if not Path(path).is_file():
            raise MediaError(f"{path}: no such video file")
        if Path(path).stat().st_size > MAX_VIDEO_BYTES:
            raise MediaError(f"{path}: larger than {MAX_VIDEO_BYTES} bytes")
    elif len(data) > MAX_VIDEO_BYTES:
        raise MediaError(f"{path}: larger than {MAX_VIDEO_BYTES} bytes")
    source = data if data is not None else str(path)
    try:
        total, width, height = _video_frames(source)
        if width * height > MAX_IMAGE_PIXELS:
            raise MediaError(f"{path}: {width}x{height} frames exceed {MAX_IMAGE_PIXELS} pixels")
        if total * width * height > max_decoded_pixels:
            raise MediaError(f"{path}: {total} frames of {width}x{height} exceed {max_decoded_pixels} pixels "
                             "to decode")
        total = max(total, 1)  # a header that counts none: decode what is there
        kept, decoded = _decode_frames(source, uniform_indices(total, num_frames), str(path),
                                       max_decoded_pixels)
        if decoded and decoded < total:  # the header counted frames that are not there: sample what is
            total = decoded
            kept, decoded = _decode_frames(source, uniform_indices(total, num_frames), str(path), max_decoded_pixels)
    except (av.error.FFmpegError, ValueError, IndexError) as err:
        if isinstance(err, MediaError):
            raise
        raise MediaError(f"{path}: not a decodable video ({describe_error(err)})") from None
    if not kept:
        raise MediaError(f"{path}: video has no frames")
    return np.stack([kept[i] for i in uniform_indices(total, num_frames)])

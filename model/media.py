"""Decode images and videos from real-world files into what the processor takes.

    from model.media import load_image, load_video
    image = load_image("photo.jpg")               # RGB PIL image, EXIF-rotated, any source mode
    frames = load_video("clip.mp4", num_frames=32)  # (T, H, W, 3) uint8, uniformly sampled

Images: any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) becomes RGB; transparency is composited on white
(LLaVA data has transparent PNGs whose RGB under alpha 0 is often black noise); EXIF orientation is
applied; an animated GIF gives its first frame. Videos are decoded with PyAV and sampled uniformly to
exactly `num_frames` frames, so every video of a stage stacks into one tensor; only those frames are decoded
(a seek to the keyframe before each), so the work is about `num_frames` GOPs however long the clip.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 64_000_000  # ~8000x8000: larger is a decompression bomb or a mistake, not training data
MAX_VIDEO_BYTES = 2 << 30
# Pixels decoded to sample one video (frames actually decoded x their size; with seeking that is about
# num_frames GOPs, not the clip): ~17 G pixels = 1080p x 8,000 frames. Bounds the CPU a hostile file can cost.
MAX_VIDEO_DECODED_PIXELS = 1 << 34
MAX_VIDEO_FRAMES = 1 << 22  # packets indexed for seeking (~39 h at 30 fps); a longer stream is streamed instead


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


def _open_header(data: bytes, name: str) -> Image.Image:
    """The image with its header parsed and no pixel decoded; ImageBombError over MAX_IMAGE_PIXELS,
    MediaError if unreadable."""
    try:
        image = Image.open(io.BytesIO(data))  # in memory: nothing to leak
    except Image.DecompressionBombError as err:  # PIL's own cap (2x its warning limit) fired first
        raise ImageBombError(f"{name}: {err}") from None
    except Image.UnidentifiedImageError:
        raise MediaError(f"{name}: {not_an_image(data)}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise MediaError(f"{name}: not a decodable image ({describe_error(err)})") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageBombError(f"{name}: {width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels (from its header)")
    return image


def image_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """(width, height) from the header alone; ImageBombError over MAX_IMAGE_PIXELS, MediaError if unreadable."""
    with _open_header(data, name) as header:
        return header.size


ORIENTATION_TAG = 0x0112  # EXIF Orientation; 1 = upright


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
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() of an RGB image copies it


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Bytes -> RGB image, validated (size cap from the header before decoding, then a full decode)."""
    return decode_image_sized(data, name)[1]


def decode_image_sized(data: bytes, name: str = "<bytes>",
                       draft_side: int | None = None) -> tuple[tuple[int, int], Image.Image]:
    """((width, height) as stored, the RGB image): decode_image, with the stored size beside the pixels.

    `draft_side`: a JPEG is decoded at the smallest scale (1/2, 1/4, 1/8: libjpeg's DCT scaling) whose both
    sides are at least this; the whole entropy-coded stream is still read, so a truncated or corrupt file
    fails as in a full decode (tests/unit/test_media.py), at about half the cost. Other formats: full size.
    For checks that need only a small picture (curation's pHash)."""
    # no `with`: closing the image would free the pixels returned when no conversion copies them
    image = _open_header(data, name)
    size = image.size
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)  # animated GIF/WebP: the first frame
        if draft_side and image.format == "JPEG":
            image.draft("RGB", (draft_side, draft_side))
        image.load()
        if image.getexif().get(ORIENTATION_TAG, 1) != 1:  # exif_transpose copies even an upright image
            image = ImageOps.exif_transpose(image) or image
        rgb = _to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise MediaError(f"{name}: not a decodable image ({describe_error(err)})") from None
    if min(rgb.size) < 1:
        raise MediaError(f"{name}: empty image {rgb.size}")
    return size, rgb


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise MediaError(f"{path}: cannot read image ({err.strerror or err})") from None
    return decode_image(data, str(path))


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread evenly over [0, total) (repeats frames of a video shorter than that)."""
    return np.linspace(0, total - 1, num_frames).round().astype(int)


def _open(source: str | bytes):
    import av

    return av.open(io.BytesIO(source) if isinstance(source, bytes) else source)


@dataclass
class _Probe:
    """What the header and one demux pass (no decoding) say about the first video stream."""

    header_frames: int  # the header's frame count, 0 when it does not say (GIF, some WebM)
    packets: int  # frames in the stream, counted by demuxing
    width: int
    height: int
    pts: np.ndarray | None  # per packet in decode order; None when a frame cannot be addressed by time
    dts: np.ndarray | None  # per packet in decode order (its pts when it has none)
    keyframe: np.ndarray | None  # per packet in decode order

    @property
    def total(self) -> int:
        """Frames to sample from: the header's count, or what is there when the header counts more (or none)."""
        return min(self.header_frames, self.packets) if self.header_frames else self.packets


def _probe(source: str | bytes) -> _Probe:
    """Header, then the timestamps and keyframe flags of every packet (demuxed, not decoded: cheap)."""
    pts: list[int] = []
    dts: list[int] = []
    keyframe: list[bool] = []
    addressable, packets = True, 0
    with _open(source) as container:
        stream = container.streams.video[0]  # IndexError: no video stream
        width, height = stream.codec_context.width, stream.codec_context.height
        for packet in container.demux(stream):
            if not packet.size:
                continue  # the demuxer's end-of-stream packet
            packets += 1
            if not addressable:
                continue
            if packet.pts is None or packet.is_discard or packets > MAX_VIDEO_FRAMES:
                addressable = False  # the decoder may drop it, or there is no time to seek to: stream instead
                continue
            pts.append(packet.pts)
            dts.append(packet.pts if packet.dts is None else packet.dts)
            keyframe.append(packet.is_keyframe)
        header_frames = stream.frames
    index = np.asarray(pts, np.int64)
    if not addressable or not packets or len(np.unique(index)) != len(index):
        return _Probe(header_frames, packets, width, height, None, None, None)
    return _Probe(header_frames, packets, width, height, index, np.asarray(dts, np.int64), np.asarray(keyframe, bool))


@dataclass
class _Segment:
    """Seek to the keyframe at `key_pts` (demuxers that index by dts: `key_dts`), then decode forward to the last
    of `targets` ({pts: frame index})."""

    key_pts: int
    key_dts: int
    targets: dict[int, int]
    first: int  # decode-order position of the keyframe
    last: int  # decode-order position of the last target's packet


def _seek_plan(probe: _Probe, wanted: np.ndarray) -> tuple[list[_Segment], int] | None:
    """(segments, frames they decode) to reach the `wanted` frames by seeking, or None when streaming from the
    start decodes no more (one GOP, frames all near the start) or the stream cannot be addressed by time.

    Frame i in decode output order is the packet with the i-th smallest pts. Each wanted frame is decoded from
    the last keyframe before it (in decode order) whose pts is not after it: an open GOP's leading frames
    come from the keyframe before. Wanted frames whose keyframe is reached anyway share one segment."""
    if probe.pts is None or probe.dts is None or probe.keyframe is None or not probe.keyframe.any():
        return None
    order = np.argsort(probe.pts, kind="stable")  # presentation index -> decode-order position
    keys = np.flatnonzero(probe.keyframe)
    segments: list[_Segment] = []
    for index in np.unique(wanted):
        position = int(order[index])
        target_pts = int(probe.pts[position])
        candidates = keys[(keys <= position) & (probe.pts[keys] <= target_pts)]
        if not len(candidates):
            return None  # no keyframe to start from before it: only streaming from the start reaches it
        key = int(candidates[-1])
        if segments and key <= segments[-1].last:  # decoding the previous segment on reaches it
            segments[-1].targets[target_pts] = int(index)
            segments[-1].last = max(segments[-1].last, position)
        else:
            segments.append(_Segment(int(probe.pts[key]), int(probe.dts[key]), {target_pts: int(index)}, key, position))
    planned = sum(segment.last - segment.first + 1 for segment in segments)
    return (segments, planned) if planned < int(wanted.max()) + 1 else None


def _decode_seeking(source: str | bytes, segments: list[_Segment], path: str, max_decoded_pixels: int
                    ) -> tuple[dict[int, np.ndarray] | None, int]:
    """({index: frame}, pixels decoded) by seeking to each segment's keyframe and decoding forward; None for the
    frames when what is decoded does not match the index (a frame not where its timestamp says, a seek that
    lands after it): the caller then streams, and the frames are today's either way. The first frame after a seek
    must be the keyframe or before it; a seek by the keyframe's pts that lands after it (a demuxer that indexes
    by dts, e.g. AVI) is retried once by its dts."""
    kept: dict[int, np.ndarray] = {}
    pixels = decoded = 0
    with _open(source) as container:
        stream = container.streams.video[0]
        for segment in segments:
            for offset in dict.fromkeys((segment.key_pts, segment.key_dts)):
                container.seek(offset, stream=stream, backward=True, any_frame=False)
                targets, last, first = dict(segment.targets), max(segment.targets), True
                for frame in container.decode(stream):
                    if first and (frame.pts is None or frame.pts > segment.key_pts):
                        break  # landed after the keyframe (or on a frame without one): its frames may be wrong
                    first = False
                    decoded += 1
                    pixels += frame.width * frame.height
                    if frame.width * frame.height > MAX_IMAGE_PIXELS or pixels > max_decoded_pixels:
                        raise MediaError(f"{path}: decoding passed {max_decoded_pixels} pixels at frame {decoded}")
                    if frame.pts in targets:
                        kept[targets.pop(frame.pts)] = frame.to_ndarray(format="rgb24")
                    if not targets or frame.pts is None or frame.pts > last:
                        break
                if not targets:
                    break
            if targets:
                return None, pixels
    return kept, pixels


def _decode_frames(source: str | bytes, wanted: np.ndarray, path: str, max_decoded_pixels: int, spent: int = 0
                   ) -> tuple[dict[int, np.ndarray], int]:
    """({index: frame} for the indices in `wanted`, frames decoded), streaming from the first frame; stops after
    the last wanted one. `spent`: pixels already decoded for this video (counted in the budget)."""
    kept: dict[int, np.ndarray] = {}
    targets, decoded, pixels = set(wanted.tolist()), 0, spent
    with _open(source) as container:
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

    With `data`, decode those bytes (a shard member) and use `path` only in messages. One demux pass (no
    decoding) reads every packet's timestamp and keyframe flag; each sampled frame is then decoded by seeking
    to the keyframe before it and decoding forward, so the work is about `num_frames` GOPs however long the
    video. A container that cannot be addressed by time (no timestamps, duplicates, discarded packets, or
    decoded frames that do not match them) is streamed from the start instead, keeping only the sampled
    frames; the frames are the same either way. Frames over MAX_IMAGE_PIXELS, or a plan that would decode
    more than `max_decoded_pixels` pixels, are refused before decoding, and the budget also holds for what is
    actually decoded. Memory is `num_frames` frames plus the decoder's, however long the video.
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
        probe = _probe(source)
        width, height = probe.width, probe.height
        if width * height > MAX_IMAGE_PIXELS:
            raise MediaError(f"{path}: {width}x{height} frames exceed {MAX_IMAGE_PIXELS} pixels")
        total = max(probe.total, 1)  # a stream that counts none: decode what is there
        wanted = uniform_indices(total, num_frames)
        plan = _seek_plan(probe, wanted)
        planned = plan[1] if plan else int(wanted[-1]) + 1
        if planned * width * height > max_decoded_pixels:
            raise MediaError(f"{path}: {planned} frames of {width}x{height} exceed {max_decoded_pixels} pixels "
                             "to decode")
        kept, spent = _decode_seeking(source, plan[0], str(path), max_decoded_pixels) if plan else (None, 0)
        if kept is None:
            kept, decoded = _decode_frames(source, wanted, str(path), max_decoded_pixels, spent)
            if decoded and decoded < total:  # fewer frames than counted: sample what is there
                total = decoded
                kept, decoded = _decode_frames(source, uniform_indices(total, num_frames), str(path),
                                               max_decoded_pixels, spent)
    except (av.error.FFmpegError, ValueError, IndexError) as err:
        if isinstance(err, MediaError):
            raise
        raise MediaError(f"{path}: not a decodable video ({describe_error(err)})") from None
    if not kept:
        raise MediaError(f"{path}: video has no frames")
    return _stack(kept, uniform_indices(total, num_frames), str(path))


def _stack(kept: dict[int, np.ndarray], order: np.ndarray, path: str) -> np.ndarray:
    """kept[order] as one array, each frame dropped once copied: the peak is the output plus one frame, not 2x."""
    shape = kept[int(order[0])].shape
    out = np.empty((len(order), *shape), np.uint8)  # pages are committed as frames are copied in
    last_use = {int(index): k for k, index in enumerate(order)}
    for k, index in enumerate(order.tolist()):
        if kept[index].shape != shape:
            raise MediaError(f"{path}: frames change size ({shape[1]}x{shape[0]}, then "
                             f"{kept[index].shape[1]}x{kept[index].shape[0]})")
        out[k] = kept[index]
        if last_use[index] == k:
            del kept[index]
    return out

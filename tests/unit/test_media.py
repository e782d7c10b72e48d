"""Real-world image files: every PIL mode, EXIF orientation, animated GIFs, bombs and garbage."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from model import media


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
                                      ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB", "WEBP"), ("1", "BMP")])
def test_every_mode_becomes_rgb(mode: str, fmt: str) -> None:
    image = Image.new("RGB", (40, 30), (200, 40, 40)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50)
    out = media.decode_image(_encode(image, fmt), f"x.{fmt.lower()}")
    assert out.mode == "RGB" and out.size == (40, 30)


def test_16_bit_grey_keeps_its_range() -> None:
    ramp = Image.fromarray((np.arange(256, dtype=np.uint16) * 256).reshape(16, 16))
    out = np.asarray(media.decode_image(_encode(ramp, "PNG")))
    assert out.min() == 0 and out.max() == 255  # scaled, not clipped to white


def test_transparency_composited_on_white() -> None:
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    image.putpixel((5, 5), (255, 0, 0, 255))
    out = media.decode_image(_encode(image, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((5, 5)) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (60, 20), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = media.decode_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 60)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = media.decode_image(buffer.getvalue(), "anim.gif")
    r, g, b = out.getpixel((8, 8))
    assert r > 200 and b < 50


def test_garbage_and_bombs_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # the reason comes from the bytes, never from a repr (PIL's names `<_io.BytesIO object at 0x...>`)
    with pytest.raises(media.MediaError, match=r"^bad.png: not an image: starts with bytes 6e6f7420$"):
        media.decode_image(b"not an image at all", "bad.png")
    with pytest.raises(media.MediaError, match=r"^empty.jpg: empty file$"):
        media.decode_image(b"", "empty.jpg")
    with pytest.raises(media.MediaError, match=r"^head.png: not a decodable image: a PNG header, corrupt or "
                                               r"truncated \(12 bytes\)$"):
        media.decode_image(b"\x89PNG\r\n\x1a\n\0\0\0\0", "head.png")
    truncated = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:60]
    with pytest.raises(media.MediaError, match="cut.png"):
        media.decode_image(truncated, "cut.png")
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(media.ImageBombError, match="11x10 exceeds 100 pixels"):
        media.decode_image(_encode(Image.new("RGB", (11, 10)), "PNG"), "big.png")
    assert media.image_size(_encode(Image.new("RGB", (10, 10)), "PNG")) == (10, 10)


def test_a_draft_decode_is_small_and_still_refuses_a_broken_jpeg() -> None:
    """draft_side: a JPEG decodes at the smallest DCT scale that keeps both sides >= it (768x512 -> 96x64),
    close to the full decode shrunk; a truncated or corrupted one fails as in the full decode; a PNG comes
    at full size."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((768, 512), Image.BICUBIC)
    data = _encode(photo, "JPEG", quality=90)
    stored, small = media.decode_image_sized(data, "p.jpg", draft_side=64)
    assert stored == (768, 512) and small.size == (96, 64) and small.mode == "RGB"
    shrunk = media.decode_image(data, "p.jpg").reduce(8)
    assert np.abs(np.asarray(small, np.int16) - np.asarray(shrunk, np.int16)).mean() < 4
    assert media.decode_image_sized(data, "p.jpg", draft_side=400)[1].size == (768, 512)  # 1/2: under 400
    for broken in (data[: len(data) * 2 // 3], data[:600] + bytes(len(data) - 600)):  # cut; zeroed after 600 B
        with pytest.raises(media.MediaError, match="p.jpg"):
            media.decode_image(broken, "p.jpg")
        with pytest.raises(media.MediaError, match="p.jpg"):
            media.decode_image_sized(broken, "p.jpg", draft_side=64)
    png = _encode(photo, "PNG")
    assert media.decode_image_sized(png, "p.png", draft_side=64)[1].size == (768, 512)


def test_video_uniform_sampling(media_dir) -> None:
    frames = media.load_video(media_dir / "clip.mp4", num_frames=4)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    assert list(media.uniform_indices(12, 4)) == [0, 4, 7, 11]
    assert list(media.uniform_indices(2, 4)) == [0, 0, 1, 1]  # short videos repeat frames to stack
    with pytest.raises(media.MediaError, match="not a decodable video"):
        media.load_video("x.mp4", 4, data=b"\x00" * 100)


def _long_video(path, frames: int, size: tuple[int, int] = (320, 240), gop: int = 12) -> None:
    import av

    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=30, options={"sc_threshold": "1000000000"})  # keyframes every `gop`
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
    stream.codec_context.gop_size = gop
    for k in range(frames):
        frame = np.full((size[1], size[0], 3), k % 250, np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def test_a_long_video_keeps_only_its_sampled_frames_and_a_huge_one_is_refused_before_decoding(tmp_path) -> None:
    import tracemalloc

    _long_video(tmp_path / "long.mp4", 600)  # 600 decoded frames would be 138 MB of RGB
    tracemalloc.start()
    frames = media.load_video(tmp_path / "long.mp4", num_frames=8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert frames.shape == (8, 240, 320, 3) and peak < 20 << 20, peak  # 8 frames (1.8 MB) and decoder buffers
    greys = [k % 250 for k in media.uniform_indices(600, 8)]  # each frame's grey level is its index mod 250
    assert all(abs(int(f[0, 0, 0]) - g) <= 3 for f, g in zip(frames, greys)), [int(f[0, 0, 0]) for f in frames]

    # The budget is on what would be decoded: frames 0, 86, ..., 599 sit 0, 2, 3, 5, 6, 8, 9, 11 frames into
    # their GOPs of 12, so 8 seeks decode 52 frames, not the clip's 600 ...
    with pytest.raises(media.MediaError, match=r"long.mp4: 52 frames of 320x240 exceed 1000000 pixels to decode"):
        media.load_video(tmp_path / "long.mp4", num_frames=8, max_decoded_pixels=1_000_000)
    # ... while a clip that is one GOP (nothing to seek to) would be decoded whole, and is refused as such.
    _long_video(tmp_path / "one_gop.mp4", 600, gop=600)
    with pytest.raises(media.MediaError, match=r"one_gop.mp4: 600 frames of 320x240 exceed 5000000 pixels"):
        media.load_video(tmp_path / "one_gop.mp4", num_frames=8, max_decoded_pixels=5_000_000)


def test_an_animated_gif_is_sampled_like_a_video(tmp_path) -> None:
    colours = [(40 * k, 0, 0) for k in range(6)]
    frames = [Image.new("RGB", (16, 12), c) for c in colours]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = media.load_video(tmp_path / "a.gif", num_frames=3)  # GIF headers carry no frame count: demuxed
    assert out.shape == (3, 12, 16, 3)
    assert [int(f[6, 8, 0]) for f in out] == [colours[i][0] for i in media.uniform_indices(6, 3)]


def _encode_video(fmt: str, codec: str, frames: int = 60, gop: int = 6, b_frames: int = 2,
                  size: tuple[int, int] = (64, 48)) -> bytes:
    """A clip with B-frames and several GOPs; every frame differs (grey level, a moving block, a noisy band)."""
    import av

    buffer = io.BytesIO()
    container = av.open(buffer, "w", format=fmt)
    stream = container.add_stream(codec, rate=8)
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
    stream.codec_context.gop_size, stream.codec_context.max_b_frames = gop, b_frames
    rng = np.random.default_rng(0)
    for k in range(frames):
        frame = np.full((size[1], size[0], 3), 7 * k % 250, np.uint8)
        frame[5:20, 3 * k % (size[0] - 8):][:, :8] = (200, 30, 30)
        frame[30:40] = rng.integers(0, 255, (10, size[0], 3), dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return buffer.getvalue()


def _sampled_from_all_frames(data: bytes, num_frames: int) -> np.ndarray:
    """What load_video gave before seeking: every frame decoded in order, sampled over the header's count (or
    over the frames there are, when the header counts more or none)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        header = container.streams.video[0].frames
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    total = min(header, len(frames)) if header else len(frames)
    return np.stack([frames[i] for i in media.uniform_indices(total, num_frames)])


@pytest.fixture
def seeks(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per load_video call that planned seeks, whether the seek path gave the frames."""
    used: list[bool] = []
    decode_seeking = media._decode_seeking

    def spy(*args, **kwargs):
        kept, pixels = decode_seeking(*args, **kwargs)
        used.append(kept is not None)
        return kept, pixels

    monkeypatch.setattr(media, "_decode_seeking", spy)
    return used


def _patch_avi_frame_count(data: bytes, frames: int) -> bytes:
    """An AVI whose header (avih dwTotalFrames, strh dwLength) claims `frames`."""
    import struct

    patched = bytearray(data)
    struct.pack_into("<I", patched, patched.index(b"avih") + 24, frames)
    struct.pack_into("<I", patched, patched.index(b"strh") + 40, frames)
    return bytes(patched)


@pytest.mark.parametrize("fmt,codec", [("mp4", "mpeg4"), ("mp4", "libx264"), ("matroska", "libx264"),
                                       ("avi", "mpeg4"), ("mpegts", "mpeg2video")])
def test_seeking_gives_the_frames_of_decoding_everything(fmt: str, codec: str, seeks: list[bool]) -> None:
    import av

    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this PyAV build")
    data = _encode_video(fmt, codec)  # 60 frames, keyframes every 6 or sooner, 2 B-frames
    for num_frames in (1, 5, 16, 32, 80):
        seeks.clear()
        frames = media.load_video(f"clip.{fmt}", num_frames, data=data)
        assert np.array_equal(frames, _sampled_from_all_frames(data, num_frames)), (fmt, codec, num_frames)
        # 1 frame (the first) or more frames than the clip has: streaming decodes no more, so it streams
        assert seeks == ([] if num_frames in (1, 80) else [True]), (num_frames, seeks)


@pytest.mark.parametrize("claimed", [40, 90])
def test_a_header_that_miscounts_frames_is_sampled_as_before(claimed: int, seeks: list[bool]) -> None:
    data = _patch_avi_frame_count(_encode_video("avi", "mpeg4"), claimed)  # 60 frames there
    for num_frames in (5, 16):
        seeks.clear()
        frames = media.load_video("lies.avi", num_frames, data=data)
        assert np.array_equal(frames, _sampled_from_all_frames(data, num_frames)), (claimed, num_frames)
        assert seeks == [True]


def test_a_stream_without_timestamps_or_a_seek_that_lands_wrong_is_streamed(monkeypatch, seeks) -> None:
    raw = _encode_video("h264", "libx264")  # an elementary stream: no container timestamps to seek by
    assert np.array_equal(media.load_video("raw.h264", 5, data=raw), _sampled_from_all_frames(raw, 5))
    assert seeks == []

    data = _encode_video("mp4", "libx264")
    plan = media._seek_plan

    def one_keyframe_late(probe, wanted):  # as if the demuxer's index pointed one keyframe too far
        segments, planned = plan(probe, wanted)
        keys = sorted({int(p) for p, k in zip(probe.pts, probe.keyframe) if k})
        for segment in segments:
            later = next((p for p in keys if p > segment.key_pts), segment.key_pts)
            segment.key_pts = segment.key_dts = later
        return segments, planned

    monkeypatch.setattr(media, "_seek_plan", one_keyframe_late)
    assert np.array_equal(media.load_video("clip.mp4", 5, data=data), _sampled_from_all_frames(data, 5))
    assert seeks == [False]  # the frames after the seek did not match the index: streamed instead


_PEAK_RSS = """
import json, resource, sys, time
import av, numpy as np
from model import media
if sys.argv[2] == "stream":
    media._seek_plan = lambda probe, wanted: None
def peak_rss():  # VmHWM: ru_maxrss keeps the parent's peak across fork+exec (here: pytest's, after generating)
    try:
        status = open("/proc/self/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak_rss()
start = time.perf_counter()
frames = media.load_video(sys.argv[1], 32)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_before": before, "rss_increase": peak_rss() - before,
                  "shape": frames.shape,
                  "greys": [int(frame[360, 20, 0]) for frame in frames]}))
"""


def test_a_3_minute_720p_clip_decodes_within_about_num_frames_frames_of_memory(tmp_path) -> None:
    import json
    import subprocess
    import sys
    import time

    import av

    seconds, fps = 180, 5
    start = time.perf_counter()
    path = tmp_path / "long720.mp4"
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps, options={"sc_threshold": "1000000000", "motion_est": "zero"})
    stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
    stream.codec_context.gop_size, stream.bit_rate = 2 * fps, 20_000_000  # a keyframe every 2 s; grey levels kept
    planes = np.full((720 * 3 // 2, 1280), 128, np.uint8)  # yuv420p: Y, then U and V at 128 (grey)
    for k in range(seconds * fps):
        planes[:720] = 7 * k % 250  # each frame's grey level tells its index
        planes[100:200, 4 * k % 1200:][:, :80] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    generated = time.perf_counter() - start

    def measure(mode: str) -> dict:
        done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path), mode], capture_output=True, text=True,
                              check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(done.stdout.strip().splitlines()[-1])

    seek = measure("seek")
    output = 32 * 720 * 1280 * 3  # 88 MB: the frames returned
    whole = seconds * fps * 720 * 1280 * 3  # 2.5 GB decoded (15 GB at 30 fps)
    print(f"3-min 720p clip ({path.stat().st_size >> 20} MB, generated in {generated:.1f} s): 32 frames by seeking "
          f"in {seek['seconds']:.2f} s, peak RSS +{seek['rss_increase'] >> 20} MB (output {output >> 20} MB)")
    assert seek["shape"] == [32, 720, 1280, 3]
    luma = [7 * int(i) % 250 for i in media.uniform_indices(seconds * fps, 32)]
    expected = [min(255, max(0, round(1.164 * (y - 16)))) for y in luma]  # limited-range Y -> RGB
    assert all(abs(g - e) <= 4 for g, e in zip(seek["greys"], expected)), (seek["greys"], expected)
    assert seek["rss_increase"] < output + (64 << 20), seek  # the output, one frame and the decoder's buffers
    assert seek["rss_increase"] < whole / 10
    if os.environ.get("MEDIA_COMPARE_STREAMING"):  # the streaming path, for the README's figures
        stream_run = measure("stream")
        print(f"streaming: {stream_run['seconds']:.2f} s, peak RSS +{stream_run['rss_increase'] >> 20} MB "
              f"(before: {stream_run['rss_before'] >> 20} MB, seek's {seek['rss_before'] >> 20} MB)")

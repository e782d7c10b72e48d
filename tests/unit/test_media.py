"""Real-world image files: every PIL mode, EXIF orientation, animated GIFs, bombs and garbage."""

from __future__ import annotations

import io

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

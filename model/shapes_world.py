"""A deterministic synthetic "shapes world" in LLaVA data format, for the tiny CPU recipe.

    python -m model.shapes_world --out /tmp/world --seed 0
    python -m model.shapes_world --out /tmp/world --seed 0 --n-per-kind 200 --n-eval 64

Coloured shapes (6 colours, 5 shapes, 1-4 of a kind, 5 positions, sometimes a rendered word) on a
plain light background, at sizes from 56 to 224 px so that AnyRes tiling is exercised. Each kind is
one JSON list in the LLaVA-NeXT / LLaVA-OneVision-Data format (`image` / `video` paths relative to
the output dir, `conversations` human/gpt, `<image>` / `<video>` placeholders), plus a `meta` dict
for evaluation: `task`, `answer`, `chance`, and for multiple choice `choices` and `answer_text`.
Recipes name a kind as `synthetic://shapes/<kind>`. Same seed -> byte-identical JSON and PNG, and MP4s that decode to identical frames.

`synthetic://shapes/ov_mix?n=N&tile=T` is a separate world whose lengths follow LLaVA-OneVision's mix
(text-only, single images on 1x1..3x3 AnyRes grids, 2-6 images, 8-32-frame videos; OV_MIX_CARD says how it
scales to a recipe's tile of T px, written next to it as README.md and in world.json).

Videos are H.264 MP4 (libx264, yuv420p) written with PyAV; where that encoder is missing it falls
back to MPEG-4 part 2, then to an animated GIF (PyAV decodes all three). `world.json` records which.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

VERSION = 1
KINDS: tuple[str, ...] = ("captions", "descriptions", "vqa_color", "vqa", "multi_image", "video")
EVAL_KINDS: tuple[str, ...] = (
    "eval_color", "eval_shape", "eval_count", "eval_position",
    "eval_mc", "eval_ocr", "eval_multi_image", "eval_video",
)
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
COUNTS: tuple[int, ...] = (1, 2, 3, 4)
# Three- and four-letter words: the bitmap font is 6 px a glyph, so they fit 2x-scaled in 56 px.
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "car", "hat", "cup", "pen", "map",
                          "fox", "owl", "bee", "egg", "key", "bus", "box", "fish")
LETTERS = "ABCDEF"

# Saturated and far apart (>= 70 in some channel even after jitter), none close to the light grey.
RGB = {"red": (215, 35, 35), "green": (40, 160, 60), "blue": (35, 75, 215),
       "yellow": (235, 200, 20), "purple": (135, 55, 175), "orange": (245, 130, 20)}
TEXT_RGB = (25, 25, 25)
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
          "star": "stars"}
NUMBER = {1: "a", 2: "two", 3: "three", 4: "four"}
POSITION_XY = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
               "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom", "center": "in the center"}

SHORT_SUFFIX = "Answer the question using a single word or phrase."  # LLaVA-1.5 short-answer prompt
# LLaVA-1.5 / lmms-eval multiple-choice prompt
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
IMAGE_NUMBER_SUFFIX = "Answer with the image number."
CAPTION_PROMPTS = ("", "Give a short caption of the image.", "Describe the image briefly.")
DESCRIBE_PROMPT = "Describe the image in detail."
Q_OCR = "What word is written in the image?"
Q_SHAPE = "What shape is shown in the image?"
Q_COUNT = "How many shapes are in the image?"
Q_POSITION = "Where is the shape in the image?"
Q_SAME_COLOR = "Are the shapes in the two images the same color?"
Q_VIDEO_COLOR = "What color is the moving shape?"
Q_VIDEO_DIRECTION = "In which direction is the shape moving?"
VIDEO_FPS = 8
VIDEO_CODECS: tuple[str, ...] = ("libx264", "mpeg4")  # tried in order; GIF when none encodes

TASKS = {
    "captions": ("caption",), "descriptions": ("description", "description", "ocr"),
    "vqa_color": ("color",), "vqa": ("color", "shape", "count", "position", "mc_color", "mc_shape"),
    "multi_image": ("mi_which_color", "mi_same_color", "mi_color_of"),
    "video": ("video_color", "video_direction"),
    "eval_color": ("color",), "eval_shape": ("shape",), "eval_count": ("count",),
    "eval_position": ("position",), "eval_mc": ("mc_color", "mc_shape"), "eval_ocr": ("ocr",),
    "eval_multi_image": ("mi_which_color", "mi_same_color", "mi_color_of"),
    "eval_video": ("video_color", "video_direction"),
}


def q_color(count: int) -> str:
    return "What color is the shape?" if count == 1 else "What color are the shapes?"


def noun_phrase(color: str, shape: str, count: int) -> str:
    return f"{NUMBER[count]} {color} {shape if count == 1 else PLURAL[shape]}"


def caption_text(color: str, shape: str, count: int, word: str | None) -> str:
    tail = f' and the word "{word}"' if word else ""
    return f"{noun_phrase(color, shape, count)}{tail}."


def description_text(color: str, shape: str, count: int, position: str | None,
                     word: str | None, word_at: str | None) -> str:
    np_ = noun_phrase(color, shape, count)
    if word:
        # The word sits in a band; the shape is on the other side of it.
        side = "below" if word_at == "top" else "above"
        return f'A plain light background with {np_} {side} the word "{word}", written in black.'
    where = f" {POSITION_PHRASE[position]}" if position else ""
    return f"A plain light background with {np_}{where}."


def options_block(choices: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    color: str
    rgb: tuple[int, int, int]
    shape: str
    count: int
    radius: int
    centers: list[tuple[int, int]] = field(default_factory=list)
    position: str | None = None
    word: str | None = None
    word_at: str | None = None

    def meta(self) -> dict:
        return {"size": [self.width, self.height], "color": self.color, "shape": self.shape,
                "count": self.count, "position": self.position, "word": self.word,
                "centers": [list(c) for c in self.centers], "radius": self.radius}


def _pick(rng: random.Random, values, slot: int | None):
    # Eval splits pass a slot so that answers cycle through every value (balanced);
    # training samples draw freely.
    return values[slot % len(values)] if slot is not None else rng.choice(values)


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore


def _clamp(v: float, lo: float, hi: float) -> int:
    return round(max(lo, min(hi, v)))


def sample_scene(rng: random.Random, *, color: str | None = None, shape: str | None = None,
                 count: int | None = None, position: str | None = None,
                 word: str | None = None, size: tuple[int, int] | None = None) -> Scene:
    """One image's content. `count` 1 gets a position; a `word` forces count 1 and a text band;
    `size` (w, h) fixes the canvas (the OneVision mix sizes images to a chosen AnyRes grid)."""
    color = color or rng.choice(COLORS)
    shape = shape or rng.choice(SHAPES)
    if word:
        count = 1
    elif count is None:
        count = 1 if rng.random() < 0.5 else rng.choice(COUNTS[1:])
    if word:
        # Tall enough for a 2x-scaled text band plus a visible shape.
        h = rng.randint(84, 224)
        w = rng.randint(56, min(224, int(h * 1.25)))
    elif count == 1 or rng.random() < 0.8:
        # Aspect <= 2 where position is asked, so "left" and "center" are apart in any image.
        while True:
            w, h = rng.randint(56, 224), rng.randint(56, 224)
            if max(w, h) <= 2 * min(w, h):
                break
    else:
        w, h = rng.choice(((56, 224), (224, 56), (56, 168), (168, 56)))  # extreme AnyRes grids
    if size is not None:
        w, h = size
    bg = _jitter(rng, (rng.randint(228, 248),) * 3, 5)  # type: ignore[arg-type]
    scene = Scene(w, h, bg, color, _jitter(rng, RGB[color], 10), shape, count, 0)
    if word:
        scene.word, scene.word_at = word, rng.choice(("top", "bottom"))
        band = 0.55 * h  # the shape's band; the word gets the other 45 %
        cy = h - band / 2 if scene.word_at == "top" else band / 2
        scene.radius = int(rng.uniform(0.3, 0.38) * min(w, band))
        scene.centers = [(int(w / 2), int(cy))]
    elif count == 1:
        scene.position = position or rng.choice(POSITIONS)
        m = min(w, h)
        scene.radius = r = int(rng.uniform(0.2, 0.36 if scene.position == "center" else 0.24) * m)
        fx, fy = POSITION_XY[scene.position]
        cx = _clamp(fx * w + rng.uniform(-0.03, 0.03) * w, r + 2, w - r - 3)
        cy = _clamp(fy * h + rng.uniform(-0.03, 0.03) * h, r + 2, h - r - 3)
        scene.centers = [(cx, cy)]
    else:
        cols, rows = (4, 1) if w >= 1.8 * h else (1, 4) if h >= 1.8 * w else (2, 2)
        cw, ch = w / cols, h / rows
        scene.radius = r = int(rng.uniform(0.32, 0.4) * min(cw, ch))
        slack = min(cw, ch) / 2 - r - 2
        for cell in sorted(rng.sample(range(4), count)):
            x0, y0 = (cell % cols) * cw, (cell // cols) * ch
            scene.centers.append((int(x0 + cw / 2 + rng.uniform(-slack, slack)),
                                  int(y0 + ch / 2 + rng.uniform(-slack, slack))))
    return scene


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               fill: tuple[int, int, int]) -> None:
    """Filled, axis-aligned, no anti-aliasing: pixels are the exact colour. The centre is inside."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = 0.85 * r  # about the circle's area, so size does not give the shape away
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.radians([-90, 30, 150])]
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        a = 0.34 * r
        draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
        draw.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
    elif shape == "star":
        angles = np.radians(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)],
                     fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@functools.cache
def _word_mask(word: str) -> Image.Image:
    # PIL's built-in bitmap font is identical on every machine (FreeType rendering is not).
    font = ImageFont.load_default_imagefont()
    im = Image.new("L", (8 * len(word) + 8, 16), 0)
    ImageDraw.Draw(im).text((2, 2), word, fill=255, font=font)
    return im.crop(im.getbbox())


def render(scene: Scene) -> Image.Image:
    im = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(im)
    for cx, cy in scene.centers:
        draw_shape(draw, scene.shape, cx, cy, scene.radius, scene.rgb)
    if scene.word:
        mask = _word_mask(scene.word)
        band_h = 0.45 * scene.height
        k = max(1, min(int(0.85 * scene.width / mask.width), int(0.8 * band_h / mask.height)))
        mask = mask.resize((mask.width * k, mask.height * k), Image.NEAREST)
        y0 = (band_h - mask.height) / 2
        if scene.word_at == "bottom":
            y0 += scene.height - band_h
        im.paste(TEXT_RGB, (int((scene.width - mask.width) / 2), int(y0)), mask)
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _encode(codec: str, frames: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    if codec == "gif":
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:],
                    duration=1000 // VIDEO_FPS, loop=0)
        return buf.getvalue()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format="mp4", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            # near-lossless colours, fast. x264's bitstream still varies between runs in one process;
            # the decoded frames do not, and those are what determinism means here.
            stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


@functools.cache
def video_codec() -> str:
    """The first of VIDEO_CODECS that encodes here and decodes back; "gif" if none does."""
    probe = [np.full((16, 16, 3), v, np.uint8) for v in (0, 255)]
    for codec in VIDEO_CODECS:
        try:
            with av.open(io.BytesIO(_encode(codec, probe))) as c:
                if sum(1 for _ in c.decode(video=0)) == 2:
                    return codec
        except Exception:  # noqa: BLE001, S112 - any failure means "not usable in this build"
            continue
    return "gif"


def video_frames(rng: random.Random, color: str, direction: str, n: int | None = None,
                 side: int | None = None) -> tuple[list[np.ndarray], dict]:
    """One shape crossing the frame; even sizes because yuv420p needs them. `n` frames, `side` px square."""
    w, h = 2 * rng.randint(28, 56), 2 * rng.randint(28, 56)
    n = n or rng.choice((8, 12, 16))
    if side is not None:
        w = h = 2 * (side // 2)
    shape = rng.choice(SHAPES)
    r = int(rng.uniform(0.2, 0.26) * min(w, h))
    bg = _jitter(rng, (rng.randint(228, 248),) * 3, 5)  # type: ignore[arg-type]
    rgb = _jitter(rng, RGB[color], 10)
    lo_x, hi_x, lo_y, hi_y = r + 2, w - r - 3, r + 2, h - r - 3
    fixed_x, fixed_y = rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)
    path = {"right": ((lo_x, fixed_y), (hi_x, fixed_y)), "left": ((hi_x, fixed_y), (lo_x, fixed_y)),
            "down": ((fixed_x, lo_y), (fixed_x, hi_y)), "up": ((fixed_x, hi_y), (fixed_x, lo_y))}
    (x0, y0), (x1, y1) = path[direction]
    frames = []
    for t in range(n):
        im = Image.new("RGB", (w, h), bg)
        u = t / (n - 1)
        draw_shape(ImageDraw.Draw(im), shape, round(x0 + u * (x1 - x0)), round(y0 + u * (y1 - y0)),
                   r, rgb)
        frames.append(np.asarray(im))
    meta = {"size": [w, h], "color": color, "shape": shape, "direction": direction,
            "num_frames": n, "fps": VIDEO_FPS, "codec": video_codec()}
    return frames, meta


def _mc(rng: random.Random, values: tuple[str, ...], answer: str, slot: int | None,
        n_options: int = 4) -> tuple[list[str], str]:
    others = rng.sample([v for v in values if v != answer], n_options - 1)
    at = slot % n_options if slot is not None else rng.randrange(n_options)
    return others[:at] + [answer] + others[at:], LETTERS[at]


def make_sample(rng: random.Random, task: str, slot: int | None = None
                ) -> tuple[str, list[bytes], str, dict]:
    """(human text, media files' bytes, gpt text, meta) for one sample of `task`."""
    meta: dict = {"task": task}
    short = f"\n{SHORT_SUFFIX}"
    if task.startswith("mi_"):
        n = 2 if task == "mi_same_color" else rng.choice((2, 3))
        target = rng.randrange(n)
        if task == "mi_same_color":
            same = (slot % 2 == 0) if slot is not None else rng.random() < 0.5
            a = _pick(rng, COLORS, None if slot is None else slot // 2)
            colors = [a, a if same else rng.choice([c for c in COLORS if c != a])]
            q, answer, chance = Q_SAME_COLOR + short, "yes" if same else "no", 0.5
        elif task == "mi_which_color":
            c = _pick(rng, COLORS, slot)
            others = [x for x in COLORS if x != c]
            colors = [c if j == target else rng.choice(others) for j in range(n)]
            q = f"Which image shows a {c} shape?\n{IMAGE_NUMBER_SUFFIX}"
            answer, chance = str(target + 1), 1 / n
        else:
            colors = [rng.choice(COLORS) for _ in range(n)]
            colors[target] = _pick(rng, COLORS, slot)
            q = f"What color is the shape in image {target + 1}?{short}"
            answer, chance = colors[target], 1 / len(COLORS)
        scenes = [sample_scene(rng, color=c, count=1) for c in colors]
        human = "".join(f"Image {j + 1}: <image>\n" for j in range(n)) + q
        meta.update(answer=answer, chance=chance, scenes=[s.meta() for s in scenes])
        return human, [png_bytes(render(s)) for s in scenes], answer, meta
    if task.startswith("video_"):
        color, direction = _pick(rng, COLORS, slot), _pick(rng, DIRECTIONS, slot)
        frames, vmeta = video_frames(rng, color, direction)
        if task == "video_color":
            q, answer, chance = Q_VIDEO_COLOR, color, 1 / len(COLORS)
        else:
            q, answer, chance = Q_VIDEO_DIRECTION, direction, 1 / len(DIRECTIONS)
        meta.update(answer=answer, chance=chance, scene=vmeta)
        return f"<video>\n{q}{short}", [_encode(video_codec(), frames)], answer, meta

    if task in ("color", "mc_color"):
        scene = sample_scene(rng, color=_pick(rng, COLORS, slot))
    elif task in ("shape", "mc_shape"):
        scene = sample_scene(rng, shape=_pick(rng, SHAPES, slot))
    elif task == "count":
        scene = sample_scene(rng, count=_pick(rng, COUNTS, slot))
    elif task == "position":
        scene = sample_scene(rng, count=1, position=_pick(rng, POSITIONS, slot))
    elif task == "ocr":
        scene = sample_scene(rng, word=_pick(rng, WORDS, slot))
    elif task == "caption":
        scene = sample_scene(rng, word=rng.choice(WORDS) if rng.random() < 0.15 else None)
    elif task == "description":
        scene = sample_scene(rng, word=rng.choice(WORDS) if rng.random() < 0.3 else None)
    else:
        raise ValueError(f"unknown task {task!r}")

    s = scene
    if task == "caption":
        prompt = rng.choice(CAPTION_PROMPTS)
        human, answer, chance = "<image>" + (f"\n{prompt}" if prompt else ""), caption_text(
            s.color, s.shape, s.count, s.word), 0.0
    elif task == "description":
        human, chance = f"<image>\n{DESCRIBE_PROMPT}", 0.0
        answer = description_text(s.color, s.shape, s.count, s.position, s.word, s.word_at)
    elif task.startswith("mc_"):
        values, value = (COLORS, s.color) if task == "mc_color" else (SHAPES, s.shape)
        choices, answer = _mc(rng, values, value, slot)
        q = q_color(s.count) if task == "mc_color" else Q_SHAPE
        human, chance = f"<image>\n{q}\n{options_block(choices)}\n{MC_SUFFIX}", 1 / len(choices)
        meta.update(choices=choices, answer_text=value)
    else:
        q, answer, chance = {
            "color": (q_color(s.count), s.color, 1 / len(COLORS)),
            "shape": (Q_SHAPE, s.shape, 1 / len(SHAPES)),
            "count": (Q_COUNT, str(s.count), 1 / len(COUNTS)),
            "position": (Q_POSITION, s.position, 1 / len(POSITIONS)),
            "ocr": (Q_OCR, s.word, 1 / len(WORDS)),
        }[task]
        human = f"<image>\n{q}{short}"
    meta.update(answer=answer, chance=chance, scene=s.meta())
    return human, [png_bytes(render(s))], answer, meta


def _write_kind(out_dir: Path, kind: str, n: int, seed: int,
                exclude: set[str] | None = None) -> tuple[Path, set[str]]:
    if kind not in TASKS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS + EVAL_KINDS}")
    is_eval = kind.startswith("eval_")
    stream = "eval" if is_eval else "train"  # separate seed streams: eval never replays training
    tasks, records, hashes = TASKS[kind], [], set()
    for i in range(n):
        if is_eval:
            task = tasks[i % len(tasks)]
        else:
            task = random.Random(f"{seed}:{kind}:{i}:task").choice(tasks)
        slot = i // len(tasks) if is_eval else None
        for attempt in range(100):
            rng = random.Random(f"shapes:{seed}:{stream}:{kind}:{i}:{attempt}")  # str seed: sha512
            human, blobs, gpt, meta = make_sample(rng, task, slot)
            digests = [hashlib.sha256(b).hexdigest() for b in blobs]
            if not exclude or not exclude.intersection(digests):
                break
        else:
            raise RuntimeError(f"{kind}[{i}]: could not draw media unseen in training")
        hashes.update(digests)
        is_video = task.startswith("video_")
        ext = ("gif" if video_codec() == "gif" else "mp4") if is_video else "png"
        sub = "videos" if is_video else "images"
        names = [f"{sub}/{kind}_{i:05d}" + (f"_{j}" if len(blobs) > 1 else "") + f".{ext}"
                 for j in range(len(blobs))]
        for name, blob in zip(names, blobs):
            (out_dir / name).write_bytes(blob)
        record: dict = {"id": f"shapes-{kind}-{seed}-{i:05d}"}
        if is_video:
            record["video"] = names[0]
        else:
            record["image"] = names if len(names) > 1 else names[0]
        record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
        record["meta"] = meta
        records.append(record)
    path = out_dir / f"{kind}.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path, hashes


def _prepare(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    return out


def generate_kind(out_dir: str | Path, kind: str, n: int, seed: int) -> Path:
    """Write one kind's JSON and media under out_dir; returns the JSON path.

    Alone, an eval kind cannot check against training media; generate_world does."""
    return _write_kind(_prepare(out_dir), kind, n, seed)[0]


def generate_world(out_dir: str | Path, seed: int = 0, n_per_kind: int | dict[str, int] = 200,
                   n_eval: int = 64) -> dict[str, Path]:
    """Every training kind (n_per_kind each; a dict sets some kinds, the rest get 200) and every
    eval kind (n_eval each), eval media redrawn if byte-equal to a training file. {kind: json}."""
    out = _prepare(out_dir)
    per = n_per_kind if isinstance(n_per_kind, dict) else dict.fromkeys(KINDS, n_per_kind)
    counts = {k: per.get(k, 200) for k in KINDS}
    counts.update({k: n_eval for k in EVAL_KINDS})
    paths, seen = {}, set()
    for kind in KINDS:
        paths[kind], hashes = _write_kind(out, kind, counts[kind], seed)
        seen |= hashes
    for kind in EVAL_KINDS:
        paths[kind], _ = _write_kind(out, kind, counts[kind], seed, exclude=seen)
    codec = video_codec()
    info = {"version": VERSION, "seed": seed, "counts": counts, "kinds": list(KINDS),
            "eval_kinds": list(EVAL_KINDS), "colors": list(COLORS), "shapes": list(SHAPES),
            "video": {"container": "gif" if codec == "gif" else "mp4", "codec": codec,
                      "fps": VIDEO_FPS}}
    (out / "world.json").write_text(json.dumps(info, indent=1) + "\n")
    return paths


# --- the OneVision-shaped mix --------------------------------------------------------------------
# Lengths follow LLaVA-OneVision's data (in its units: one 384-px tile = 729 visual tokens):
#   text-only turns ~100 tokens; single images at anyres_max_9: base tile + a 1x1..3x3 grid
#   (729 x (1 + 1..9) = 1,458..7,290 tokens); multi-image: 2-6 images, base tile each (729 + 1 each);
#   video: 8-32 frames, 2x2-pooled to 196 tokens a frame (1,568..6,272).
# The world keeps that shape in units of the recipe's tile: each image is drawn at exactly
# (a x tile, b x tile) px so that AnyRes picks the a x b grid, and the token counts are then those of the
# recipe's model (tokens_per_tile per tile, a quarter of that per pooled video frame, as 196/729 is).
# Text cannot scale with them: a ChatML turn costs ~25 tokens of scaffolding however short, so text stays
# as short as the chat allows (see OV_MIX_CARD for what that does to the ratios at each tile size).
OV_MIX: tuple[tuple[str, float], ...] = (("text", 0.10), ("image", 0.40), ("multi_image", 0.30), ("video", 0.20))
OV_GRIDS: tuple[tuple[int, int], ...] = tuple((a, b) for a in (1, 2, 3) for b in (1, 2, 3))  # 1x1 .. 3x3
OV_IMAGES = (2, 6)   # images per multi-image sample
OV_FRAMES = (8, 32)  # frames per video file; the stage's video_frames is what the model sees
OV_MIX_CARD = """\
OneVision-shaped mix (synthetic://shapes/ov_mix?n=N&tile=T): {counts}.
Proportions after LLaVA-OneVision's OneVision stage (single-image data re-sampled from Stage-2 SI, ~0.56M
multi-image, ~0.35M video samples) plus a text-only share for Stage-2 SI's language-only data.
Scale: one OneVision tile (729 visual tokens) = one recipe tile (tokens_per_tile = (T / patch)^2); a
video frame = 1/4 tile (OneVision: 196/729 = 0.27). Single images: a x b grid, a, b uniform in 1..3
(1 + a*b tiles: 2..10, OneVision's anyres_max_9 range); multi-image: 2..6 base tiles (+1 newline each);
video: 8..32-frame files sampled to the stage's video_frames (transformers' LLaVA-OneVision takes one
frame count per batch: pixel_values_videos is (videos, frames, 3, S, S)). Text is not scaled down with
the tiles: ChatML's scaffolding and the question alone are ~45 tokens, so a text-only sample is 62-85
tokens (tiny tokenizer) and each visual sample carries ~45 text tokens. At T = 112 px (64 tokens a tile,
the training benchmark's choice) that is ~1.2 tiles for a text-only sample vs ~0.14 in OneVision, and
the lengths run 62..708 tokens (text, 3x3 image) against OneVision's ~100..7,400: the visual modalities
keep OneVision's ratios to each other, text-only samples are relatively ~8x longer (so padding waste, and
what packing saves, is if anything understated). At T = 56 px (16 tokens a tile, the tiny recipe) text
would dominate (~4 tiles a text-only sample); a tile of ~210 px would match text too, at ~4x the CPU cost.
"""


def ov_mix_sample(rng: random.Random, modality: str, tile: int) -> tuple[str, list[bytes], str, dict]:
    """(human text, media bytes, gpt text, meta) of one OneVision-mix sample of `modality`."""
    short = f"\n{SHORT_SUFFIX}"
    color = rng.choice(COLORS)
    meta: dict = {"task": f"ov_{modality}", "modality": modality, "answer": color, "chance": 1 / len(COLORS)}
    if modality == "text":
        # a described scene, then a question about it: text-only, answerable from the text
        scenes = [(rng.choice(COLORS), rng.choice(SHAPES), rng.choice(COUNTS), rng.choice(POSITIONS))
                  for _ in range(rng.randint(1, 3))]
        scenes[0] = (color, *scenes[0][1:])
        text = " ".join(description_text(c, s, n, p if n == 1 else None, None, None) for c, s, n, p in scenes)
        meta["answer"] = color
        return f"{text}\nWhat color is the first shape described?{short}", [], color, meta
    if modality == "image":
        a, b = rng.choice(OV_GRIDS)
        scene = sample_scene(rng, color=color, count=1, size=(a * tile, b * tile))
        meta.update(grid=[a, b], scene=scene.meta())
        return f"<image>\n{q_color(1)}{short}", [png_bytes(render(scene))], color, meta
    if modality == "multi_image":
        n = rng.randint(*OV_IMAGES)
        target = rng.randrange(n)
        colors = [rng.choice(COLORS) for _ in range(n)]
        colors[target] = color
        scenes = [sample_scene(rng, color=c, count=1, size=(tile, tile)) for c in colors]
        human = "".join(f"Image {j + 1}: <image>\n" for j in range(n)) + \
            f"What color is the shape in image {target + 1}?{short}"
        meta.update(images=n, scenes=[s.meta() for s in scenes])
        return human, [png_bytes(render(s)) for s in scenes], color, meta
    if modality == "video":
        frames, vmeta = video_frames(rng, color, rng.choice(DIRECTIONS), n=rng.randint(*OV_FRAMES), side=tile)
        meta.update(scene=vmeta)
        return f"<video>\n{Q_VIDEO_COLOR}{short}", [_encode(video_codec(), frames)], color, meta
    raise ValueError(f"unknown modality {modality!r}")


def generate_ov_mix(out_dir: str | Path, n: int, seed: int = 0, tile: int = 56) -> Path:
    """`ov_mix.json` (+ media) under out_dir: n samples in OV_MIX's proportions, in a seeded order."""
    out = _prepare(out_dir)
    counts = {m: round(n * share) for m, share in OV_MIX}
    counts["image"] += n - sum(counts.values())  # rounding goes to the largest share
    order = [m for m, _ in OV_MIX for _ in range(counts[m])]
    random.Random(f"{seed}:ov_mix:order").shuffle(order)
    records = []
    for i, modality in enumerate(order):
        rng = random.Random(f"shapes:{seed}:ov_mix:{tile}:{i}")
        human, blobs, gpt, meta = ov_mix_sample(rng, modality, tile)
        record: dict = {"id": f"shapes-ov_mix-{seed}-{i:05d}"}
        if modality == "video":
            name = f"videos/ov_mix_{i:05d}.{'gif' if video_codec() == 'gif' else 'mp4'}"
            (out / name).write_bytes(blobs[0])
            record["video"] = name
        elif blobs:
            names = [f"images/ov_mix_{i:05d}_{j}.png" for j in range(len(blobs))]
            for name, blob in zip(names, blobs):
                (out / name).write_bytes(blob)
            record["image"] = names if len(names) > 1 else names[0]
        record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
        record["meta"] = meta
        records.append(record)
    path = out / "ov_mix.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    card = OV_MIX_CARD.format(counts=", ".join(f"{counts[m]} {m}" for m, _ in OV_MIX))
    (out / "world.json").write_text(json.dumps(
        {"version": VERSION, "seed": seed, "kind": "ov_mix", "tile": tile, "counts": counts,
         "mix": dict(OV_MIX), "grids": [list(g) for g in OV_GRIDS], "images_per_sample": list(OV_IMAGES),
         "video_frames": list(OV_FRAMES), "card": card}, indent=1) + "\n")
    (out / "README.md").write_text(card)
    return path


def corpus_texts() -> list[str]:
    """Every word, phrase and full answer the world can produce, in a fixed order (tokenizer)."""
    texts: list[str] = []
    texts += COLORS + SHAPES + tuple(PLURAL.values()) + POSITIONS + DIRECTIONS + WORDS
    texts += [str(c) for c in COUNTS] + list(NUMBER.values()) + list(LETTERS) + ["yes", "no"]
    texts += [SHORT_SUFFIX, MC_SUFFIX, IMAGE_NUMBER_SUFFIX, DESCRIBE_PROMPT, Q_OCR, Q_SHAPE,
              Q_COUNT, Q_POSITION, Q_SAME_COLOR, Q_VIDEO_COLOR, Q_VIDEO_DIRECTION,
              q_color(1), q_color(2)]
    texts += [p for p in CAPTION_PROMPTS if p]
    texts += [f"Image {j}:" for j in (1, 2, 3)]
    texts += [f"What color is the shape in image {j}?" for j in (1, 2, 3)]
    texts += [f"Which image shows a {c} shape?" for c in COLORS]
    texts += [f"{L}. {v}" for L in LETTERS for v in COLORS + SHAPES]
    texts += list(POSITION_PHRASE.values()) + ["written in black.", "a plain light background"]
    for color in COLORS:
        for shape in SHAPES:
            for count in COUNTS:
                texts.append(caption_text(color, shape, count, None))
                for pos in POSITIONS if count == 1 else (None,):
                    texts.append(description_text(color, shape, count, pos, None, None))
            for word in WORDS:
                texts.append(caption_text(color, shape, 1, word))
                for at in ("top", "bottom"):
                    texts.append(description_text(color, shape, 1, None, word, at))
    return list(dict.fromkeys(texts))  # de-duplicated, first occurrence order


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-per-kind", type=int, default=200, help="samples per training kind")
    ap.add_argument("--n-eval", type=int, default=64, help="samples per eval kind")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = generate_world(args.out, args.seed, args.n_per_kind, args.n_eval)
    for kind, path in paths.items():
        print(f"{kind:18s} {len(json.loads(path.read_text())):5d}  {path}")
    print(f"video codec {video_codec()}; {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()

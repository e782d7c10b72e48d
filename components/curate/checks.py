"""Validate one LLaVA record with its media bytes: the per-record work that curation workers run.

    limits = Limits.for_stage(recipe, "stage2_si")
    verdict = check_record(record, {"coco/1.jpg": data}, limits)    # Verdict(reason=None, ...) if kept

A record is rejected with a reason code (REASONS) and a message naming what is wrong: not an object
with an id, a malformed conversation (roles must alternate user/assistant and end with an answer), text
that is not encodable UTF-8 (lone surrogates), an `<image>`/`<video>` placeholder in an assistant turn
(the model would be trained to emit one), placeholders that do not match the media, a media path outside the media root or missing, an image that does not decode fully, a
decompression bomb (checked from the header, before decoding), an image under the minimum side or past
the aspect-ratio bound, an unreadable video, video in a stage without frames, or an estimated length
over the stage's `model_max_length`. A kept record comes back classified, its single `<image>` at the
front of its turn (normalise.front_image_placeholder), prompt-normalised, with the hashes that
deduplication needs and `meta.num_tokens` (what the modality-length sampler reads).
Pure function of its inputs, so any number of worker processes give the same result.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image

from components.curate.normalise import classify_task, front_image_placeholder, modality, normalise_prompt
from model import chat
from model.media import ImageBombError, MediaError, decode_image_sized, load_video
from onevision.recipe import Recipe

REASONS = ("not_a_record", "unreadable", "conversation", "text_encoding", "placeholder_in_answer", "placeholders",
           "media_path",
           "media_missing", "image_bomb", "image_undecodable", "image_too_small", "aspect_ratio",
           "video_unreadable", "video_not_allowed", "too_long", "duplicate", "near_duplicate")
BYTES_PER_TEXT_TOKEN = 3  # BPE on English is ~4 bytes/token (Qwen2; tiny: 3.9 measured): errs long
CHAT_OVERHEAD_TOKENS = 16  # system prompt of the chat template; + 8 per turn for role headers


@dataclass(frozen=True)
class Limits:
    """What a stage accepts; built from the recipe so workers need nothing else."""

    model_max_length: int
    video_frames: int | None = None
    min_side: int = 8
    max_aspect_ratio: float = 20.0
    single_image_tokens: int = 729  # the stage's visual budget for one AnyRes image
    tile_tokens: int = 729  # multi-image: each image is its base tile
    frame_tokens: int = 196  # video: per frame, after 2x2 bilinear pooling
    normalise_prompts: bool = True
    perceptual_hash: bool = True

    @classmethod
    def for_stage(cls, recipe: Recipe, stage_name: str) -> Limits:
        stage, cur = getattr(recipe.stages, stage_name), recipe.curation
        tile = recipe.model.tokens_per_tile
        single = tile if stage.image_aspect_ratio == "square" else stage.max_visual_tokens
        return cls(stage.model_max_length, stage.video_frames, cur.min_image_side, cur.max_aspect_ratio,
                   single, tile, math.ceil(tile / 4), cur.normalise_prompts, cur.near_dup_distance is not None)


@dataclass
class Verdict:
    reason_code: str | None
    reason: str | None = None
    record: dict[str, Any] | None = None  # the record to keep (normalised, meta added)
    content_hash: str = ""  # media bytes + conversation: exact duplicates
    text_key: str = ""  # conversation only, case/space-folded: near-duplicate candidates share it
    phashes: tuple[int, ...] = ()  # 64-bit pHash per image, in order
    modality: str = ""
    task: str = ""
    num_tokens: int = 0
    normalised: bool = False
    placeholder_moved: bool = False


def reject(code: str, message: str) -> Verdict:
    assert code in REASONS, code
    return Verdict(code, message)


def _media_list(record: dict[str, Any], key: str) -> list[Any]:
    value = record.get(key)
    return [value] if isinstance(value, str) else list(value or [])


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


PHASH_SIDE = 64  # pixels the pHash needs on the short side (see _phash)


def _check_image(rel: str, data: bytes, limits: Limits) -> tuple[Verdict | None, Image.Image | None]:
    """(a rejection, None) or (None, the image decoded for the pHash: a JPEG at a reduced scale)."""
    try:
        # every byte is decoded (a broken file is rejected), but a JPEG only to the scale the pHash uses
        (width, height), image = decode_image_sized(data, rel, draft_side=PHASH_SIDE)
    except ImageBombError as err:
        return reject("image_bomb", str(err)), None
    except MediaError as err:
        return reject("image_undecodable", str(err)), None
    if min(width, height) < limits.min_side:
        return reject("image_too_small", f"{rel}: {width}x{height} is under "
                                         f"min_image_side {limits.min_side}"), None
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        return reject("aspect_ratio", f"{rel}: {width}x{height} is beyond aspect ratio "
                                      f"{limits.max_aspect_ratio}:1"), None
    return None, image


def _phash(image: Image.Image) -> int:
    import imagehash

    # phash resamples to 32x32 with an antialiasing filter over the full image: box-reducing to >= 64 px
    # first (or decoding a JPEG at that scale) gives the same bits on 95% of photo-like images (max 2 apart)
    # at a fraction of the cost
    factor = max(1, min(image.size) // PHASH_SIDE)
    return int(str(imagehash.phash(image.reduce(factor) if factor > 1 else image)), 16)


def _estimate_tokens(turns: list[tuple[str, str]], n_images: int, n_videos: int, limits: Limits) -> int:
    text = sum(len(t.replace(chat.IMAGE_TOKEN, "").replace(chat.VIDEO_TOKEN, "").encode()) for _, t in turns)
    # multi-image: each image is its base tile plus an image-newline token; video: pooled frames + newline
    visual = (limits.single_image_tokens if n_images == 1 else n_images * (limits.tile_tokens + 1)) \
        + n_videos * ((limits.video_frames or 0) * limits.frame_tokens + 1)
    return math.ceil(text / BYTES_PER_TEXT_TOKEN) + CHAT_OVERHEAD_TOKENS + 8 * len(turns) + visual


def check_record(record: Any, media: dict[str, bytes | str], limits: Limits) -> Verdict:
    """Verdict for one record; `media` maps each media path to its bytes, or to why it could not be read."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)) or isinstance(record.get("id"), bool):
        return reject("not_a_record", "record is not an object with a string or integer 'id'")
    if not _encodable(record):
        return reject("text_encoding", "text is not valid UTF-8 (lone surrogate escape)")
    try:
        turns = chat.normalise_turns(record.get("conversations"))
    except chat.ConversationError as err:
        return reject("conversation", str(err))
    if turns[-1][0] != "assistant":
        return reject("conversation", "a training conversation must end with an assistant turn")
    if any(not text.strip() for role, text in turns if role == "assistant"):
        return reject("conversation", "an assistant turn is empty")
    for i, (role, text) in enumerate(turns):
        found = chat.count_placeholders([{"value": text}])
        if role == "assistant" and any(found):
            return reject("placeholder_in_answer", f"turn {i} (assistant) contains {found[0]} <image>/{found[1]} "
                                                   "<video> placeholder(s); media belong in user turns")
    images, videos = _media_list(record, "image"), _media_list(record, "video")
    n_image, n_video = chat.count_placeholders(record["conversations"])
    if (n_image, n_video) != (len(images), len(videos)):
        return reject("placeholders", f"{n_image} <image>/{n_video} <video> placeholders for "
                                      f"{len(images)} image(s)/{len(videos)} video(s)")
    if videos and not limits.video_frames:
        return reject("video_not_allowed", "video sample in a stage without video_frames")
    hasher = hashlib.sha256()
    phashes = []
    frames = 0  # video frames sampled for training (the shard index's `frames`)
    for rel in images + videos:
        data = media.get(rel) if isinstance(rel, str) else None
        if not isinstance(data, bytes):
            code = "media_path" if isinstance(data, str) and "relative" in data else "media_missing"
            return reject(code, data if isinstance(data, str) else f"media file {rel!r} is missing")
        if rel in images:
            bad, image = _check_image(rel, data, limits)
            if bad:
                return bad
            if limits.perceptual_hash:
                phashes.append(_phash(image))
        else:
            try:
                frames += len(load_video(rel, limits.video_frames, data=data))
            except MediaError as err:
                return reject("video_unreadable", str(err))
        hasher.update(hashlib.sha256(data).digest())
    n_tokens = _estimate_tokens(turns, len(images), len(videos), limits)
    if n_tokens > limits.model_max_length:
        return reject("too_long", f"~{n_tokens} tokens (estimated) > model_max_length {limits.model_max_length}")
    task = classify_task(turns)
    record, moved = front_image_placeholder(record)
    normalised = False
    if limits.normalise_prompts:
        record, normalised = normalise_prompt(record, task)
    text = json.dumps([[r, t] for r, t in chat.normalise_turns(record["conversations"])], ensure_ascii=False)
    hasher.update(text.encode())
    folded = " ".join(text.lower().split())
    kept = {**record, "meta": {**(record.get("meta") or {}), "modality": modality(record), "task_type": task,
                               "num_tokens": n_tokens, "images": len(images), "frames": frames}}
    return Verdict(None, None, kept, hasher.hexdigest(), hashlib.sha256(folded.encode()).hexdigest(),
                   tuple(phashes), modality(record), task, n_tokens, normalised, moved)


def check_item(item: tuple[Any, dict[str, bytes | str]], limits: Limits) -> Verdict:
    """check_record for a (RawRecord, media) pair: what worker processes run. It lives here, not in
    core, so that a spawned worker imports this light module only (not core's writer, sources, dedup).
    A record the reader could not parse is rejected here, not by the reader, so that the quarantine keeps
    stream order whatever the worker count."""
    raw, media = item
    if raw.error is not None:
        return reject("unreadable", raw.error)
    return check_record(raw.record, media, limits)

"""LLaVA-format samples -> model inputs, with transformers' LLaVA-OneVision processor.

    sp = SampleProcessor(processor, template="qwen_1_5", model_max_length=2048, video_frames=8, media_root="data/")
    item = sp({"id": "s1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nColour?"},
                                                               {"from": "gpt", "value": "red"}]})
    item.input_ids, item.labels        # (T,), (T,): labels are -100 except assistant replies
    item.pixel_values                  # list of (patches_i, 3, S, S), one per image

Modalities: one image -> AnyRes (base tile + up to N tiles, pooled to anyres_max_N); several images ->
base tile each; video -> `video_frames` uniformly sampled frames (2x2 bilinear-pooled by the model);
text-only. The number of placeholder tokens per image/video comes from the processor's own expansion
(`replace_image_token` / `replace_video_token`), so it matches what the model computes; tests check that.

`square` stages (Stage-1: 384x{1x1}, 729 tokens) feed each single image as its base tile only, which
transformers' LLaVA-OV does for images of multi-image samples (base + one newline token).

Errors in a sample raise SampleError naming the sample id; callers record and skip it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import chat
from model.media import MediaError, decode_image, load_image, load_video

IGNORE_INDEX = -100


class SampleError(ValueError):
    """A sample that cannot become model input; `sample_id` and `reason` say which and why."""

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"sample {sample_id!r}: {reason}")
        self.sample_id, self.reason = sample_id, reason


@dataclass
class ProcessedSample:
    id: str
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long, IGNORE_INDEX outside assistant replies
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # per image: (patches, 3, S, S)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # per image: original (H, W)
    pixel_values_videos: list[torch.Tensor] = field(default_factory=list)  # per video: (frames, 3, S, S)
    truncated: bool = False

    @property
    def modality(self) -> str:
        if self.pixel_values_videos:
            return "video"
        if len(self.pixel_values) > 1:
            return "multi_image"
        return "image" if self.pixel_values else "text"

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class SampleProcessor:
    """Turns one LLaVA-format record into a ProcessedSample for a given stage's settings."""

    def __init__(self, processor: Any, template: chat.Template, model_max_length: int,
                 video_frames: int | None = None, square: bool = False,
                 media_root: str | Path | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.model_max_length = model_max_length
        self.video_frames = video_frames
        self.square = square
        self.media_root = Path(media_root) if media_root else None
        self.image_token_id = processor.image_token_id
        self.video_token_id = processor.video_token_id

    def _path(self, rel: str) -> Path:
        path = Path(rel)
        return path if path.is_absolute() or self.media_root is None else self.media_root / path

    def image_token_counts(self, image_inputs: dict[str, Any]) -> list[int]:
        """Placeholder tokens per image, by the processor's own expansion rule."""
        token = self.processor.image_token
        n = len(image_inputs["image_sizes"])
        if self.square and n == 1:
            return [self.processor.num_image_tokens + 1]  # base tile + image_newline
        return [self.processor.replace_image_token(image_inputs, i).count(token) for i in range(n)]

    def visual_inputs(self, sample_id: str, images: list[Any], videos: list[Any]) -> tuple[dict[str, Any], list[int], list[int]]:
        """Pixel tensors and per-image / per-video token counts for already-decoded media."""
        out: dict[str, Any] = {"pixel_values": [], "image_sizes": [], "pixel_values_videos": []}
        image_counts, video_counts = [], []
        if images:
            # Each image's (patches, 3, S, S) tensor as the processor made it: padding them to one patch
            # count and stacking them into a batch tensor would copy every patch twice (~40% of the time
            # of an OV-scale image), for a layout the Collator builds itself anyway.
            inputs = self.processor.image_processor(images=[images], do_pad=False, return_tensors=None)
            image_counts = self.image_token_counts(inputs)
            for i, (h, w) in enumerate(inputs["image_sizes"]):
                # A lone image holds exactly its AnyRes patches; otherwise keep the base tile (patch 0).
                base_only = len(images) > 1 or self.square
                out["pixel_values"].append(inputs["pixel_values"][i][:1] if base_only else inputs["pixel_values"][i])
                out["image_sizes"].append((int(h), int(w)))
        if videos:
            if not self.video_frames:
                raise SampleError(sample_id, "has a video but this stage sets no video_frames")
            inputs = self.processor.video_processor(videos=videos, return_tensors="pt")
            for i in range(len(videos)):
                video_counts.append(self.processor.replace_video_token(inputs, i).count(self.processor.video_token))
                out["pixel_values_videos"].append(inputs["pixel_values_videos"][i])
        return out, image_counts, video_counts

    def __call__(self, sample: dict[str, Any], media: Mapping[str, bytes] | None = None) -> ProcessedSample:
        """Process one record; media paths resolve in `media` (shard members) if given, else on disk."""
        sample_id = str(sample.get("id", "<no id>"))
        if not isinstance(sample, dict) or "id" not in sample:
            raise SampleError(sample_id, "record has no 'id'")
        conversations = sample.get("conversations")
        try:
            segments = chat.render_segments(conversations, self.template)
        except chat.ConversationError as err:
            raise SampleError(sample_id, str(err)) from None
        return self._truncate(self._process(sample_id, sample, conversations, segments, media))

    def _process(self, sample_id: str, sample: dict[str, Any], conversations: Any,
                 segments: list[tuple[str, bool]], media: Mapping[str, bytes] | None) -> ProcessedSample:
        image_paths, video_paths = _as_list(sample.get("image") or sample.get("images")), _as_list(sample.get("video"))
        n_image_ph, n_video_ph = chat.count_placeholders(conversations)
        if n_image_ph != len(image_paths):
            raise SampleError(sample_id, f"{n_image_ph} <image> placeholder(s) but {len(image_paths)} image(s)")
        if n_video_ph != len(video_paths):
            raise SampleError(sample_id, f"{n_video_ph} <video> placeholder(s) but {len(video_paths)} video(s)")
        try:
            if media is None:
                images = [load_image(self._path(p)) for p in image_paths]
                videos = [load_video(self._path(p), self.video_frames or 1) for p in video_paths]
            else:
                missing = [p for p in (*image_paths, *video_paths) if p not in media]
                if missing:
                    raise MediaError(f"media {missing} not in the shard")
                images = [decode_image(media[p], p) for p in image_paths]
                videos = [load_video(p, self.video_frames or 1, data=media[p]) for p in video_paths]
        except MediaError as err:
            raise SampleError(sample_id, str(err)) from None
        visual, image_counts, video_counts = self.visual_inputs(sample_id, images, videos)
        ids, labels = self._tokenize(segments, image_counts, video_counts)
        return ProcessedSample(sample_id, ids, labels, visual["pixel_values"], visual["image_sizes"],
                               visual["pixel_values_videos"])

    def prompt(self, sample: dict[str, Any], media: Mapping[str, bytes] | None = None) -> ProcessedSample:
        """The generation prompt of a record: its conversation up to the last user turn, followed by the
        assistant header (a trailing assistant turn, the reference answer, is dropped)."""
        conversations = list(sample.get("conversations") or [])
        if conversations and chat.ROLES.get(str(conversations[-1].get("from", "")).lower()) == "assistant":
            conversations = conversations[:-1]
        sample_id = str(sample.get("id", "<no id>"))
        try:
            segments = chat.render_segments(conversations, self.template, add_generation_prompt=True)
        except chat.ConversationError as err:
            raise SampleError(sample_id, str(err)) from None
        return self._process(sample_id, sample, conversations, segments, media)

    def _tokenize(self, segments: list[tuple[str, bool]], image_counts: list[int],
                  video_counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        images, videos = iter(image_counts), iter(video_counts)
        for text, trainable in segments:
            for piece, placeholder in _split_placeholders(text):
                if placeholder == chat.IMAGE_TOKEN:
                    piece_ids = [self.image_token_id] * next(images)
                elif placeholder == chat.VIDEO_TOKEN:
                    piece_ids = [self.video_token_id] * next(videos)
                else:
                    piece_ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if trainable and placeholder is None else [IGNORE_INDEX] * len(piece_ids)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def _truncate(self, item: ProcessedSample) -> ProcessedSample:
        """Cut trailing text to model_max_length; never inside or before visual tokens."""
        limit = self.model_max_length
        if len(item) <= limit:
            return item
        visual = ((item.input_ids == self.image_token_id) | (item.input_ids == self.video_token_id)).nonzero()
        last_visual = int(visual.max()) + 1 if visual.numel() else 0
        if last_visual > limit:
            raise SampleError(item.id, f"too long: {len(item)} tokens, its visual tokens end at {last_visual} "
                                       f"> model_max_length {limit}")
        item.input_ids, item.labels, item.truncated = item.input_ids[:limit], item.labels[:limit], True
        if not (item.labels != IGNORE_INDEX).any():
            raise SampleError(item.id, f"too long: {len(item)} tokens leave no answer within model_max_length {limit}")
        return item


def _split_placeholders(text: str) -> list[tuple[str, str | None]]:
    """"a<image>b" -> [("a", None), ("<image>", "<image>"), ("b", None)] (empty pieces dropped)."""
    out: list[tuple[str, str | None]] = []
    rest = text
    while rest:
        hits = [(rest.find(tok), tok) for tok in (chat.IMAGE_TOKEN, chat.VIDEO_TOKEN) if tok in rest]
        if not hits:
            out.append((rest, None))
            break
        pos, tok = min(hits)
        if pos:
            out.append((rest[:pos], None))
        out.append((tok, tok))
        rest = rest[pos + len(tok):]
    return out

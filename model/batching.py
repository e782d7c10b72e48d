"""Batches for training: padding collator, sequence packing, modality-length grouped sampler.

    collate = Collator(pad_token_id=processor.tokenizer.pad_token_id)
    batch = collate([item1, item2])                  # padded: input_ids/labels/attention_mask (B, T)
    packed = collate_packed(pack_greedy(items, 2048), pad_token_id)   # (G, L), position_ids restart per sample
    loss = model(**batch, use_cache=False).loss      # the same per-token loss for `packed`

Packing concatenates samples into one row and restarts `position_ids` at each sample; with no attention
mask, transformers builds a block-diagonal causal mask from those position ids (masking_utils'
packed-sequence detection, sdpa and flash attention alike), so no token attends across samples. The
first label of every sample is ignored, so no sample learns to predict its neighbour's first token.

The sampler follows LLaVA-NeXT's `group_by_modality_length`: batches hold one modality (text-only vs.
visual) and similar lengths, which cuts padding; megabatch order is shuffled with a seed per epoch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from model.processing import IGNORE_INDEX, ProcessedSample


def visual_fields(items: Sequence[ProcessedSample], square: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    images = [pv for item in items for pv in item.pixel_values]
    if images:
        # (sum of patches, 3, S, S): patches concatenated, not padded to the longest image as the stock
        # processor's 5-D batch is; the model splits them back by image_sizes (no copy of zeros).
        out["pixel_values"] = torch.cat(images)
        out["image_sizes"] = torch.tensor([size for item in items for size in item.image_sizes], dtype=torch.long)
        counts = [len(item.pixel_values) for item in items if item.pixel_values]
        if square:
            # transformers patches an image iff its sample has exactly one; a count >= 2 over all of the
            # batch's images marks every one base-tile-only (zip() pairs counts with images one to one).
            counts = [max(2, len(images))]
        out["batch_num_images"] = torch.tensor(counts, dtype=torch.long)
    videos = [pv for item in items for pv in item.pixel_values_videos]
    if videos:
        out["pixel_values_videos"] = torch.stack(videos)  # (N_videos, frames, 3, S, S)
    return out


class Collator:
    """Right-pads a list of ProcessedSample into a batch for LlavaOnevisionForConditionalGeneration."""

    def __init__(self, pad_token_id: int, square: bool = False):
        self.pad_token_id = pad_token_id
        self.square = square

    def __call__(self, items: Sequence[ProcessedSample]) -> dict[str, Any]:
        longest = max(len(item) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, : len(item)] = item.input_ids
            labels[row, : len(item)] = item.labels
            attention_mask[row, : len(item)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                **visual_fields(items, self.square)}


def pack_greedy(items: Sequence[ProcessedSample], max_length: int) -> list[list[ProcessedSample]]:
    """First-fit-decreasing bins of total length <= max_length (a longer sample gets its own bin)."""
    bins: list[list[ProcessedSample]] = []
    room: list[int] = []
    for item in sorted(items, key=len, reverse=True):
        for i, free in enumerate(room):
            if len(item) <= free:
                bins[i].append(item)
                room[i] -= len(item)
                break
        else:
            bins.append([item])
            room.append(max_length - len(item))
    return bins


def collate_packed(groups: Sequence[Sequence[ProcessedSample]], pad_token_id: int,
                   square: bool = False) -> dict[str, Any]:
    """One row per group: samples concatenated, position_ids restarting at 0, no attention mask."""
    longest = max(sum(len(item) for item in group) for group in groups)
    input_ids = torch.full((len(groups), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(groups), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(groups), longest), dtype=torch.long)
    for row, group in enumerate(groups):
        start = 0
        for item in group:
            end = start + len(item)
            input_ids[row, start:end] = item.input_ids
            labels[row, start:end] = item.labels
            labels[row, start] = IGNORE_INDEX
            position_ids[row, start:end] = torch.arange(len(item))
            start = end
        # the padding tail is a sequence of its own (positions restart), so real tokens never see it
        position_ids[row, start:] = torch.arange(longest - start)
    flat = [item for group in groups for item in group]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            **visual_fields(flat, square)}


class ModalityLengthGroupedSampler(Sampler[int]):
    """Indices in batches of one modality and similar length (LLaVA-NeXT group_by_modality_length).

    `lengths[i]` is sample i's token length, `is_visual[i]` whether it has images or video. Within a
    modality the shuffled indices are cut into megabatches of `megabatch_batches` global batches, each
    sorted by length and split into global batches of `batch_size` (the *global* batch, so the same
    samples meet in a step at any world size); the batches' order is then shuffled. Padding shrinks
    to the length spread within a batch; the seed and epoch fix the order.
    """

    def __init__(self, lengths: Sequence[int], is_visual: Sequence[bool], batch_size: int,
                 megabatch_batches: int = 16, seed: int = 0):
        if len(lengths) != len(is_visual):
            raise ValueError("lengths and is_visual differ in size")
        self.lengths, self.is_visual = list(lengths), list(is_visual)
        self.batch_size, self.megabatch = batch_size, batch_size * megabatch_batches
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1000003 + self.epoch)
        batches: list[list[int]] = []
        for visual in (True, False):
            group = [i for i, v in enumerate(self.is_visual) if v == visual]
            rng.shuffle(group)
            for start in range(0, len(group), self.megabatch):
                mega = sorted(group[start: start + self.megabatch], key=lambda j: -self.lengths[j])
                batches += [mega[i: i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])

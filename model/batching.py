"""Batches for training: padding collator, sequence packing, modality-length grouped sampler.

    collate = Collator(pad_token_id=processor.tokenizer.pad_token_id)
    batch = collate([item1, item2])                  # padded: input_ids/labels/attention_mask (B, T)
    flat = PackedCollator()([item1, item2])          # padding-free: one row (1, T1 + T2), the trainer's
                                                     # collator when recipe.training.packing
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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
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


class PackedCollator:
    """Padding-free: a micro-batch's samples concatenated into ONE row (1, sum of lengths), no padding.

    The token side is transformers' own `DataCollatorWithFlattening` (input_ids, labels with each sample's
    first label set to -100, position_ids restarting at 0 per sample, and with `flash_kwargs` the
    varlen boundaries cu_seq_lens_q/k + max_length_q/k). It cannot carry LLaVA-OV's visual fields: it
    builds its batch from input_ids/labels only and drops every other key (pixel_values, image_sizes,
    batch_num_images, pixel_values_videos), so those come from `visual_fields`, in sample order, which
    is the order of the image/video tokens in the row. No attention mask: sdpa/eager/flex build a
    block-diagonal causal mask from the restarting position ids (masking_utils' packed-sequence
    detection); flash attention runs varlen, from cu_seq_lens when given (no device sync per layer to
    re-derive them from position ids) else from the position ids. The keys reach only the language
    model: LLaVA-OV's forward hands its **kwargs to the language model, never to the vision tower.
    """

    def __init__(self, square: bool = False, flash_kwargs: bool = False):
        from transformers import DataCollatorWithFlattening

        self.square = square
        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)

    def __call__(self, items: Sequence[ProcessedSample]) -> dict[str, Any]:
        batch = self.flatten([{"input_ids": item.input_ids, "labels": item.labels} for item in items])
        return {**batch, **visual_fields(items, self.square)}


# --- attention along a padding-free row ----------------------------------------------------------

VARLEN_SDPA = "onevision_varlen_sdpa"


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          cu_seq_lens_q: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa one sample at a time along a packed row (B=1): what flash-attention varlen does, for sdpa.

    q/k/v: (1, heads, L, head_dim), L the row's total length; the samples' bounds are `cu_seq_lens_q`
    (n+1,) (PackedCollator with flash_kwargs), else where `position_ids` restart. sdpa with the
    block-diagonal mask transformers would build instead computes all (sum L_i)^2 scores and masks most of
    them; this computes sum L_i^2, causal within each sample, so a packed row costs what its samples cost
    apart. Any other batch (padded rows: a mask from varlen_sdpa_mask) is transformers' sdpa.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if query.shape[0] != 1 or attention_mask is not None or (cu_seq_lens_q is None and position_ids is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    length = query.shape[2]
    if cu_seq_lens_q is not None:
        bounds = cu_seq_lens_q.tolist()
    else:
        pos = position_ids.reshape(-1)
        bounds = [0, *((pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1).tolist(), length]
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each kv head serves `groups` query heads
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True)
        for s, e in zip(bounds, bounds[1:]) if e > s]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def varlen_sdpa_mask(*args: Any, batch_size: int, attention_mask: torch.Tensor | None = None,
                     **kwargs: Any) -> torch.Tensor | None:
    """No mask tensor for one unpadded row (varlen_sdpa_attention keeps attention within each sample; an
    L x L mask of a long packed row would be built for nothing); transformers' sdpa mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if batch_size == 1 and attention_mask is None:
        return None
    return sdpa_mask(*args, batch_size=batch_size, attention_mask=attention_mask, **kwargs)


def use_varlen_sdpa(model: torch.nn.Module) -> bool:
    """Switch the language model of a LLaVA-OV model from sdpa to varlen_sdpa (the vision tower keeps its own);
    False, and no change, for any other attention (flash attention is varlen already; eager keeps the mask).

    The switch is the config's runtime `_attn_implementation`, which save_pretrained does not write, so
    saved checkpoints and HF folders still say sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    text = getattr(model.config, "text_config", model.config)
    if text._attn_implementation not in ("sdpa", VARLEN_SDPA):
        return False
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_sdpa_mask)
    configs = {id(text): text}
    for module in model.modules():  # sub-models may hold their own config objects
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "model_type", None) == text.model_type:
            configs[id(config)] = config
    for config in configs.values():
        config._attn_implementation = VARLEN_SDPA
    return True


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
        # (N,) arrays, not lists: a stage of millions of samples costs no Python object per sample
        self.lengths, self.is_visual = np.asarray(lengths), np.asarray(is_visual, dtype=bool)
        self.batch_size, self.megabatch = batch_size, batch_size * megabatch_batches
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1000003 + self.epoch)
        return self._grouped(np.arange(len(self.lengths)), rng)

    def _grouped(self, indices: Iterable[int], rng: random.Random) -> list[list[int]]:
        """`indices` in batches of one modality, length-sorted within megabatches, in shuffled order."""
        batches: list[list[int]] = []
        indices = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64)
        for visual in (True, False):
            group = indices[self.is_visual[indices] == visual].tolist()  # in `indices` order
            rng.shuffle(group)
            for start in range(0, len(group), self.megabatch):
                chunk = np.asarray(group[start: start + self.megabatch], dtype=np.int64)
                mega = chunk[np.argsort(-self.lengths[chunk].astype(np.int64), kind="stable")].tolist()  # longest first
                batches += [mega[i: i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])


def samples_by_shard(shard_of: Sequence[int]) -> dict[int, np.ndarray]:
    """shard -> its sample ids (in id order): what the shard samplers window over."""
    shard_of = np.asarray(shard_of, dtype=np.int64)
    in_order = bool(np.all(shard_of[1:] >= shard_of[:-1]))  # an index lists samples in shard order
    order = np.arange(len(shard_of)) if in_order else np.argsort(shard_of, kind="stable")  # (N,) grouped by shard
    grouped = shard_of[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(grouped)) + 1]) if len(grouped) else np.zeros(0, np.int64)
    ends = [*starts[1:].tolist(), len(order)]
    return {int(grouped[start]): order[start:end] for start, end in zip(starts.tolist(), ends, strict=True)}


class ShardWindowSampler(ModalityLengthGroupedSampler):
    """ModalityLengthGroupedSampler over a window of shards at a time, for shards streamed from S3.

    `shard_of[i]` is the shard of sample i. Each epoch the shards are shuffled and taken `window_shards` at
    a time; the samples of a window are grouped as ModalityLengthGroupedSampler groups the whole set
    (one modality per batch, length-sorted megabatches, shuffled batches), and the windows follow each
    other. So reading needs only a window's shards on local disk (the cache cap), every sample comes once
    per epoch, and the order is fixed by the seed and epoch (an exact resume skips the same batches).
    """

    def __init__(self, lengths: Sequence[int], is_visual: Sequence[bool], shard_of: Sequence[int], batch_size: int,
                 window_shards: int = 8, megabatch_batches: int = 16, seed: int = 0):
        super().__init__(lengths, is_visual, batch_size, megabatch_batches, seed)
        if len(shard_of) != len(lengths):
            raise ValueError("shard_of and lengths differ in size")
        if window_shards < 1:
            raise ValueError(f"window_shards must be at least 1, got {window_shards}")
        self.window_shards = window_shards
        self.by_shard = samples_by_shard(shard_of)

    def window_batches(self) -> Iterator[list[int]]:
        """The epoch's batches, a window at a time (lazily: the first batch costs one window's grouping)."""
        rng = random.Random(self.seed * 1000003 + self.epoch)
        shards = sorted(self.by_shard)
        rng.shuffle(shards)
        for start in range(0, len(shards), self.window_shards):
            window = shards[start: start + self.window_shards]
            yield from self._grouped(np.concatenate([self.by_shard[s] for s in window]).tolist(), rng)

    def batches(self) -> list[list[int]]:
        return list(self.window_batches())

    def __iter__(self) -> Iterator[int]:
        return (i for batch in self.window_batches() for i in batch)

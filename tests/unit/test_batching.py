"""Collation, packing (same per-token loss as padding) and the modality-length sampler."""

from __future__ import annotations

import pytest
import torch

from model.batching import Collator, ModalityLengthGroupedSampler, ShardWindowSampler, collate_packed, pack_greedy
from model.processing import SampleProcessor


def _items(processor, media_dir):
    sp = SampleProcessor(processor, "qwen_1_5", 4096, video_frames=4, media_root=media_dir)
    q = lambda ph, a: [{"from": "human", "value": f"{ph}What is shown?"}, {"from": "gpt", "value": a}]  # noqa: E731
    return [sp({"id": "a", "image": "100x200.png", "conversations": q("<image>\n", "a red square")}),
            sp({"id": "b", "conversations": q("", "nothing at all, only text")}),
            sp({"id": "c", "image": ["56x56.png", "90x60.png"], "conversations": q("<image><image>\n", "two")}),
            sp({"id": "d", "video": "clip.mp4", "conversations": q("<video>\n", "a moving blue bar")}),
            sp({"id": "e", "image": "57x300.png", "conversations": q("<image>\n", "red")})]


def test_packed_loss_equals_padded_loss(tiny, media_dir) -> None:
    model, processor = tiny
    model.eval()
    items = _items(processor, media_dir)
    padded = Collator(processor.tokenizer.pad_token_id)(items)
    groups = pack_greedy(items, max_length=max(len(i) for i in items) + 40)
    assert len(groups) < len(items), "something was actually packed"
    packed = collate_packed(groups, processor.tokenizer.pad_token_id)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        loss_packed = model(**packed, use_cache=False).loss
        # the first label of each sample is ignored when packed; ignore it when padded too
        for row, item in enumerate(items):
            padded["labels"][row, 0] = -100
        loss_padded_same = model(**padded, use_cache=False).loss
    assert torch.allclose(loss_packed, loss_padded_same, atol=1e-5), (loss_packed, loss_padded_same)
    assert torch.isfinite(loss_padded)


def test_packing_blocks_cross_sample_attention(tiny, media_dir) -> None:
    """Changing one packed sample must not change the logits of its neighbour."""
    model, processor = tiny
    model.eval()
    a, b = _items(processor, media_dir)[:2]
    b2 = type(b)(b.id, b.input_ids.flip(0), b.labels)
    with torch.no_grad():
        one = model(**collate_packed([[a, b]], processor.tokenizer.pad_token_id), use_cache=False).logits
        two = model(**collate_packed([[a, b2]], processor.tokenizer.pad_token_id), use_cache=False).logits
    assert torch.allclose(one[0, : len(a)], two[0, : len(a)], atol=1e-5)


def test_pack_greedy_respects_the_limit() -> None:
    class Item:
        def __init__(self, n): self.n = n
        def __len__(self): return self.n
    groups = pack_greedy([Item(n) for n in (90, 50, 40, 30, 10, 120)], max_length=100)
    # first-fit decreasing: 120 alone (over the limit), 90+10, 50+40, 30
    assert sorted(sum(len(i) for i in g) for g in groups) == [30, 90, 100, 120]
    assert all(sum(len(i) for i in g) <= 100 for g in groups if len(g) > 1)
    assert sum(len(g) for g in groups) == 6


def test_sampler_groups_by_modality_and_length_and_is_seeded() -> None:
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 1000, (64,), generator=rng).tolist()
    visual = [i % 3 != 0 for i in range(64)]
    sampler = ModalityLengthGroupedSampler(lengths, visual, batch_size=4, megabatch_batches=4, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(64))
    batches = sampler.batches()
    assert all(len({visual[i] for i in batch}) == 1 for batch in batches), "one modality per batch"
    # grouping cuts padding against the same batches drawn at random
    padded = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)  # noqa: E731
    shuffled = torch.randperm(64, generator=rng).tolist()
    assert padded(batches) < padded([shuffled[i: i + 4] for i in range(0, 64, 4)])
    assert list(ModalityLengthGroupedSampler(lengths, visual, 4, 4, seed=3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(ValueError):
        ModalityLengthGroupedSampler([1, 2], [True], 1)


def test_window_sampler_reads_a_window_of_shards_at_a_time_and_every_sample_once() -> None:
    rng = torch.Generator().manual_seed(1)
    shard_of = [i // 10 for i in range(120)]  # 12 shards of 10
    lengths = torch.randint(10, 1000, (120,), generator=rng).tolist()
    visual = [i % 4 != 0 for i in range(120)]
    sampler = ShardWindowSampler(lengths, visual, shard_of, batch_size=4, window_shards=3, megabatch_batches=2, seed=5)
    assert sorted(sampler) == list(range(120))  # every sample once per epoch
    batches = sampler.batches()
    assert all(len({visual[i] for i in batch}) == 1 for batch in batches), "one modality per batch"
    # the shards touched so far grow a window at a time: at most 3 distinct shards per window of batches
    seen_windows, current = [], set()
    for batch in batches:
        shards = {shard_of[i] for i in batch}
        if not shards <= current and len(current | shards) > 3:
            seen_windows.append(current)
            current = set()
        current |= shards
    seen_windows.append(current)
    assert len(seen_windows) == 4 and all(len(w) == 3 for w in seen_windows)
    assert list(ShardWindowSampler(lengths, visual, shard_of, 4, 3, 2, seed=5)) == list(sampler)  # seeded
    sampler.set_epoch(1)
    assert list(sampler) != list(ShardWindowSampler(lengths, visual, shard_of, 4, 3, 2, seed=5))
    with pytest.raises(ValueError, match="window_shards"):
        ShardWindowSampler(lengths, visual, shard_of, 4, window_shards=0)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_window_sampler_into_disjoint_parts_covering_the_epoch(world: int) -> None:
    """What the Trainer does with our sampler on `world` ranks (accelerate's BatchSamplerShard): each rank
    reads its own samples, and together they read every sample exactly once per epoch."""
    from accelerate.data_loader import BatchSamplerShard

    n = 4 * world * 12  # whole batches for every rank
    shard_of = [i // 16 for i in range(n)]
    sampler = ShardWindowSampler([10 + i % 7 for i in range(n)], [True] * n, shard_of, batch_size=4 * world,
                                 window_shards=2, seed=3)
    batches = torch.utils.data.BatchSampler(sampler, batch_size=4, drop_last=False)
    parts = [[i for batch in BatchSamplerShard(batches, num_processes=world, process_index=rank) for i in batch]
             for rank in range(world)]
    assert all(len(set(a) & set(b)) == 0 for r, a in enumerate(parts) for b in parts[r + 1:])
    assert sorted(i for part in parts for i in part) == list(range(n))

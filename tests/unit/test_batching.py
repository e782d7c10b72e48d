"""Collation, packing (same per-token loss as padding) and the modality-length sampler."""

from __future__ import annotations

import math

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


def test_samplers_take_the_index_arrays_and_keep_the_list_order() -> None:
    """The samplers work on (N,) arrays as the index gives them (int32 lengths, bool, int32 shards) with
    the batches that Python lists give, and a megabatch sorts longest first with ties in shuffled order
    (sorted() with a key, as LLaVA-NeXT's grouping does): the order a resumed run replays."""
    import random

    import numpy as np

    rng = random.Random(5)
    lengths = [rng.choice([10, 20, 30]) for _ in range(300)]  # many ties
    visual = [rng.random() < 0.7 for _ in range(300)]
    shard_of = [i // 37 for i in range(300)]

    def reference(indices: list[int], seed_rng: random.Random) -> list[list[int]]:
        batches = []
        for modality in (True, False):
            group = [i for i in indices if visual[i] == modality]
            seed_rng.shuffle(group)
            for at in range(0, len(group), 16):
                mega = sorted(group[at: at + 16], key=lambda j: -lengths[j])
                batches += [mega[k: k + 4] for k in range(0, len(mega), 4)]
        seed_rng.shuffle(batches)
        return batches

    arrays = (np.array(lengths, np.int32), np.array(visual), np.array(shard_of, np.int32))
    plain = ModalityLengthGroupedSampler(*arrays[:2], batch_size=4, megabatch_batches=4, seed=2)
    assert plain.batches() == reference(list(range(300)), random.Random(2 * 1000003))
    assert plain.batches() == ModalityLengthGroupedSampler(lengths, visual, 4, 4, seed=2).batches()
    window = ShardWindowSampler(*arrays, batch_size=4, window_shards=3, megabatch_batches=4, seed=2)
    assert window.batches() == ShardWindowSampler(lengths, visual, shard_of, 4, 3, 4, seed=2).batches()
    assert sorted(i for batch in window.batches() for i in batch) == list(range(300))


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


def _rank_parts(sampler, world: int, micro: int) -> list[list[list[int]]]:
    """Each rank's micro-batches, as accelerate's BatchSamplerShard deals the Trainer's DataLoader."""
    from accelerate.data_loader import BatchSamplerShard

    batches = torch.utils.data.BatchSampler(sampler, batch_size=micro, drop_last=False)
    return [list(BatchSamplerShard(batches, num_processes=world, process_index=rank)) for rank in range(world)]


@pytest.mark.parametrize("world,accumulation", [(2, 1), (3, 2)])
def test_each_rank_reads_only_its_own_shards_and_every_sample_comes(world: int, accumulation: int) -> None:
    """The streamed sampler on `world` ranks: a rank's micro-batches come from the shards it owns (about
    1/world of them, none shared), every sample comes at least once per epoch, the repeats that even out
    the ranks stay few, and the steps per epoch do not depend on the shuffle."""
    from model.rank_sampler import RankShardSampler

    micro, sizes = 2, [16] * 10 + [9, 5]  # two short shards (the held-out slice's), at the end
    shard_of = [s for s, size in enumerate(sizes) for _ in range(size)]
    n = len(shard_of)
    lengths, visual = [10 + (i * 7) % 23 for i in range(n)], [i % 3 != 0 for i in range(n)]
    sampler = RankShardSampler(lengths, visual, shard_of, global_batch=micro * accumulation * world, ranks=world,
                               micro_batch=micro, window_shards=2, seed=5)
    lengths_seen = set()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        parts = _rank_parts(sampler, world, micro)
        owned = [set(sampler.owned_shards(r)) for r in range(world)]
        assert all(not owned[r] & owned[q] for r in range(world) for q in range(r + 1, world))
        assert set().union(*owned) == set(range(len(sizes)))
        for rank, part in enumerate(parts):
            assert {shard_of[i] for batch in part for i in batch} <= owned[rank], (epoch, rank)
            assert all(len(batch) == micro for batch in part)
        assert len({len(part) for part in parts}) == 1  # every rank takes the same number of steps
        seen = [i for part in parts for batch in part for i in batch]
        assert set(seen) == set(range(n)) and len(seen) == len(sampler)
        # a rank's repeats: at most a partial batch per window of 2 shards, and what it owns less than
        # the rank that owns the most can (the bound that fixes the epoch's length)
        most = sum(sorted(sizes, reverse=True)[:math.ceil(len(sizes) / world)])
        for rank, part in enumerate(parts):
            own = sum(sizes[s] for s in owned[rank])
            windows = math.ceil(len(owned[rank]) / 2)
            assert sum(map(len, part)) - own <= sampler.batch_size * windows + (most - own)
        lengths_seen.add(len(seen))
        # a rank's share of a step holds one modality, except the window's mixed leftover batch
        shares = [[i for batch in part[s * accumulation: (s + 1) * accumulation] for i in batch]
                  for part in parts for s in range(len(part) // accumulation)]
        mixed = sum(len({visual[i] for i in share}) > 1 for share in shares)
        assert mixed <= world * math.ceil(len(sizes) / world / 2) * 2, mixed
    assert len(lengths_seen) == 1  # the epoch's length is fixed by the shard sizes, not the shuffle
    again = RankShardSampler(lengths, visual, shard_of, global_batch=micro * accumulation * world, ranks=world,
                             micro_batch=micro, window_shards=2, seed=5)
    again.set_epoch(2)
    assert list(again) == list(sampler)  # the seed and epoch fix the order: resume skips the same batches


def test_rank_sampler_refuses_what_it_cannot_split() -> None:
    from model.rank_sampler import RankShardSampler

    with pytest.raises(ValueError, match="2 shard\\(s\\) for 3 ranks"):
        RankShardSampler([5] * 8, [True] * 8, [0] * 4 + [1] * 4, global_batch=6, ranks=3, micro_batch=2)
    with pytest.raises(ValueError, match="global batch 8 is not ranks 3"):
        RankShardSampler([5] * 8, [True] * 8, list(range(8)), global_batch=8, ranks=3, micro_batch=2)

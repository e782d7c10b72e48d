"""Streamed training over several ranks: each rank reads only its own shards of the epoch.

    sampler = RankShardSampler(lengths, is_visual, shard_of, global_batch=256, ranks=32, micro_batch=4)
    DataLoader(dataset, batch_size=4, sampler=sampler)   # accelerate gives rank r the chunks r, r+32, ...

ShardWindowSampler (model/batching.py) builds *global* batches, and accelerate splits each among the
ranks, so over an epoch every rank reads every shard: each node fetches the whole stage from S3. Here
the shards are shuffled per epoch (seed, epoch) and dealt out, rank r owning shards[r::ranks]. Each rank
groups its own shards, `window_shards` at a time, as LLaVA-NeXT's group_by_modality_length does: one
modality per batch, length-sorted megabatches, the two modalities' leftovers together in a mixed batch,
the batches shuffled. A rank's batch is its share of a global step (global_batch / ranks samples), so a
step still holds `global_batch` samples. The flat index stream interleaves the ranks' micro-batches in
the order accelerate's BatchSamplerShard deals chunks of `micro_batch` (chunk j to rank j % ranks), so
the Trainer and its resume (skip the first batches) work unchanged.

Every rank takes the same number of steps in every epoch, fixed from the shard sizes alone
(`steps_per_epoch`), so the epoch length, and with it the resume arithmetic, is the same whatever the
shuffle. A rank with fewer samples repeats some of its own last window's samples to fill its steps (the
shard is still cached): at most one batch per window and the difference in shard sizes; every sample
comes at least once per epoch. With fewer shards than ranks, ownership is impossible: ValueError (use
ShardWindowSampler, which the train step then falls back to).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import numpy as np

from model.batching import ModalityLengthGroupedSampler, samples_by_shard


class RankShardSampler(ModalityLengthGroupedSampler):
    def __init__(self, lengths: Sequence[int], is_visual: Sequence[bool], shard_of: Sequence[int], global_batch: int,
                 ranks: int, micro_batch: int, window_shards: int = 8, megabatch_batches: int = 16, seed: int = 0):
        share, remainder = divmod(global_batch, ranks)
        if remainder or share % micro_batch:
            raise ValueError(f"global batch {global_batch} is not ranks {ranks} x a multiple of micro batch {micro_batch}")
        super().__init__(lengths, is_visual, share, megabatch_batches, seed)  # batches of one rank's share
        if len(shard_of) != len(lengths):
            raise ValueError("shard_of and lengths differ in size")
        self.by_shard = samples_by_shard(shard_of)
        if len(self.by_shard) < ranks:
            raise ValueError(f"{len(self.by_shard)} shard(s) for {ranks} ranks: a rank would own none")
        self.ranks, self.micro, self.window_shards = ranks, micro_batch, max(1, window_shards)
        self.steps = self.steps_per_epoch()

    def steps_per_epoch(self) -> int:
        """An upper bound of any rank's batches in any epoch, from the shard sizes alone: the most samples a
        rank can own (the ceil(S / ranks) largest shards) in batches, plus one partial batch per window."""
        owned = math.ceil(len(self.by_shard) / self.ranks)
        most = sum(sorted((len(v) for v in self.by_shard.values()), reverse=True)[:owned])
        return math.ceil(most / self.batch_size) + math.ceil(owned / self.window_shards)

    def __len__(self) -> int:
        return self.steps * self.batch_size * self.ranks

    def rank_batches(self, rank: int) -> Iterator[list[int]]:
        """Rank `rank`'s `steps` batches of the epoch from the shards it owns, lazily, a window at a time
        (the first batch costs one window's grouping, not the epoch's)."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{rank}")  # the same on every process, its own per rank
        shards = self.owned_shards(rank)
        rng.shuffle(shards)
        made, last = 0, []
        for start in range(0, len(shards), self.window_shards):
            last = np.concatenate([self.by_shard[s] for s in shards[start: start + self.window_shards]]).tolist()
            grouped = self._grouped(last, rng)
            full = [b for b in grouped if len(b) == self.batch_size]
            mixed = [i for b in grouped if len(b) < self.batch_size for i in b]  # the modalities' leftovers
            full += [mixed[at: at + self.batch_size] for at in range(0, len(mixed), self.batch_size)]
            if len(full[-1]) < self.batch_size:  # fill from the window's own samples: its shards are cached
                taken = set(full[-1])
                pad = [i for i in last if i not in taken] or last
                full[-1] += [pad[k % len(pad)] for k in range(self.batch_size - len(full[-1]))]
            made += len(full)
            if made > self.steps:
                raise AssertionError(f"rank {rank}: {made} batches > steps_per_epoch {self.steps}")
            yield from full
        # the repeats that fill the epoch: from the last window, one modality after the other
        spare = rng.sample(last, len(last))
        spare = [i for i in spare if self.is_visual[i]] + [i for i in spare if not self.is_visual[i]]
        for n in range(self.steps - made):
            yield [spare[(n * self.batch_size + k) % len(spare)] for k in range(self.batch_size)]

    def owned_shards(self, rank: int) -> list[int]:
        """The shards rank `rank` reads this epoch (dealt from the epoch's shuffle)."""
        shards = sorted(self.by_shard)
        random.Random(self.seed * 1000003 + self.epoch).shuffle(shards)
        return sorted(shards[rank::self.ranks])

    def batches(self) -> list[list[int]]:
        """The epoch's global batches (rank 0's share, then rank 1's, ...), the order steps take them."""
        streams = [self.rank_batches(r) for r in range(self.ranks)]
        return [[i for batch in step for i in batch] for step in zip(*streams, strict=True)]

    def __iter__(self) -> Iterator[int]:
        streams = [self.rank_batches(r) for r in range(self.ranks)]
        for step in zip(*streams, strict=True):  # chunk j of `micro` indices goes to rank j % ranks (accelerate)
            for at in range(0, self.batch_size, self.micro):
                for batch in step:
                    yield from batch[at: at + self.micro]

"""The train step's held-out split (model.train.split_holdout).

    .venv/bin/python -m pytest tests/unit/test_train_split.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.train import split_holdout


@pytest.mark.parametrize("n, holdout, streamed", [(1000, 16, False), (1000, 16, True), (35, 8, False), (5, 2, True)])
def test_the_held_out_split_is_seeded_disjoint_and_from_the_last_shards(n: int, holdout: int, streamed: bool) -> None:
    """split_holdout: arrays (no Python list per sample) holding what the list-and-set version held: the
    same seeded choice, at most n // 10, disjoint from training and covering the stage; streamed, from the
    10 x holdout samples of the last shards only."""
    shard_of = np.repeat(np.arange(n // 5 + 1), 5)[:n][::-1].copy() if streamed else None  # last shards first
    train, held = split_holdout(n, holdout, seed=7, shard_of=shard_of)
    # the reference: the former list-and-set formulation
    k = min(holdout, n // 10)
    candidates = sorted(np.argsort(-shard_of, kind="stable")[:10 * k].tolist()) if streamed else list(range(n))
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(7))
    expected = {candidates[j] for j in order[:k].tolist()}
    assert held.tolist() == sorted(expected) and train.tolist() == [i for i in range(n) if i not in expected]
    assert train.dtype == held.dtype == np.int64 and len(held) == k
    if streamed and k:  # the last shards are where shard_of is largest
        assert shard_of[held].min() >= np.sort(shard_of)[::-1][10 * k - 1]
    assert split_holdout(n, holdout, seed=7, shard_of=shard_of)[1].tolist() == held.tolist()

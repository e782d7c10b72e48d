"""Reading one mixture entry in order: LLaVA-NeXT's sampling by index, each record's media, and the
checks in worker processes with the input order kept (so nothing downstream depends on the worker count).

    selected, available = select_indices("random:10%", source.count, seed)
    for (raw, media), verdict in checked_stream(source, selected, limits, workers=2):
        ...                                  # in index order; verdict.reason_code None = passed the checks

Used by one-pod curation (core.py) and by each partition pod of a fanned-out one (partition.py).
"""

from __future__ import annotations

import functools
import itertools
import random
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

from components.curate.checks import Limits, Verdict, check_item
from components.curate.sources import MediaMissing, RawRecord, Source, check_relative

T = TypeVar("T")
R = TypeVar("R")


def select_indices(strategy: str, count: Callable[[], int], seed: int) -> tuple[Callable[[int], bool], int | None]:
    """(is index selected, source size or None) for LLaVA-NeXT `sampling_strategy`; counts only if needed."""
    if strategy == "all":
        return (lambda i: True), None
    how, amount = strategy.split(":")
    n = int(amount.rstrip("%"))
    total = count() if (amount.endswith("%") or how in ("end", "random")) else None
    k = n if total is None else min(total, round(total * n / 100) if amount.endswith("%") else n)
    if how == "first":
        return (lambda i: i < k), total
    if how == "end":
        return (lambda i: i >= total - k), total
    chosen = frozenset(random.Random(seed).sample(range(total), k))  # ints only, never records
    return chosen.__contains__, total


def apply_sampling(records: list[T], strategy: str, seed: int) -> list[T]:
    """select_indices over an in-memory list (records keep their order)."""
    selected, _ = select_indices(strategy, lambda: len(records), seed)
    return [r for i, r in enumerate(records) if selected(i)]


def _map_chunk(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [fn(item) for item in chunk]


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, chunk: int = 16,
                window: int = 4) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in input order; with workers > 1, chunks of `chunk` items go to worker processes
    and at most `window` chunks per worker are in flight (memory stays bounded however long `items` is)."""
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    # spawn, not fork: the parent may hold torch/MLflow threads, and a forked lock never wakes up.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        pending: deque[tuple[list[T], Any]] = deque()
        iterator = iter(items)
        while True:
            batch = list(itertools.islice(iterator, chunk))
            if batch:
                pending.append((batch, pool.submit(_map_chunk, fn, batch)))
            if pending and (not batch or len(pending) >= window * workers):
                done, future = pending.popleft()
                yield from zip(done, future.result())
            if not batch and not pending:
                return


def media_of(raw: RawRecord, source: Source) -> dict[str, bytes | str]:
    """Each media path of the record -> its bytes, or the message saying why it has none."""
    record = raw.record
    if not isinstance(record, dict):
        return {}
    media: dict[str, bytes | str] = {}
    for key in ("image", "video"):
        value = record.get(key)
        for rel in [value] if isinstance(value, str) else (value if isinstance(value, list) else []):
            if not isinstance(rel, str) or rel in media:
                continue
            try:
                media[rel] = raw.media[rel] if rel in raw.media else source.media.read(check_relative(rel))
            except MediaMissing as err:
                media[rel] = str(err)
    return media


def checked_stream(source: Source, selected: Callable[[int], bool], limits: Limits, workers: int,
                   start: int = 0, stop: int = sys.maxsize, on_record: Callable[[], None] | None = None
                   ) -> Iterator[tuple[tuple[RawRecord, dict], Verdict]]:
    """((raw, media), verdict) of each selected record with start <= index < stop, in index order.
    `on_record` is called as each selected record is read (an unreadable one too: it is checked, and
    rejected, in stream order)."""
    def items() -> Iterator[tuple[RawRecord, dict]]:
        for raw in source.records_between(start, stop):
            if not selected(raw.index):
                continue
            if on_record is not None:
                on_record()
            media = media_of(raw, source)
            raw.media = {}  # now in `media`: don't ship the bytes to a worker twice
            yield raw, media

    return ordered_map(functools.partial(check_item, limits=limits), items(), workers)

"""The per-sample index of a shard set: where each sample's members lie in its tar, and what the samplers need.

    table = index_shards(shard_paths)              # tar headers + each record's JSON, read once
    write_index(table, shard_dir / INDEX_NAME)     # curation: index.parquet beside the shards, in the manifest
    index = read_index(shard_dir / INDEX_NAME)     # training: len(), lengths and member offsets, no tar opened
    table, members = open_index(path)              # streamed training: the sampler's columns now, each
    members(row)                                   #   shard's member offsets when it is first read

One row per sample (a tar key with a `.json` member), in shard then member order, the order ShardDataset
numbers samples in. Columns:
- `shard` (tar file name), `key`;
- `members`, `offsets`, `sizes`: the sample's member suffixes (`json`, `img0.png`, `vid0.mp4`...), each
  one's data offset in the tar and its size in bytes;
- `num_tokens`: curation's estimate (`meta.num_tokens`), else LLaVA-NeXT's modality_lengths estimate (words
  of the conversation + 128 per visual input);
- `modality` (`text`, `image`, `multi_image`, `video`), `images` (count), `frames` (video frames the
  curation check sampled; -1 where a record does not say).
Parquet (pyarrow): columnar and compressed, ~40 bytes a sample; 3M samples is ~100 MB. One row group per
group of whole shards (~16k rows), so a reader can take a shard's rows with its group (MemberReader).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

INDEX_NAME = "index.parquet"
VISUAL_TOKENS_ESTIMATE = 128  # per image or video when curation did not count the tokens (LLaVA-NeXT)
SCHEMA = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("members", pa.list_(pa.string())),
    ("offsets", pa.list_(pa.int64())), ("sizes", pa.list_(pa.int64())), ("num_tokens", pa.int32()),
    ("modality", pa.string()), ("images", pa.int16()), ("frames", pa.int32()),
])


def media_of(record: dict[str, Any], field: str) -> list[str]:
    value = record.get(field)
    return [value] if isinstance(value, str) else list(value or [])


def describe(record: dict[str, Any]) -> dict[str, Any]:
    """The sampler's view of one record: num_tokens, modality, images, frames."""
    meta = record.get("meta") or {}
    images, videos = media_of(record, "image"), media_of(record, "video")
    tokens = meta.get("num_tokens")
    if tokens is None:
        words = sum(len(str(turn.get("value", "")).split()) for turn in record.get("conversations", []))
        tokens = words + VISUAL_TOKENS_ESTIMATE * (len(images) + len(videos))
    modality = meta.get("modality") or ("video" if videos else "multi_image" if len(images) > 1
                                        else "image" if images else "text")
    frames = meta.get("frames", 0 if not videos else -1)
    return {"num_tokens": int(tokens), "modality": modality, "images": len(images), "frames": int(frames)}


def index_shards(shards: Sequence[str | Path]) -> pa.Table:
    """Scan tar shards (headers, and each sample's JSON) into the index table."""
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for shard in shards:
        grouped: dict[str, dict[str, tuple[int, int]]] = {}
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isfile():
                    key, _, suffix = Path(member.name).name.partition(".")
                    grouped.setdefault(key, {})[suffix] = (member.offset_data, member.size)
        with open(shard, "rb") as stream:
            for key, members in grouped.items():
                if "json" not in members:
                    continue
                offset, size = members["json"]
                stream.seek(offset)
                described = describe(json.loads(stream.read(size)))
                for name, value in (("shard", Path(shard).name), ("key", key), ("members", list(members)),
                                    ("offsets", [o for o, _ in members.values()]),
                                    ("sizes", [s for _, s in members.values()]), *described.items()):
                    rows[name].append(value)
    return pa.table(rows, schema=SCHEMA)


# a row group: whole shards, at least this many rows (the last one fewer). Measured at 200k rows: with 16k-row
# groups the sampler's columns of all groups read in 5.5 ms and one group's member lists in 1.7 ms; with 65k-row
# groups, 4.3 ms and 5 ms (the first batch reads ~4 groups)
ROWS_PER_GROUP = 1 << 14


def write_index(table: pa.Table, path: str | Path) -> Path:
    """Write the index in row groups of whole shards (rows in shard order, ~16k rows a group), so that
    training reads a shard's member offsets when it first reaches the shard (MemberReader) instead of all
    of them at start; not one group per shard, because each group adds to reading the sampler's columns."""
    codes = pc.dictionary_encode(table.column("shard")).combine_chunks().indices.to_numpy()
    shard_starts = [*(np.flatnonzero(np.diff(codes)) + 1).tolist(), table.num_rows]
    with pq.ParquetWriter(path, SCHEMA, compression="zstd") as writer:
        start = 0
        for stop in shard_starts:  # close a group at a shard boundary once it is big enough, and at the end
            if stop - start >= ROWS_PER_GROUP or stop == table.num_rows:
                if stop > start:
                    writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)
                start = stop
    return Path(path)


MEMBER_COLUMNS = ["members", "offsets", "sizes"]
SAMPLER_COLUMNS = ["shard", "num_tokens", "modality"]


class MemberReader:
    """Each sample's members (suffix -> (offset, size)) from an index whose row groups hold whole shards,
    read a row group at a time on first use and kept for the last `keep` groups: opening a stage reads
    only the columns the sampler needs (SAMPLER_COLUMNS), so start-up and memory do not grow with the
    stage's member lists. Opens the file once per process (DataLoader workers fork)."""

    def __init__(self, path: str | Path, group_starts: np.ndarray, keep: int = 4):
        self.path, self.starts, self.keep = str(path), group_starts, keep  # (G,) first row of each group
        self._file: pq.ParquetFile | None = None
        self._pid = -1
        self._groups: dict[int, tuple[pa.Array, pa.Array, pa.Array]] = {}

    def __call__(self, row: int) -> dict[str, tuple[int, int]]:
        group = int(np.searchsorted(self.starts, row, side="right")) - 1
        columns = self._groups.pop(group, None) or self._read(group)
        self._groups[group] = columns  # most recent last
        if len(self._groups) > self.keep:
            self._groups.pop(next(iter(self._groups)))
        at = row - int(self.starts[group])
        members, offsets, sizes = (column[at].as_py() for column in columns)
        return dict(zip(members, zip(offsets, sizes)))

    def __getstate__(self) -> dict[str, Any]:  # a spawned DataLoader worker opens the file itself
        return {**self.__dict__, "_file": None, "_pid": -1, "_groups": {}}

    def _read(self, group: int) -> tuple[pa.Array, pa.Array, pa.Array]:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid, self._groups = pq.ParquetFile(self.path), os.getpid(), {}
        table = self._file.read_row_group(group, columns=MEMBER_COLUMNS)
        return tuple(table.column(name).combine_chunks() for name in MEMBER_COLUMNS)  # type: ignore[return-value]


def open_index(path: str | Path) -> tuple[pa.Table, MemberReader | None]:
    """(the sampler's columns, a MemberReader) when `path`'s row groups hold whole shards (write_index);
    else (the whole index, None): an index written before, read in one call as read_index does."""
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable shard index ({err})") from None
    missing = [name for name in SCHEMA.names if name not in meta.schema.to_arrow_schema().names]
    if missing:
        raise ValueError(f"{path}: not a shard index (no column {', '.join(missing)})")
    # dictionary-encoded, as parquet stores them: no string per row (3M rows: no 3M Python-side strings)
    light = pq.read_table(path, columns=SAMPLER_COLUMNS, read_dictionary=["shard", "modality"]).unify_dictionaries()
    codes = light.column("shard").combine_chunks().indices.to_numpy()
    rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64) if rows else np.zeros(0, np.int64)
    runs = np.flatnonzero(np.diff(codes)) + 1  # where a shard's rows end and the next one's begin
    run_starts, run_ends = np.concatenate([[0], runs]), np.concatenate([runs, [len(codes)]]) - 1
    group = lambda at: np.searchsorted(starts, at, side="right")  # noqa: E731 - the row group holding row `at`
    one_run_each = len(set(codes[run_starts].tolist())) == len(run_starts)  # every shard's rows together
    if len(codes) and one_run_each and np.array_equal(group(run_starts), group(run_ends)):
        return light, MemberReader(path, starts)  # and no shard spans two row groups
    return read_index(path), None


def read_index(path: str | Path) -> pa.Table:
    """The index table; ValueError naming the file if it is not one (another schema, a broken file)."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable shard index ({err})") from None
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not a shard index (no column {', '.join(missing)})")
    return table.select(SCHEMA.names)

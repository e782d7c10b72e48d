"""The per-sample index of a shard set: where each sample's members lie in its tar, and what the samplers need.

    table = index_shards(shard_paths)              # tar headers + each record's JSON, read once
    write_index(table, shard_dir / INDEX_NAME)     # curation: index.parquet beside the shards, in the manifest
    index = read_index(shard_dir / INDEX_NAME)     # training: len(), lengths and member offsets, no tar opened

One row per sample (a tar key with a `.json` member), in shard then member order, the order ShardDataset
numbers samples in. Columns:
- `shard` (tar file name), `key`;
- `members`, `offsets`, `sizes`: the sample's member suffixes (`json`, `img0.png`, `vid0.mp4`...), each
  one's data offset in the tar and its size in bytes;
- `num_tokens`: curation's estimate (`meta.num_tokens`), else LLaVA-NeXT's modality_lengths estimate (words
  of the conversation + 128 per visual input);
- `modality` (`text`, `image`, `multi_image`, `video`), `images` (count), `frames` (video frames the
  curation check sampled; -1 where a record does not say).
Parquet (pyarrow): columnar and compressed, ~40 bytes a sample, read in one call; 3M samples is ~100 MB.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
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


def write_index(table: pa.Table, path: str | Path) -> Path:
    pq.write_table(table, path, compression="zstd")
    return Path(path)


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

"""Curation's shard writer: LLaVA records and their media as WebDataset tar shards, with their index.

    paths = write_shards(samples, "out/shards", max_per_shard=1000)   # samples: (record, {media path: bytes})

The tars are byte for byte what webdataset's `ShardWriter(..., mtime=0, verbose=0)` writes (the same member
names and order, headers, shard boundaries; tests/unit/test_shards.py compares the bytes with webdataset's
own). They are written with the standard library's tarfile because `import webdataset` imports torch: 1.4 s
at the start of every curate task and partition pod, which need nothing else of torch (bench_pipeline).
The index (model/shard_index.py) is taken as the members are written: no tar is read back.

Each sample is a group of members sharing a key: `<key>.json` (the LLaVA record, its media paths rewritten
to member names such as `img0.png`) and `<key>.img0.png`, `<key>.vid0.mp4`, ...
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from model.shard_index import INDEX_NAME, SCHEMA, describe, index_shards, write_index

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# webdataset's TarWriter defaults: read-only members of user and group "bigdata"
MEMBER_MODE, MEMBER_OWNER = 0o444, "bigdata"


def shard_key(sample_id: str, index: int) -> str:
    """A tar-safe key: webdataset splits member names at the first dot, so no dots or slashes."""
    return f"{index:09d}_{_KEY_UNSAFE.sub('-', sample_id)[:80]}"


def sample_members(record: Mapping[str, Any], media: Mapping[str, bytes]) -> dict[str, bytes]:
    """{member suffix: bytes} of one sample: its media as img<i>.<ext> / vid<i>.<ext>, and the record as
    `json` with its media paths rewritten to those names. ValueError naming the record and path when
    `media` lacks the bytes of one of its paths."""
    record = dict(record)
    members: dict[str, bytes] = {}
    for field, tag in (("image", "img"), ("video", "vid")):
        paths = record.get(field)
        if paths is None:
            continue
        names = []
        for i, path in enumerate([paths] if isinstance(paths, str) else paths):
            ext = Path(path).suffix.lower().lstrip(".") or "bin"
            name = f"{tag}{i}.{ext}"
            if path not in media:
                raise ValueError(f"record {record.get('id')!r}: no bytes given for its {field} {path!r}")
            members[name] = media[path]
            names.append(name)
        record[field] = names[0] if isinstance(paths, str) else names
    members["json"] = json.dumps(record).encode()
    return members


class _Shards:
    """Consecutive tar files `<prefix>-%06d.tar`; the next opens once one holds `max_count` samples or
    `max_bytes` of member data (webdataset's ShardWriter rule: checked before a sample is written, so the
    first shard exists even when no sample comes)."""

    def __init__(self, out: Path, prefix: str, max_count: int, max_bytes: int) -> None:
        self.out, self.prefix, self.max_count, self.max_bytes = out, prefix, max_count, max_bytes
        self.number, self.count, self.size = 0, 0, 0
        self.written: list[Path] = []
        self.rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}  # the index, as written
        self.file: BinaryIO | None = None
        self.tar: tarfile.TarFile | None = None
        self._next()

    def _close(self) -> None:
        if self.tar is not None:
            self.tar.close()  # stream mode: writes the end blocks, padded to a whole record
            self.file.close()
            self.tar = self.file = None

    def _next(self) -> None:
        self._close()
        self.written.append(self.out / f"{self.prefix}-{self.number:06d}.tar")
        self.file = open(self.written[-1], "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w|")
        self.number, self.count, self.size = self.number + 1, 0, 0

    def write(self, key: str, members: Mapping[str, bytes], described: Mapping[str, Any]) -> None:
        """One sample's members; `described`: its index columns (shard_index.describe of its record)."""
        if self.count >= self.max_count or self.size >= self.max_bytes:
            self._next()
        suffixes, offsets = sorted(members), []  # webdataset writes a sample's members in name order
        for suffix in suffixes:
            data = members[suffix]
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, MEMBER_MODE
            info.uname = info.gname = MEMBER_OWNER
            self.tar.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            offsets.append(self.tar.offset - padded)  # the data follows the header(s) the member took
            self.size += len(data)
        self.count += 1
        for name, value in (("shard", self.written[-1].name), ("key", key), ("members", suffixes),
                            ("offsets", offsets), ("sizes", [len(members[x]) for x in suffixes]), *described.items()):
            self.rows[name].append(value)

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()


def write_shards(samples: Iterable[tuple[dict[str, Any], Mapping[str, bytes]]], out_dir: str | Path,
                 max_per_shard: int = 1000, prefix: str = "shard", max_bytes: int = 3 << 30) -> list[Path]:
    """Write (record, {original media path: bytes}) pairs as tar shards, and their index (index.parquet,
    model/shard_index.py); returns the shard paths.

    A shard closes at `max_per_shard` samples or `max_bytes`. Member times are fixed (mtime 0), so the
    same samples give byte-identical shards.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _Shards(out, prefix, max_per_shard, max_bytes) as shards:
        for index, (record, media) in enumerate(samples):
            # describe() counts the media and reads meta: the same for the record as for its rewritten copy
            shards.write(shard_key(str(record["id"]), index), sample_members(record, media), describe(record))
    every = sorted(out.glob("*.tar"))  # the index covers every tar of the folder
    # the rows taken while writing (no tar read back), unless the folder holds tars of another prefix
    table = pa.Table.from_pydict(shards.rows, schema=SCHEMA) if every == shards.written else index_shards(every)
    write_index(table, out / INDEX_NAME)
    return sorted(out.glob(f"{prefix}-*.tar"))

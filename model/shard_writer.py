"""Curation's shard writer: LLaVA records and their media as WebDataset tar shards, with their index.

    paths = write_shards(samples, "out/shards", max_per_shard=1000)   # samples: (record, {media path: bytes})

The tars are byte for byte what webdataset's `ShardWriter(..., mtime=0, verbose=0)` writes (the same member
names and order, headers, shard boundaries; tests/unit/test_shards.py compares the bytes with webdataset's
own). They are not written through webdataset because `import webdataset` imports torch: 1.4 s at the start
of every curate task and partition pod, which need nothing else of torch (bench_pipeline). Nor through
tarfile.addfile: per member it copies the TarInfo, keeps it in a list and pushes the data through its stream
buffer 10 KiB at a time, ~0.1 ms of the curation parent's time per member, which all of its workers wait on
(bench_curation). Each header is the one tarfile makes (`member_header`: for an ASCII name of up to 100
bytes, tarfile's ustar header filled in; any other name goes through `TarInfo.tobuf`, pax records and all),
the data follows it, padded to a block, and the end is tarfile's: two zero blocks, padded to a record.
The index (model/shard_index.py) is taken as the members are written: no tar is read back.

Each sample is a group of members sharing a key: `<key>.json` (the LLaVA record, its media paths rewritten
to member names such as `img0.png`) and `<key>.img0.png`, `<key>.vid0.mp4`, ...
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from model.shard_index import INDEX_NAME, SCHEMA, describe, index_shards, write_index

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# webdataset's TarWriter defaults: read-only members of user and group "bigdata"
MEMBER_MODE, MEMBER_OWNER = 0o444, "bigdata"
BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, MEMBER_MODE
    info.uname = info.gname = MEMBER_OWNER
    return info


_USTAR = bytearray(_tarinfo("", 0).tobuf(tarfile.PAX_FORMAT))  # name and size to fill, checksum to redo
_SIZE, _CHECKSUM = slice(124, 136), slice(148, 156)  # ustar fields (the name is bytes 0-99)
_MAX_SIZE = 8 ** 11  # the ustar size field's octal digits; a larger member takes a pax record


def member_header(name: str, size: int) -> bytes:
    """The header tarfile writes for a member of `size` bytes named `name` (PAX format, mtime 0, mode 0444,
    owner bigdata): without pax records when the name is ASCII and at most 100 bytes, so the ustar fields
    hold everything; else tarfile's own, pax records and all."""
    if not name.isascii() or len(name) > 100 or size >= _MAX_SIZE:
        return _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT)
    header = bytearray(_USTAR)
    header[:len(name)] = name.encode("ascii")
    header[_SIZE] = b"%011o\0" % size
    header[_CHECKSUM] = b"        "  # the checksum is summed over its field as eight spaces
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


class _Tar:
    """One tar file, the bytes tarfile's stream mode ("w|") writes for the same members."""

    def __init__(self, path: Path) -> None:
        self.file, self.offset = open(path, "wb"), 0

    def add(self, name: str, data: bytes) -> int:
        """Append a member; returns the offset of its data."""
        header = member_header(name, len(data))
        self.file.write(header)
        start = self.offset + len(header)
        self.file.write(data)
        padding = -len(data) % BLOCK
        self.file.write(b"\0" * padding)
        self.offset = start + len(data) + padding
        return start

    def close(self) -> None:
        end = self.offset + 2 * BLOCK  # two zero blocks, then zeros to a whole record (tar -b20)
        self.file.write(b"\0" * (2 * BLOCK + -end % RECORD))
        self.file.close()


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
        self.tar: _Tar | None = None
        self._next()

    def _close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None

    def _next(self) -> None:
        self._close()
        self.written.append(self.out / f"{self.prefix}-{self.number:06d}.tar")
        self.tar = _Tar(self.written[-1])
        self.number, self.count, self.size = self.number + 1, 0, 0

    def write(self, key: str, members: Mapping[str, bytes], described: Mapping[str, Any]) -> None:
        """One sample's members; `described`: its index columns (shard_index.describe of its record)."""
        if self.count >= self.max_count or self.size >= self.max_bytes:
            self._next()
        suffixes, offsets = sorted(members), []  # webdataset writes a sample's members in name order
        for suffix in suffixes:
            data = members[suffix]
            offsets.append(self.tar.add(f"{key}.{suffix}", data))
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

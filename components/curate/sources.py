"""Stream the records of one data-mixture entry, with a way to fetch their media: memory stays flat.

    source = open_source(DataSource(json_path="data/llava.jsonl", media_root="data/images.tar"), work)
    for item in source.records():          # RawRecord(index, record | None, error | None, raw, media)
        data = source.media.read("coco/0001.jpg")

Readers: LLaVA JSON lists (ijson, item by item) and JSONL (line by line; a line that is not UTF-8 or
not JSON is a rejected record, not a failed source), parquet with embedded image bytes in the layout of
`lmms-lab/LLaVA-OneVision-Data` (`id`, `image: {bytes, path}`, `conversations`, `data_source`; read a
row group at a time), and the seeded synthetic shapes world. Media resolve against a folder or a tar
file, local or `s3://`. Paths are `s3://`-aware everywhere; remote files are fetched once into `work`.
A source that cannot be read at all raises CurationError; a bad record is yielded with its error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

from onevision import storage
from onevision.recipe import DataSource

SYNTHETIC_DEFAULT_N = 1000
PARQUET_BATCH_ROWS = 64  # rows decoded at a time: bounds memory to ~64 images per reader
MAX_MEDIA_BYTES = 512 << 20


class CurationError(ValueError):
    """A data source cannot be read at all (as opposed to a bad record, which is rejected and kept)."""


class MediaMissing(LookupError):
    """A record names a media file that its media store does not have."""


@dataclass
class RawRecord:
    """One record as read: `record` is the parsed dict (or any JSON value), or None with `error` set."""

    index: int
    record: Any
    error: str | None = None
    raw: str | None = None  # what could not be parsed, for the quarantine
    media: dict[str, bytes] = field(default_factory=dict)  # embedded media (parquet), by record path


class MediaStore(Protocol):
    def read(self, rel: str) -> bytes: ...


def check_relative(rel: str) -> str:
    """Media paths are relative to their store; anything else could read outside it."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "://" in rel \
            or ".." in PurePosixPath(rel).parts:
        raise MediaMissing(f"media path {rel!r} must be relative to the media root")
    return rel


@dataclass
class DirMedia:
    root: str  # local folder or s3:// prefix

    def read(self, rel: str) -> bytes:
        check_relative(rel)
        uri = storage.join(self.root, rel)
        try:
            if storage.is_s3(uri):
                return storage.read_bytes(uri)
            if Path(uri).stat().st_size > MAX_MEDIA_BYTES:
                raise MediaMissing(f"media file {rel} is over {MAX_MEDIA_BYTES} bytes")
            return Path(uri).read_bytes()
        except (OSError, storage.StorageNotFoundError):
            raise MediaMissing(f"media file {rel} is missing") from None


class TarMedia:
    """Members of one tar file by name, read by offset (the index holds names and offsets only)."""

    def __init__(self, path: Path):
        self.path = path
        self.index: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(path, "r:") as tar:  # uncompressed only: random access needs offsets
                for member in tar:
                    if member.isfile():
                        self.index[member.name.removeprefix("./")] = (member.offset_data, member.size)
        except tarfile.TarError as err:
            raise CurationError(f"{path}: not a readable uncompressed tar ({err})") from None

    def read(self, rel: str) -> bytes:
        check_relative(rel)
        if rel not in self.index:
            raise MediaMissing(f"media file {rel} is missing from {self.path.name}")
        offset, size = self.index[rel]
        if size > MAX_MEDIA_BYTES:
            raise MediaMissing(f"media file {rel} is over {MAX_MEDIA_BYTES} bytes")
        with open(self.path, "rb") as stream:
            stream.seek(offset)
            return stream.read(size)


class NoMedia:
    def read(self, rel: str) -> bytes:
        raise MediaMissing(f"media file {rel} is missing (parquet rows carry their images embedded)")


def fetch(uri: str, work: Path) -> Path:
    """A local path for a local path or an s3:// object (downloaded once into work/fetched)."""
    if not storage.is_s3(uri):
        if not Path(uri).exists():
            raise CurationError(f"{uri}: no such file")
        return Path(uri)
    local = work / "fetched" / hashlib.sha256(uri.encode()).hexdigest()[:16] / PurePosixPath(uri).name
    if not local.exists():
        try:
            storage.get_file(uri, local)
        except storage.StorageNotFoundError:
            raise CurationError(f"{uri}: no such object") from None
    return local


def _media_store(root: str, work: Path) -> MediaStore:
    if root.endswith(".tar"):
        return TarMedia(fetch(root, work))
    return DirMedia(root)


class Source:
    """One mixture entry: `records()` streams RawRecords; `count()` without keeping them."""

    name: str
    media: MediaStore

    def records(self) -> Iterator[RawRecord]:
        raise NotImplementedError

    def count(self) -> int:
        return sum(1 for _ in self.records())


class JsonlSource(Source):
    def __init__(self, path: Path, name: str, media: MediaStore):
        self.path, self.name, self.media = path, name, media

    def records(self) -> Iterator[RawRecord]:
        with open(self.path, "rb") as stream:
            index = 0
            for line in stream:
                if not line.strip():
                    continue
                try:
                    yield RawRecord(index, json.loads(line.decode("utf-8")))
                except UnicodeDecodeError as err:
                    yield RawRecord(index, None, f"invalid UTF-8 at byte {err.start} of the line",
                                    line.decode("utf-8", "backslashreplace"))
                except json.JSONDecodeError as err:
                    yield RawRecord(index, None, f"not valid JSON ({err.msg})", line.decode("utf-8", "replace"))
                index += 1


class JsonListSource(Source):
    def __init__(self, path: Path, name: str, media: MediaStore):
        self.path, self.name, self.media = path, name, media

    def records(self) -> Iterator[RawRecord]:
        import ijson

        with open(self.path, "rb") as stream:
            try:
                for index, record in enumerate(ijson.items(stream, "item", use_float=True)):
                    yield RawRecord(index, record)
            except (ijson.JSONError, UnicodeDecodeError) as err:
                # One broken byte desynchronises a JSON list: the rest cannot be trusted.
                raise CurationError(f"{self.path}: not a valid JSON list ({err}); "
                                    "JSONL keeps bad lines as rejected records instead") from None


class ParquetSource(Source):
    """Rows of parquet files (lmms-lab/LLaVA-OneVision-Data layout), one row group batch at a time."""

    def __init__(self, files: list[Path], name: str, media: MediaStore | None = None):
        self.files, self.name, self.media = files, name, media or NoMedia()

    def count(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)

    def records(self) -> Iterator[RawRecord]:
        import pyarrow.parquet as pq

        index = 0
        for path in self.files:
            try:
                parquet = pq.ParquetFile(path)
            except Exception as err:  # pyarrow raises several types for a corrupt file
                raise CurationError(f"{path}: not a readable parquet file ({err})") from None
            missing = {"id", "conversations"} - set(parquet.schema_arrow.names)
            if missing:
                raise CurationError(f"{path}: parquet without column(s) {sorted(missing)}")
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for row in batch.to_pylist():
                    yield _parquet_row(index, row)
                    index += 1


def _parquet_row(index: int, row: dict[str, Any]) -> RawRecord:
    record = {"id": row.get("id"), "conversations": row.get("conversations")}
    if row.get("data_source"):
        record["meta"] = {"data_source": row["data_source"]}
    image = row.get("image")
    if isinstance(image, dict) and image.get("bytes"):
        name = PurePosixPath(image.get("path") or f"{record['id']}.jpg").name
        record["image"] = name
        return RawRecord(index, record, media={name: image["bytes"]})
    return RawRecord(index, record)


class SyntheticSource(JsonListSource):
    pass


def synthetic_world(uri: str, work: Path, seed: int) -> tuple[Path, str]:
    """(world dir, kind) for synthetic://shapes/<kind>[?n=N]; one world per (seed, n), generated once."""
    from model import shapes_world

    parsed = urlparse(uri)
    kind = parsed.path.strip("/")
    if parsed.netloc != "shapes" or kind not in (*shapes_world.KINDS, *shapes_world.EVAL_KINDS):
        raise CurationError(f"{uri}: not synthetic://shapes/<kind> with kind in {shapes_world.KINDS}")
    n = int(parse_qs(parsed.query).get("n", [SYNTHETIC_DEFAULT_N])[0])
    world = work / f"shapes-seed{seed}-n{n}"
    if not (world / "world.json").exists():
        shapes_world.generate_world(world, seed=seed, n_per_kind=n, n_eval=64)
    return world, kind


def _parquet_files(uri: str, work: Path) -> list[Path]:
    if uri.endswith(".parquet"):
        return [fetch(uri, work)]
    if storage.is_s3(uri):
        keys = sorted(u for u in storage.list_uris(uri) if u.endswith(".parquet"))
        return [fetch(u, work) for u in keys]
    return sorted(Path(uri).rglob("*.parquet"))


def open_source(source: DataSource, work: Path, seed: int) -> Source:
    """The reader for one mixture entry (raises CurationError when it cannot be read at all)."""
    name = source.json_path or source.dataset_uri
    if source.dataset_uri is not None:
        uri = source.dataset_uri
        if uri.startswith("synthetic://"):
            world, kind = synthetic_world(uri, work, seed)
            return SyntheticSource(world / f"{kind}.json", uri, DirMedia(str(world)))
        if uri.startswith("hf://datasets/"):
            mirror = os.environ.get("ONEVISION_DATASET_MIRROR")
            if not mirror:
                raise CurationError(f"{uri}: hub datasets are read from a mirror (no internet in pods); "
                                    "set ONEVISION_DATASET_MIRROR to the folder or s3:// prefix holding "
                                    "<id>/<config>/*.parquet")
            uri = storage.join(mirror, uri.removeprefix("hf://datasets/"))
        files = _parquet_files(uri, work)
        if not files:
            raise CurationError(f"{source.dataset_uri}: no .parquet files")
        return ParquetSource(files, name, _media_store(source.media_root, work) if source.media_root else None)
    path = fetch(source.json_path, work)
    root = source.media_root or (str(PurePosixPath(source.json_path).parent) if storage.is_s3(source.json_path)
                                 else str(Path(source.json_path).parent))
    media = _media_store(root, work)
    reader = JsonlSource if source.json_path.endswith(".jsonl") else JsonListSource
    return reader(path, name, media)

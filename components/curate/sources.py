"""Stream the records of one data-mixture entry, with a way to fetch their media: memory stays flat.

    source = open_source(DataSource(json_path="data/llava.jsonl", media_root="data/images.tar"), work)
    for item in source.records():          # RawRecord(index, record | None, error | None, raw, media)
        data = source.media.read("coco/0001.jpg")

Readers: LLaVA JSON lists (ijson, item by item) and JSONL (line by line; a line that is not UTF-8 or
not JSON is a rejected record, not a failed source), parquet with embedded image bytes in the layout of
`lmms-lab/LLaVA-OneVision-Data` (`id`, `image: {bytes, path}`, `conversations`, `data_source`; read a
row group at a time), and the seeded synthetic shapes world. Media resolve against a folder or a tar
file, local or `s3://`. S3 sources are streamed, never copied to disk: JSON and JSONL through buffered
ranged GETs, parquet by its footer and row groups, a media tar indexed in one pass and read member by
member (storage.open_random / read_range), so a node's disk holds no source however large it is. A
source that cannot be read at all raises CurationError (a .json file whose top level is not a list
too); a bad record is yielded with its error. `missing_inputs(source)`: what of an entry's inputs does not
exist, for preflight.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
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
            or ".." in rel.split("/"):  # PurePosixPath(rel).parts has a ".." exactly when this does
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
            with open(uri, "rb") as file:  # one open and fstat: the parent reads every record's media
                if os.fstat(file.fileno()).st_size > MAX_MEDIA_BYTES:
                    raise MediaMissing(f"media file {rel} is over {MAX_MEDIA_BYTES} bytes")
                return file.read()
        except (OSError, storage.StorageNotFoundError):
            raise MediaMissing(f"media file {rel} is missing") from None


class TarMedia:
    """Members of one tar file (local or s3://) by name, read by offset (the index holds names and offsets)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.reader = storage.RangeReader(uri)  # records in tar order: one GET per 8 MiB, not per member
        self.index: dict[str, tuple[int, int]] = {}
        try:
            with storage.open_random(uri) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
                # uncompressed only: random access needs offsets; headers are read, data is skipped
                for member in tar:
                    if member.isfile():
                        self.index[member.name.removeprefix("./")] = (member.offset_data, member.size)
        except tarfile.TarError as err:
            raise CurationError(f"{uri}: not a readable uncompressed tar ({err})") from None

    def read(self, rel: str) -> bytes:
        check_relative(rel)
        if rel not in self.index:
            raise MediaMissing(f"media file {rel} is missing from {PurePosixPath(self.uri).name}")
        offset, size = self.index[rel]
        if size > MAX_MEDIA_BYTES:
            raise MediaMissing(f"media file {rel} is over {MAX_MEDIA_BYTES} bytes")
        return self.reader.read(offset, size)


class NoMedia:
    def read(self, rel: str) -> bytes:
        raise MediaMissing(f"media file {rel} is missing (parquet rows carry their images embedded)")


def require(uri: str) -> str:
    """`uri` itself when the file or object exists; CurationError naming it otherwise."""
    try:
        storage.size(uri)
    except storage.StorageNotFoundError:
        raise CurationError(f"{uri}: no such {'object' if storage.is_s3(uri) else 'file'}") from None
    if not storage.is_s3(uri) and Path(uri).is_dir():  # a folder stats like a file
        raise CurationError(f"{uri}: a folder, not a file")
    return uri


def _media_store(root: str) -> MediaStore:
    if root.endswith(".tar"):
        return TarMedia(require(root))
    return DirMedia(root)


class Source:
    """One mixture entry: `records()` streams RawRecords; `count()` without keeping them."""

    name: str
    media: MediaStore

    def records(self) -> Iterator[RawRecord]:
        raise NotImplementedError

    def count(self) -> int:
        return sum(1 for _ in self.records())

    def records_between(self, start: int, stop: int) -> Iterator[RawRecord]:
        """The records with start <= index < stop (a curation partition); stops reading at `stop`."""
        for raw in self.records():
            if raw.index >= stop:
                return
            if raw.index >= start:
                yield raw


class JsonlSource(Source):
    def __init__(self, uri: str, name: str, media: MediaStore):
        self.uri, self.name, self.media = uri, name, media

    def records(self) -> Iterator[RawRecord]:
        with storage.open_random(self.uri) as stream:
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
    def __init__(self, uri: str, name: str, media: MediaStore):
        self.uri, self.name, self.media = uri, name, media

    def records(self) -> Iterator[RawRecord]:
        import ijson

        with storage.open_random(self.uri) as stream:
            _require_list(stream, self.uri)
            try:
                for index, record in enumerate(ijson.items(stream, "item", use_float=True)):
                    yield RawRecord(index, record)
            except (ijson.JSONError, UnicodeDecodeError) as err:
                # One broken byte desynchronises a JSON list: the rest cannot be trusted.
                raise CurationError(f"{self.uri}: not a valid JSON list ({err}); "
                                    "JSONL keeps bad lines as rejected records instead") from None


_JSON_KINDS = {b"{": "a JSON object", b'"': "a JSON string", b"t": "a JSON boolean", b"f": "a JSON boolean",
               b"n": "JSON null"}


def _require_list(stream: Any, uri: str) -> None:
    """Refuse a .json source whose top level is not a list: ijson would find no `item` in an object and
    the stage would be curated as 0 records. Reads past leading whitespace only (insignificant in JSON)."""
    while (head := stream.peek(1)[:1]) and head.isspace():
        stream.read(1)
    if head == b"[":
        return
    what = "an empty file" if not head else _JSON_KINDS.get(head, "not a JSON list")
    raise CurationError(f"{uri}: {what}, not a list of records; give a JSON list of records ([{{...}}, ...]) "
                        "or JSONL (one record per line, named .jsonl)")


class ParquetSource(Source):
    """Rows of parquet files (lmms-lab/LLaVA-OneVision-Data layout), one row group batch at a time."""

    def __init__(self, files: list[str], name: str, media: MediaStore | None = None):
        self.files, self.name, self.media = files, name, media or NoMedia()

    @contextmanager
    def _open(self, uri: str) -> Iterator[Any]:
        import pyarrow.parquet as pq

        with storage.open_random(uri) as stream:
            try:
                parquet = pq.ParquetFile(stream)
            except Exception as err:  # pyarrow raises several types for a corrupt file
                raise CurationError(f"{uri}: not a readable parquet file ({err})") from None
            yield parquet

    def count(self) -> int:
        total = 0
        for uri in self.files:
            with self._open(uri) as parquet:  # the footer only
                total += parquet.metadata.num_rows
        return total

    def records(self) -> Iterator[RawRecord]:
        return self.records_between(0, sys.maxsize)

    def records_between(self, start: int, stop: int) -> Iterator[RawRecord]:
        """Reads only the row groups that hold rows [start, stop): a partition pod of a terabyte source
        fetches its share of the media, not all of it."""
        offset = 0  # index of the file's first row
        for uri in self.files:
            if offset >= stop:
                return
            with self._open(uri) as parquet:
                missing = {"id", "conversations"} - set(parquet.schema_arrow.names)
                if missing:
                    raise CurationError(f"{uri}: parquet without column(s) {sorted(missing)}")
                groups, index = [], None  # the row groups overlapping [start, stop); the first one's index
                for group in range(parquet.metadata.num_row_groups):
                    rows = parquet.metadata.row_group(group).num_rows
                    if offset + rows > start and offset < stop:
                        index = offset if index is None else index
                        groups.append(group)
                    offset += rows
                if not groups:
                    continue
                batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups)
                while index < stop:
                    try:  # a footer that reads can still front a corrupt row group
                        batch = next(batches, None)
                    except (OSError, ValueError) as err:  # pyarrow's ArrowIOError, ArrowInvalid...
                        raise CurationError(f"{uri}: parquet data unreadable after row {index} ({err})") from None
                    if batch is None:
                        break
                    for row in batch.to_pylist():
                        if start <= index < stop:
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
    """(world dir, kind) for synthetic://shapes/<kind>[?n=N]; one world per (seed, n), generated once.
    `ov_mix[?n=N&tile=T]` is a world of its own (model.shapes_world.generate_ov_mix)."""
    from model import shapes_world

    parsed = urlparse(uri)
    kind = parsed.path.strip("/")
    if parsed.netloc == "shapes" and kind == "ov_mix":  # its own world: the OneVision-shaped mix at a tile size
        query = parse_qs(parsed.query)
        n, tile = int(query.get("n", [SYNTHETIC_DEFAULT_N])[0]), int(query.get("tile", [56])[0])
        world = work / f"shapes-ov_mix-seed{seed}-n{n}-tile{tile}"
        if not (world / "world.json").exists():
            shapes_world.generate_ov_mix(world, n, seed=seed, tile=tile)
        return world, kind
    if parsed.netloc != "shapes" or kind not in (*shapes_world.KINDS, *shapes_world.EVAL_KINDS):
        raise CurationError(f"{uri}: not synthetic://shapes/<kind> with kind in {shapes_world.KINDS}")
    n = int(parse_qs(parsed.query).get("n", [SYNTHETIC_DEFAULT_N])[0])
    world = work / f"shapes-seed{seed}-n{n}"
    if not (world / "world.json").exists():
        shapes_world.generate_world(world, seed=seed, n_per_kind=n, n_eval=64)
    return world, kind


def _parquet_files(uri: str) -> list[str]:
    if uri.endswith(".parquet"):
        return [require(uri)]
    if storage.is_s3(uri):
        return sorted(u for u in storage.list_uris(uri) if u.endswith(".parquet"))
    return [str(p) for p in sorted(Path(uri).rglob("*.parquet"))]


def _hub_mirror(uri: str) -> str:
    """Where an hf://datasets/<id>/<config> source is read: the mirror in ONEVISION_DATASET_MIRROR."""
    mirror = os.environ.get("ONEVISION_DATASET_MIRROR")
    if not mirror:
        raise CurationError(f"{uri}: hub datasets are read from a mirror (no internet in pods); "
                            "set ONEVISION_DATASET_MIRROR to the folder or s3:// prefix holding "
                            "<id>/<config>/*.parquet")
    return storage.join(mirror, uri.removeprefix("hf://datasets/"))


def missing_inputs(source: DataSource) -> list[str]:
    """Each input of one mixture entry that curation would not find, as `<field> <uri> <why>` (preflight
    names them before any GPU runs). "Exists" as open_source reads it: `json_path` and a `.tar`
    media_root are files or objects; another media_root is a folder, or an S3 prefix with objects under
    it; `dataset_uri` is a .parquet file or a folder/prefix holding some."""
    problems = []
    for name, uri in (("json_path", source.json_path), ("media_root", source.media_root),
                      ("dataset_uri", source.dataset_uri)):
        try:
            why = _input_problem(name, uri) if uri else None
        except storage.StorageNotFoundError:  # the bucket itself
            why = "does not exist (no such bucket)"
        except CurationError as err:
            why = str(err).removeprefix(f"{uri}: ")
        if why:
            problems.append(f"{name} {uri} {why}")
    return problems


def _input_problem(field: str, uri: str) -> str | None:
    if field == "dataset_uri":
        if uri.startswith("synthetic://"):
            return None  # generated at curation from the seed: nothing to find
        if uri.startswith("hf://datasets/"):
            if not os.environ.get("ONEVISION_DATASET_MIRROR"):
                # Without a mirror the hub would have to be asked, and neither preflight nor the pods reach
                # it: not checkable offline, skipped here (curation refuses it, saying to set the mirror).
                return None
            mirrored = _hub_mirror(uri)
            if not storage.exists(mirrored):
                return f"does not exist in the mirror ({mirrored})"
            return None if _parquet_files(mirrored) else f"holds no .parquet files in the mirror ({mirrored})"
        if not storage.exists(uri):
            return "does not exist"
        return None if _parquet_files(uri) else "holds no .parquet files"
    if field == "json_path" or uri.endswith(".tar"):
        try:
            require(uri)
        except CurationError as err:
            return "is a folder, not a file" if str(err).endswith("a folder, not a file") else "does not exist"
        return None
    found = storage.list_uris(uri, limit=1) if storage.is_s3(uri) else Path(uri).is_dir()
    return None if found else "does not exist (a media folder, or an S3 prefix with objects under it)"


def open_source(source: DataSource, work: Path, seed: int) -> Source:
    """The reader for one mixture entry (raises CurationError when it cannot be read at all).

    `work` holds generated synthetic worlds only; no other source is copied there."""
    name = source.json_path or source.dataset_uri
    if source.dataset_uri is not None:
        uri = source.dataset_uri
        if uri.startswith("synthetic://"):
            world, kind = synthetic_world(uri, work, seed)
            return SyntheticSource(str(world / f"{kind}.json"), uri, DirMedia(str(world)))
        if uri.startswith("hf://datasets/"):
            uri = _hub_mirror(uri)
        files = _parquet_files(uri)
        if not files:
            raise CurationError(f"{source.dataset_uri}: no .parquet files")
        return ParquetSource(files, name, _media_store(source.media_root) if source.media_root else None)
    uri = require(source.json_path)
    # beside the records file; not PurePosixPath for s3:// (it folds "s3://b/k" to "s3:/b", a local path)
    root = source.media_root or (uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent))
    reader = JsonlSource if uri.endswith(".jsonl") else JsonListSource
    return reader(uri, name, _media_store(root))

"""One small storage API over local paths and `s3://bucket/key` (MinIO, SeaweedFS, AWS) via the minio SDK.

    from onevision import storage
    storage.publish_dir("out/shards", "s3://onevision/runs/r1/curate", metadata={"records": 128})
    manifest = storage.read_manifest("s3://onevision/runs/r1/curate")   # raises if the publish never finished
    storage.get_dir("s3://onevision/runs/r1/curate", "/tmp/shards")    # verifies every sha256

S3 settings come from the environment, the same variables boto3 (MLflow) and KServe read:
AWS_ENDPOINT_URL (e.g. http://127.0.0.1:8333), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.
Transient failures (connection errors, 5xx, SlowDown) are retried ONEVISION_S3_RETRIES times (default 6)
with exponential backoff from ONEVISION_S3_BACKOFF seconds (default 0.5: 31.5 s of waits in all, so that a
store restarting under an upload is waited for; the local stack's took 3-14 s), each retry logged as a
warning, then raise StorageError.

Atomicity: a single object is never visible half-written (S3 PUT and multipart-complete are atomic; local
files are written to a temporary name and renamed). A *directory* is published objects first and the
manifest (`_MANIFEST.json`: sizes and sha256 of every file) last; readers require the manifest, so an
interrupted publish is invisible to them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)
MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_FORMAT = "onevision-manifest/1"
T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and the cause."""


class ManifestMissingError(StorageError):
    """A prefix has no manifest: its publish was interrupted or never happened."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object or file does not exist."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("s3://")


def parse_s3(uri: str) -> S3Location:
    """Split `s3://bucket/key`; rejects anything that is not a well-formed S3 URI."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3://bucket/key URI: {uri!r}")
    key = parsed.path.lstrip("/")
    if ".." in key.split("/") or parsed.query or parsed.fragment:
        raise StorageError(f"refusing S3 URI with '..', query or fragment: {uri!r}")
    return S3Location(parsed.netloc, key)


def join(uri: str, *parts: str) -> str:
    """Join URI/path segments with '/', for both kinds."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


# --- S3 client and retries -------------------------------------------------------------------------

def s3_endpoint() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if not endpoint:
        raise StorageError("no S3 endpoint: set AWS_ENDPOINT_URL (e.g. http://127.0.0.1:8333)")
    return endpoint


@lru_cache(maxsize=8)
def _client(endpoint: str, access_key: str, secret_key: str, region: str, pid: int) -> Any:
    import urllib3
    from minio import Minio

    url = urlparse(endpoint)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise StorageError(f"AWS_ENDPOINT_URL must be http(s)://host[:port], got {endpoint!r}")
    # Retries live in _with_retries (one bounded loop, one clear error), so urllib3 does none itself.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=float(os.environ.get("ONEVISION_S3_READ_TIMEOUT", "60"))),
        retries=False,
        maxsize=8,
    )
    return Minio(url.netloc, access_key=access_key, secret_key=secret_key, secure=url.scheme == "https",
                 region=region, http_client=http)


def s3_client() -> Any:
    """A minio client for the endpoint and credentials in the environment (cached per settings and process:
    a forked DataLoader worker that used its parent's pool would share its sockets, and one process would
    read the other's response - seen as tar bytes where an HTTP status line should be)."""
    endpoint = s3_endpoint()
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise StorageError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    return _client(endpoint, key, secret, os.environ.get("AWS_REGION", "us-east-1"), os.getpid())


_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "XMinioServerNotInitialized"}


def _is_transient(err: BaseException) -> bool:
    import urllib3
    from minio.error import S3Error, ServerError

    if isinstance(err, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, ServerError)):
        return True
    return isinstance(err, S3Error) and err.code in _TRANSIENT_CODES


def _with_retries(what: str, op: Callable[[], T]) -> T:
    from minio.error import S3Error

    attempts = 1 + int(os.environ.get("ONEVISION_S3_RETRIES", "6"))
    delay = float(os.environ.get("ONEVISION_S3_BACKOFF", "0.5"))
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except Exception as err:
            if isinstance(err, S3Error) and err.code in ("NoSuchKey", "NoSuchBucket"):
                raise StorageNotFoundError(f"{what}: {err.code} ({err.message})") from err
            if not _is_transient(err):
                if isinstance(err, StorageError):
                    raise
                raise StorageError(f"{what}: {type(err).__name__}: {err}") from err
            if attempt == attempts:
                raise StorageError(
                    f"{what}: S3 endpoint {s3_endpoint()} failed after {attempts} attempts "
                    f"({type(err).__name__}: {err})") from err
            wait = delay * 2 ** (attempt - 1)
            log.warning("%s: %s: %s; retry %d of %d in %.1fs", what, type(err).__name__, err, attempt,
                        attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# --- files -----------------------------------------------------------------------------------------

@contextmanager
def _atomic_write(dst: Path) -> Iterator[IO[bytes]]:
    """A file written under a temporary name and renamed into place; removed if writing fails.

    An OSError without a file name (a full disk's ENOSPC comes from write(), which names none) is
    raised again naming `dst`, with the same errno and type.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, dst)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(dst)) from err
        raise


def _atomic_copy(src: Path, dst: Path) -> None:
    with _atomic_write(dst) as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, 1 << 20)


def put_file(local: str | os.PathLike[str], uri: str) -> None:
    """Upload/copy one file; large files go up as an S3 multipart upload (visible only when complete)."""
    src = Path(local)
    if not src.is_file():
        raise StorageNotFoundError(f"put_file: no such local file {src}")
    if is_s3(uri):
        loc = parse_s3(uri)
        _with_retries(f"put {uri}", lambda: s3_client().fput_object(loc.bucket, loc.key, str(src)))
    else:
        _atomic_copy(src, Path(uri))


def get_file(uri: str, local: str | os.PathLike[str]) -> Path:
    """Download/copy one file to `local` (written under a temporary name, then renamed)."""
    dst = Path(local)
    if is_s3(uri):
        loc = parse_s3(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        # fget_object writes "<dst>.<etag>.part.minio" and renames at the end.
        _with_retries(f"get {uri}", lambda: s3_client().fget_object(loc.bucket, loc.key, str(dst)))
    else:
        if not Path(uri).is_file():
            raise StorageNotFoundError(f"get {uri}: no such file")
        _atomic_copy(Path(uri), dst)
    return dst


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        loc = parse_s3(uri)
        _with_retries(f"put {uri}", lambda: s3_client().put_object(
            loc.bucket, loc.key, io.BytesIO(data), len(data)))
        return
    with _atomic_write(Path(uri)) as out:
        out.write(data)


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as stream:
        return stream.read()


@contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """Open an object or file for a streaming binary read."""
    if not is_s3(uri):
        try:
            with open(uri, "rb") as stream:
                yield stream
        except FileNotFoundError:
            raise StorageNotFoundError(f"open {uri}: no such file") from None
        return
    loc = parse_s3(uri)
    response = _with_retries(f"open {uri}", lambda: s3_client().get_object(loc.bucket, loc.key))
    try:
        yield response
    finally:
        response.close()
        response.release_conn()


def stat(uri: str) -> dict[str, Any]:
    """Identity of one object or file, to tell a replaced one apart: S3 ETag and size; a local file's size
    and modification time (ns). StorageNotFoundError if there is none."""
    if not is_s3(uri):
        try:
            info = Path(uri).stat()
        except FileNotFoundError:
            raise StorageNotFoundError(f"stat {uri}: no such file") from None
        return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    loc = parse_s3(uri)
    obj = _with_retries(f"stat {uri}", lambda: s3_client().stat_object(loc.bucket, loc.key))
    return {"size": int(obj.size), "etag": str(obj.etag).strip('"')}


def size(uri: str) -> int:
    """Bytes in one object or file (StorageNotFoundError if there is none)."""
    return int(stat(uri)["size"])


def read_range(uri: str, offset: int, length: int) -> bytes:
    """`length` bytes from `offset` of an object or file (fewer at its end): one ranged GET on S3."""
    if length <= 0:
        return b""
    if not is_s3(uri):
        try:
            with open(uri, "rb") as stream:
                stream.seek(offset)
                return stream.read(length)
        except FileNotFoundError:
            raise StorageNotFoundError(f"open {uri}: no such file") from None
    loc = parse_s3(uri)

    def _get() -> bytes:
        response = s3_client().get_object(loc.bucket, loc.key, offset=offset, length=length)
        try:
            return response.read()  # inside the retry: a connection cut mid-body is retried too
        finally:
            response.close()
            response.release_conn()

    return _with_retries(f"get {uri} bytes {offset}+{length}", _get)


class RangeReader:
    """Byte ranges of one object or file, by offset. Reads that move forward through it (tar members in
    the order records name them) share one read-ahead window: one ranged GET per `window` bytes instead of
    one per read. A jump fetches just what it asks, so random access never pays for a window."""

    SEQUENTIAL_GAP = 64 << 10  # a read this close after the last one continues the stream (tar headers)

    def __init__(self, uri: str, window: int = 8 << 20):
        self.uri, self.window = uri, window
        self.start, self.data, self.last_end = 0, b"", -1
        self.gets = 0  # ranged GETs (or file reads) made: what the window saves

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        if not (self.start <= offset and end <= self.start + len(self.data)):
            ahead = 0 <= offset - self.last_end <= self.SEQUENTIAL_GAP
            self.start, self.data = offset, read_range(self.uri, offset, max(length, self.window) if ahead else length)
            self.gets += 1
        self.last_end = end
        return self.data[offset - self.start:end - self.start]


class _RangeReader(io.RawIOBase):
    """A seekable read-only S3 object: each read is a ranged GET (retried), nothing lands on disk."""

    def __init__(self, uri: str):
        self.uri, self.length, self.position = uri, size(uri), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        data = read_range(self.uri, self.position, min(len(buffer), self.length - self.position))
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


def open_random(uri: str, buffer_bytes: int = 8 << 20) -> IO[bytes]:
    """A seekable binary reader of an object or file, for formats that jump (parquet footers, tar
    members) or stream (JSONL): on S3, one ranged GET per `buffer_bytes` read, never a local copy."""
    if not is_s3(uri):
        try:
            return open(uri, "rb")
        except FileNotFoundError:
            raise StorageNotFoundError(f"open {uri}: no such file") from None
    return io.BufferedReader(_RangeReader(uri), buffer_bytes)


def exists(uri: str) -> bool:
    """True if the object/file exists (a prefix with objects under it counts for S3 'directories')."""
    if not is_s3(uri):
        return Path(uri).exists()
    loc = parse_s3(uri)
    try:
        _with_retries(f"stat {uri}", lambda: s3_client().stat_object(loc.bucket, loc.key))
        return True
    except StorageNotFoundError:
        return bool(list_uris(uri, limit=1))


def list_uris(prefix: str, limit: int | None = None) -> list[str]:
    """Every object/file below a prefix (recursive), as full URIs, sorted."""
    if not is_s3(prefix):
        root = Path(prefix)
        if root.is_file():
            return [str(root)]
        found = sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        return found[:limit]
    loc = parse_s3(prefix)
    key = loc.key.rstrip("/") + "/" if loc.key else ""

    def _list() -> list[str]:
        out = []
        for obj in s3_client().list_objects(loc.bucket, prefix=key, recursive=True):
            out.append(f"s3://{loc.bucket}/{obj.object_name}")
            if limit is not None and len(out) >= limit:
                break
        return out

    return sorted(_with_retries(f"list {prefix}", _list))


def delete(uri: str) -> None:
    """Remove one object/file; missing is fine."""
    if is_s3(uri):
        loc = parse_s3(uri)
        _with_retries(f"delete {uri}", lambda: s3_client().remove_object(loc.bucket, loc.key))
    else:
        Path(uri).unlink(missing_ok=True)


# --- directories and manifests ---------------------------------------------------------------------

def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_files(local_dir: Path) -> list[Path]:
    if not local_dir.is_dir():
        raise StorageNotFoundError(f"no such local directory {local_dir}")
    return sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def put_dir(local_dir: str | os.PathLike[str], uri: str) -> list[str]:
    """Upload every file below `local_dir`, keeping relative paths. No manifest: see publish_dir."""
    root = Path(local_dir)
    targets = []
    for path in _local_files(root):
        target = join(uri, path.relative_to(root).as_posix())
        put_file(path, target)
        targets.append(target)
    return targets


def publish_dir(local_dir: str | os.PathLike[str], uri: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Atomically publish a directory: drop any old manifest, upload objects, write the manifest last."""
    root = Path(local_dir)
    files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _local_files(root)}
    delete(join(uri, MANIFEST_NAME))  # an old manifest must not vouch for half-replaced objects
    put_dir(root, uri)
    return write_manifest(uri, files, metadata)


def unpublish_dir(uri: str) -> list[str]:
    """Withdraw a published prefix: its manifest first (from then on no reader takes it for complete), then
    the files it listed. Returns those files' names; nothing published there: ManifestMissingError."""
    listed = list(read_manifest(uri)["files"])
    delete(join(uri, MANIFEST_NAME))
    for rel in listed:
        delete(join(uri, rel))
    return listed


def write_manifest(uri: str, files: dict[str, dict[str, Any]], metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the manifest of objects already uploaded below `uri`, by this process or others (each file:
    {"size", "sha256"}, plus any fields of the writer's); the last step of a publish."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(),
        "files": files,
        "total_bytes": sum(f["size"] for f in files.values()),
        "metadata": metadata or {},
    }
    write_bytes(join(uri, MANIFEST_NAME), json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a published prefix; ManifestMissingError if the publish never completed."""
    try:
        raw = read_bytes(join(uri, MANIFEST_NAME))
    except StorageNotFoundError:
        raise ManifestMissingError(
            f"{uri} has no {MANIFEST_NAME}: it was never published or its publish was interrupted") from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise StorageError(f"{join(uri, MANIFEST_NAME)}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise StorageError(f"{join(uri, MANIFEST_NAME)}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def manifest_hash(uri: str) -> str:
    """sha256 of a published prefix's manifest: the lineage key of that data."""
    manifest = read_manifest(uri)
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def get_dir(uri: str, local_dir: str | os.PathLike[str], require_manifest: bool = True) -> Path:
    """Download a published prefix, verifying each file's size and sha256 against the manifest.

    With require_manifest=False, copy whatever objects are there (no integrity check).
    """
    dst = Path(local_dir)
    if not require_manifest:
        base = uri.rstrip("/") + "/"
        for src in list_uris(uri):
            get_file(src, dst / src[len(base):])
        return dst
    manifest = read_manifest(uri)
    for rel in manifest["files"]:
        get_published_file(uri, rel, dst / rel, manifest)
    return dst


def get_published_file(uri: str, rel: str, local: str | os.PathLike[str],
                       manifest: dict[str, Any] | None = None) -> Path:
    """Download one file of a published prefix, verified against its manifest (read when not given):
    StorageError when the manifest does not list it, names an unsafe path, or the bytes differ."""
    manifest = manifest or read_manifest(uri)
    info = manifest["files"].get(rel)
    if info is None:
        raise StorageError(f"{uri}: the manifest lists no {rel!r}")
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise StorageError(f"{uri}: manifest names an unsafe path {rel!r}")
    path = get_file(join(uri, rel), local)
    if path.stat().st_size != info["size"] or sha256_file(path) != info["sha256"]:
        raise StorageError(f"{join(uri, rel)}: size/sha256 differ from the manifest (corrupt or replaced)")
    return path


def resolve_source(source: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A model source as a local folder: hub ids and local paths pass through; an s3:// prefix is downloaded
    once (manifest-verified) into a cache keyed by its manifest (ONEVISION_CACHE, default
    ~/.cache/onevision), so a republished prefix is fetched again. No torch here: a step that only copies
    a checkpoint (export) does not pay for importing it."""
    if not is_s3(source):
        return source
    root = Path(cache_dir or os.environ.get("ONEVISION_CACHE", Path.home() / ".cache" / "onevision"))
    target = root / "models" / parse_s3(source).key.strip("/") / manifest_hash(source)[:16]
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        get_dir(source, partial)
        try:
            partial.rename(target)  # complete or absent, never half there
        except OSError:  # another process (rank) got there first
            shutil.rmtree(partial, ignore_errors=True)
            if not target.is_dir():
                raise
    return str(target)

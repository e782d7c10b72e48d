"""A bounded local cache of one published shard prefix: whole shards fetched from S3 on first use.

    cache = ShardCache("s3://onevision/curated/ov/stage2_ov/ab12", Path("/local/shards"), cap_bytes=200 << 30)
    path = cache.path("shard-000042.tar")     # downloaded (sha256-checked against the manifest) if not here
    cache.used_bytes()                        # never above cap_bytes once a fetch returns

Training opens a stage through this instead of downloading it (model/shards.py, `ShardDataset.streaming`):
only the shards the sampler is reading are on local disk. Recency is the file's mtime (touched on every
use), so DataLoader workers and the ranks of one node can share the folder: each one evicts the least
recently used shards of the folder until it is under the cap, never the one it is fetching. A shard
evicted between `path` and its `open` is fetched again by the reader (ShardDataset retries once). A
fetch lands under a temporary name and is renamed into place only after its sha256 matched, so a killed
download never looks like a shard. Every download is appended to `fetched.log` in the folder.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from onevision import storage


FETCH_LOG = "fetched.log"


class ShardCache:
    def __init__(self, uri: str, folder: str | os.PathLike[str], cap_bytes: int,
                 files: dict[str, dict[str, Any]] | None = None):
        self.uri, self.folder, self.cap_bytes = uri, Path(folder), int(cap_bytes)
        self.files = files if files is not None else storage.read_manifest(uri)["files"]
        largest = max((info["size"] for name, info in self.files.items() if name.endswith(".tar")), default=0)
        if self.cap_bytes < 2 * largest:  # the shard being read and the next one must fit together
            raise ValueError(f"shard cache cap {self.cap_bytes / 2**30:.2f} GiB is below twice the largest shard of "
                             f"{uri} ({largest / 2**30:.2f} GiB): raise training.shard_cache_gb")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fetched = 0  # shards this process downloaded (the benchmark reads it)

    def path(self, name: str) -> Path:
        """The local path of shard `name`, fetched if it is not in the cache."""
        local = self.folder / name
        try:
            os.utime(local)  # in use: the most recent
            return local
        except FileNotFoundError:
            pass
        info = self.files.get(name)
        if info is None:
            raise KeyError(f"{self.uri} has no shard {name!r} in its manifest")
        self.evict(reserve=info["size"], keep=name)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=self.folder)
        os.close(fd)
        try:
            storage.get_file(storage.join(self.uri, name), tmp)
            if os.path.getsize(tmp) != info["size"] or storage.sha256_file(tmp) != info["sha256"]:
                raise storage.StorageError(f"{storage.join(self.uri, name)}: size/sha256 differ from the manifest")
            os.replace(tmp, local)
            # again now that it is in: another process may have made room for its own fetch at the same
            # time, and both shards landed on the room of one (two DataLoader workers, the ranks of a node)
            self.evict(keep=name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.fetched += 1
        # one line per download, appended by every process using the folder (O_APPEND: whole lines):
        # what this node took from S3, for the operator and the tests
        with open(self.folder / FETCH_LOG, "a", encoding="utf-8") as log:
            log.write(f"{name}\n")
        return local

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._entries())

    def _entries(self) -> list[Path]:
        out = []
        for entry in os.scandir(self.folder):
            if entry.name.endswith(".tar") and entry.is_file():
                out.append(Path(entry.path))
        return out

    def evict(self, reserve: int = 0, keep: str | None = None) -> int:
        """Remove least recently used shards until `reserve` more bytes fit under the cap; returns bytes freed."""
        entries = []
        for path in self._entries():
            with contextlib.suppress(FileNotFoundError):  # another process may evict it meanwhile
                st = path.stat()
                entries.append((st.st_mtime, st.st_size, path))
        used, freed = sum(size for _, size, _ in entries), 0
        for _, size, path in sorted(entries):
            if used - freed + reserve <= self.cap_bytes:
                break
            if path.name == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a reader holding it open keeps reading: unlink frees the name, not its data
            freed += size
        return freed

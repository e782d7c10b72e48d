"""Training shards: WebDataset tar files of LLaVA records with their media, local or on S3.

    ds = ShardDataset(open_shards("s3://onevision/runs/r1/curate/stage1"), sample_processor)
    item = ds[0]                                                    # a ProcessedSample

Each sample is a group of members sharing a key: `<key>.json` (the LLaVA record, its media paths
rewritten to member names such as `img0.png`) and `<key>.img0.png`, `<key>.vid0.mp4`, ... - the layout
webdataset readers and writers use (curation writes them: model/shard_writer.py). Shards on S3 are fetched
once into a local cache, verified against the publish manifest (sha256). The index written beside them
(index.parquet: tar offsets, num_tokens, modality per sample) makes samples random-access without scanning a
tar: a seeded sampler gives a reproducible order and a resumed run can skip exactly the batches it has seen.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch.utils.data import Dataset

from model.shard_cache import ShardCache
from model.shard_index import INDEX_NAME, MemberReader, index_shards, open_index, read_index, write_index
from onevision import storage


def open_shards(uri: str, cache_dir: str | Path | None = None) -> list[Path]:
    """Local tar paths of a *published* shard prefix: in place if local, else downloaded and sha256-verified.
    Only the manifest's shards count: a folder a failed publish left behind is refused, not half read."""
    if not storage.is_s3(uri):
        try:
            listed = storage.read_manifest(uri)["files"]
        except storage.ManifestMissingError as err:
            raise FileNotFoundError(f"{uri}: no published shards ({err})") from None
        shards = sorted(Path(uri) / name for name in listed if name.endswith(".tar"))
    else:
        import tempfile

        local = Path(cache_dir or tempfile.mkdtemp(prefix="onevision-shards-")) / storage.parse_s3(uri).key
        storage.get_dir(uri, local)
        shards = sorted(local.glob("*.tar"))
        if shards and INDEX_NAME not in storage.read_manifest(uri)["files"]:
            # curated before the index: built once into the cache, for this very publication (manifest hash)
            stamp, digest = local / f"{INDEX_NAME}.manifest", storage.manifest_hash(uri)
            if not (local / INDEX_NAME).is_file() or not stamp.is_file() or stamp.read_text() != digest:
                print(f"[shards] {uri}: no {INDEX_NAME} (curated before curation wrote one): indexing "
                      f"{len(shards)} shard(s) from their tar headers once, into {local / INDEX_NAME}", flush=True)
                write_index(index_shards(shards), local / INDEX_NAME)
                stamp.write_text(digest)
    if not shards:
        raise FileNotFoundError(f"{uri}: no .tar shards")
    return shards


class ShardDataset(Dataset):
    """Random access to the samples of local tar shards, each processed by a SampleProcessor.

    Where the samples lie comes from the shards' index (model/shard_index.py: `index.parquet` beside them,
    written at curation), so opening a stage reads no tar; shards without one (curated before the index)
    are indexed from their tar headers, with a message saying so. A streamed stage reads only the
    sampler's columns of its index at open, and each shard's member offsets on first use (MemberReader)."""

    def __init__(self, shards: list[Path], sample_processor: Any = None, index: pa.Table | None = None,
                 cache: ShardCache | None = None, members: MemberReader | None = None):
        self.shards = [Path(s) for s in shards]  # with `cache`: where the cache puts them (fetched on use)
        self.sample_processor = sample_processor
        self.cache = cache
        table = index if index is not None else load_index(self.shards)
        shard_of = _positions(table.column("shard"), [s.name for s in self.shards])
        # samples numbered in shard order, then write order: the index's own order (no sort) when it is so
        in_order = bool(np.all(shard_of[1:] >= shard_of[:-1]))
        order = np.arange(len(shard_of)) if in_order else np.argsort(shard_of, kind="stable")
        if members is not None and not in_order:  # the reader's row numbers would not be the samples'
            table, members = read_index(members.path), None
        self.index = table if in_order else table.take(pa.array(order))
        self._shard = shard_of[order].astype(np.int32)  # (N,) position in self.shards
        self._reader = members  # each shard's member offsets read when it is first read (streamed stages)
        if members is None:
            self._members = self.index.column("members").combine_chunks()
            self._offsets = self.index.column("offsets").combine_chunks()
            self._sizes = self.index.column("sizes").combine_chunks()
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.index.num_rows

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker: descriptors of its own
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def _members_of(self, index: int) -> dict[str, tuple[int, int]]:
        """member suffix -> (offset, size) of sample `index`."""
        if self._reader is not None:
            return self._reader(index)
        return dict(zip(self._members[index].as_py(), zip(self._offsets[index].as_py(), self._sizes[index].as_py())))

    def _read(self, index: int, suffixes: list[str] | None = None) -> dict[str, bytes]:
        """The bytes of sample `index`'s members (all of them by default), read by offset (no seek: os.pread
        is safe across threads). A streamed shard is opened for the sample and closed after it; one that
        another process evicted between fetch and open is fetched again."""
        index = int(index)  # a numpy integer from a Subset's index array
        members = self._members_of(index)
        shard = int(self._shard[index])
        if self.cache is None:
            fd = self._fd(shard)
        else:
            try:
                fd = os.open(self.cache.path(self.shards[shard].name), os.O_RDONLY)
            except FileNotFoundError:
                fd = os.open(self.cache.path(self.shards[shard].name), os.O_RDONLY)
        try:
            return {s: os.pread(fd, members[s][1], members[s][0]) for s in (suffixes or list(members))}
        finally:
            if self.cache is not None:
                os.close(fd)

    def record(self, index: int) -> dict[str, Any]:
        return json.loads(self._read(index, ["json"])["json"])

    def raw(self, index: int) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(record, {member name: bytes}) without processing."""
        media = self._read(index)
        return json.loads(media.pop("json")), media

    def shard_of(self) -> np.ndarray:
        """(N,) each sample's shard (its position in self.shards): what ShardWindowSampler windows over."""
        return self._shard.copy()

    @classmethod
    def streaming(cls, uri: str, cache_dir: str | Path, cap_bytes: int, sample_processor: Any = None) -> ShardDataset:
        """The published stage at `uri` (s3://) read in place: only its manifest and index are fetched now,
        each shard on first use into a ShardCache of at most `cap_bytes` under `cache_dir` (oldest evicted).
        A stage published without an index is downloaded whole and indexed once (a message says so)."""
        try:
            files = storage.read_manifest(uri)["files"]
        except storage.ManifestMissingError as err:
            raise FileNotFoundError(f"{uri}: no published shards ({err})") from None
        names = sorted(name for name in files if name.endswith(".tar"))
        if not names:
            raise FileNotFoundError(f"{uri}: no .tar shards")
        folder = Path(cache_dir) / storage.parse_s3(uri).key
        if INDEX_NAME not in files:
            print(f"[shards] {uri}: no {INDEX_NAME}, so it cannot be streamed: downloading the whole stage",
                  flush=True)
            return cls(open_shards(uri, cache_dir), sample_processor)
        cache = ShardCache(uri, folder, cap_bytes, files)
        index_path = storage.get_file(storage.join(uri, INDEX_NAME), folder / INDEX_NAME)
        if storage.sha256_file(index_path) != files[INDEX_NAME]["sha256"]:
            raise storage.StorageError(f"{storage.join(uri, INDEX_NAME)}: sha256 differs from the manifest")
        table, members = open_index(index_path)
        return cls([folder / name for name in names], sample_processor, index=table, cache=cache, members=members)

    def __getitem__(self, index: int) -> Any:
        record, media = self.raw(index)
        return self.sample_processor(record, media=media)

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample (length estimate, is_visual), two (N,) arrays for the modality-length sampler, from the
        index: `meta.num_tokens` when curation wrote it, else words of the conversation + 128 per visual
        input (LLaVA-NeXT's modality_lengths estimate)."""
        lengths = self.index.column("num_tokens").to_numpy()  # int32, no copy
        modality = self.index.column("modality").combine_chunks()
        if pa.types.is_dictionary(modality.type):  # a streamed index: compare the few names, then take by code
            visual = pc.not_equal(modality.dictionary, "text").to_numpy(zero_copy_only=False)
            return lengths, visual[modality.indices.to_numpy()]
        return lengths, pc.not_equal(modality, "text").to_numpy(zero_copy_only=False)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values() if getattr(self, "_pid", None) == os.getpid() else ():
            with contextlib.suppress(OSError):
                os.close(fd)


def _positions(shard: pa.ChunkedArray, names: list[str]) -> np.ndarray:
    """(N,) position in `names` of each row's shard; ValueError naming shards that are not there."""
    value_set = pa.array(names, pa.string())
    if pa.types.is_dictionary(shard.type):  # map the few distinct names, then the rows' codes
        combined = shard.combine_chunks()
        found = pc.index_in(combined.dictionary, value_set=value_set)
        missing = pc.filter(combined.dictionary, pc.is_null(found)).to_pylist()
        positions = found.to_numpy(zero_copy_only=False)[combined.indices.to_numpy()] if not missing else None
    else:
        found = pc.index_in(shard, value_set=value_set)
        missing = pc.filter(shard, pc.is_null(found)).to_pylist() if found.null_count else []
        positions = found.to_numpy() if not missing else None
    if positions is None:
        raise ValueError(f"the shard index names shards that were not given: {sorted(set(missing))[:3]}")
    return positions.astype(np.int64)


def load_index(shards: list[Path]) -> pa.Table:
    """The index rows of `shards` from the index.parquet beside them, or (none there, or it lacks one of
    them) an index built now from their tar headers."""
    names = sorted({s.name for s in shards})
    path = shards[0].parent / INDEX_NAME if shards else None
    if path is not None and path.is_file():
        table = read_index(path)
        table = table.filter(pc.is_in(table.column("shard"), value_set=pa.array(names)))
        if set(pc.unique(table.column("shard")).to_pylist()) == set(names):
            return table
    print(f"[shards] {shards[0].parent if shards else '-'}: no {INDEX_NAME} for these shards (curated before "
          f"curation wrote one): indexing {len(shards)} shard(s) from their tar headers, once", flush=True)
    return index_shards(shards)

"""Curation fanned out over pods: partition pods check slices of every source, one merge pod does the rest.

    onevision curate --recipe recipes/ov-7b.yaml --stage stage2_ov --out s3://b/ov --partition 3/16  # one pod's share
    onevision curate --recipe recipes/ov-7b.yaml --stage stage2_ov --out s3://b/ov --partitions 16   # the merge
    (the pipeline runs these as a dsl.ParallelFor of `curate partition` tasks, then one `curate` task)

Partition p of n takes, from every mixture entry, the selected records whose index lies in the p-th of n
contiguous ranges of the source (`partition_range`), reads their media and runs the checks (the expensive
part: decoding, pHash, token counts). It publishes what it checked, in index order, under
`<out>-partitions/<p>-of-<n>/` (manifest last, so a killed pod's partial upload never looks complete):
`partition.json` (format, data recipe hash, per entry: the source's name, its size as sampling saw it
and the range) and `source-<i>.tar` per entry: for each record, `<seq>.json` (index, record, raw text,
verdict) and, when it passed the checks, its media as `<seq>.m<k>`. No pickle: the merge pod reads data,
not code.

The merge (`PartitionReader`, used by core.curate_data) replays entry by entry, partition by partition,
each file downloaded and verified against its partition's manifest, then deleted. That is the order one
pod reads in, so deduplication (first occurrence wins, across partitions and sources), re-captioning,
the quarantine, the card and the shards are byte-identical to one-pod curation whatever n is (tested
with n = 1 and 3 under kfp.local). A retried partition pod whose partition is already published for the
same data recipe returns it as it is; the merge removes the partitions once the stage is published.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from components.curate.checks import Limits, Verdict
from components.curate.sources import CurationError, RawRecord, Source
from components.curate.stream import checked_stream
from onevision import storage

PARTITION_FORMAT = 1
PARTITION_JSON = "partition.json"
_MEMBER = re.compile(r"^(\d{9})\.(json|m\d+)$")


class PartitionError(CurationError):
    """A partition the merge needs is missing, of another data recipe or partition count, or malformed."""


def partitions_uri(out: str) -> str:
    """Where a stage's partitions are published while it is curated: beside `out`, never inside it."""
    return f"{out.rstrip('/')}-partitions"


def partition_uri(out: str, partition: int, partitions: int) -> str:
    return storage.join(partitions_uri(out), f"{partition:04d}-of-{partitions:04d}")


def partition_range(size: int, partition: int, partitions: int) -> tuple[int, int]:
    """[start, stop) of the source indices that partition `partition` of `partitions` checks."""
    if not 0 <= partition < partitions:
        raise PartitionError(f"partition {partition} is not one of 0..{partitions - 1}")
    return size * partition // partitions, size * (partition + 1) // partitions


def index_span(strategy: str, available: int | None, source: Source) -> int:
    """How many leading indices the partitions split: the size sampling counted, N for `first:N` (no
    record beyond it is selected, so none is counted), else the source counted once."""
    if available is not None:
        return available
    if strategy.startswith("first:") and not strategy.endswith("%"):
        return int(strategy.split(":")[1])
    return source.count()


def write_source_part(checked: Iterator[tuple[tuple[RawRecord, dict], Verdict]], path: Path) -> int:
    """Write checked records, in order, as one partition file; returns how many."""
    count = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for (raw, media), verdict in checked:
            passed = verdict.reason_code is None
            names = [rel for rel, data in media.items() if passed and isinstance(data, bytes)]
            doc = {"index": raw.index, "record": raw.record, "error": raw.error, "raw": raw.raw,
                   "verdict": asdict(verdict), "media": names}
            # insertion order kept (no sort_keys): the kept record is written to the shard as it reads back
            _add(tar, f"{count:09d}.json", json.dumps(doc, default=str).encode())
            for k, rel in enumerate(names):
                _add(tar, f"{count:09d}.m{k}", media[rel])
            count += 1
    return count


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def read_source_part(path: Path, where: str) -> Iterator[tuple[tuple[RawRecord, dict], Verdict]]:
    """The checked records of one partition file, as checked_stream gave them to the writer."""
    with tarfile.open(path, "r|") as tar:
        doc: dict[str, Any] | None = None
        media: dict[str, bytes] = {}
        for member in tar:
            match = _MEMBER.match(member.name)
            stream = tar.extractfile(member) if member.isfile() else None
            if match is None or stream is None:
                raise PartitionError(f"{where}: unexpected member {member.name!r}")
            if match.group(2) == "json":
                if doc is not None:
                    yield _checked(doc, media, where)
                try:
                    doc, media = json.loads(stream.read()), {}
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise PartitionError(f"{where}: {member.name} is not valid JSON ({err})") from None
                if not isinstance(doc, dict):
                    raise PartitionError(f"{where}: {member.name} is not a checked record (not a JSON object)")
            else:
                k = int(match.group(2)[1:])
                if doc is None or k >= len(doc.get("media", [])):
                    raise PartitionError(f"{where}: {member.name} belongs to no record")
                media[doc["media"][k]] = stream.read()
        if doc is not None:
            yield _checked(doc, media, where)


def _checked(doc: dict[str, Any], media: dict[str, bytes], where: str) -> tuple[tuple[RawRecord, dict], Verdict]:
    try:
        verdict = Verdict(**{**doc["verdict"], "phashes": tuple(doc["verdict"]["phashes"])})
        raw = RawRecord(doc["index"], doc["record"], doc["error"], doc["raw"])
        names = list(doc["media"])
    except (KeyError, TypeError, AttributeError) as err:
        raise PartitionError(f"{where}: record {doc.get('index')!r} is not a checked record ({err})") from None
    if len(media) != len(names):
        raise PartitionError(f"{where}: record {raw.index} lacks some of its media {doc['media']}")
    return (raw, media), verdict


def write_partition(sources: list[tuple[Source, str, Callable[[int], bool], int | None]], limits: Limits,
                    partition: int, partitions: int, workers: int, staging: Path, data_recipe_hash: str) -> dict[str, Any]:
    """Check this partition's slice of each (source, strategy, selected, available) into `staging`;
    returns the partition.json document (also written there)."""
    entries = []
    for index, (source, strategy, selected, available) in enumerate(sources):
        start, stop = partition_range(index_span(strategy, available, source), partition, partitions)
        checked = checked_stream(source, selected, limits, workers, start, stop)
        records = write_source_part(checked, staging / f"source-{index:04d}.tar")
        entries.append({"name": source.name, "available": available, "start": start, "stop": stop,
                        "records": records})
    doc = {"format": PARTITION_FORMAT, "data_recipe_hash": data_recipe_hash, "partition": partition,
           "partitions": partitions, "sources": entries}
    (staging / PARTITION_JSON).write_text(json.dumps(doc, indent=1, sort_keys=True))
    return doc


def published_partition(uri: str, data_recipe_hash: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(partition.json, manifest) of a partition published at `uri` for this data recipe, else None."""
    try:
        manifest = storage.read_manifest(uri)
        doc = json.loads(storage.read_bytes(storage.join(uri, PARTITION_JSON)))
    except (storage.StorageError, json.JSONDecodeError):
        return None
    ok = isinstance(doc, dict) and doc.get("format") == PARTITION_FORMAT and doc.get("data_recipe_hash") == data_recipe_hash
    return (doc, manifest) if ok else None


class PartitionReader:
    """The merge's view of n published partitions: per mixture entry, the source's name and size, and its
    checked records in the order one pod would have produced them."""

    def __init__(self, uris: list[str], data_recipe_hash: str, sources: int):
        docs, self.manifests = [], {}
        for uri in uris:
            published = published_partition(uri, data_recipe_hash)
            if published is None:
                raise PartitionError(f"{uri}: no partition of data recipe {data_recipe_hash[:12]} published there "
                                     "(its pod failed or has not run); run that partition again, then merge")
            doc, self.manifests[uri] = published
            docs.append((doc["partition"], uri, doc))
        docs.sort(key=lambda item: item[0])
        n = len(docs)
        if [p for p, _, _ in docs] != list(range(n)) or any(doc["partitions"] != n for _, _, doc in docs):
            found = [f"{p}/{doc['partitions']}" for p, _, doc in docs]
            raise PartitionError(f"the merge needs partitions 0..{n - 1} of {n}, each once; got {found}")
        if any(len(doc["sources"]) != sources for _, _, doc in docs):
            raise PartitionError(f"partitions of another mixture: each must list {sources} source(s)")
        self.parts = [(uri, doc) for _, uri, doc in docs]

    def source(self, index: int) -> tuple[str, int | None]:
        """(name, available) of mixture entry `index`, as every partition saw it."""
        seen = {(doc["sources"][index]["name"], doc["sources"][index]["available"]) for _, doc in self.parts}
        if len(seen) != 1:
            raise PartitionError(f"partitions disagree on mixture entry {index}: {sorted(map(str, seen))}")
        return seen.pop()

    def checked(self, index: int, work: Path, on_record: Callable[[], None] = lambda: None
                ) -> Iterator[tuple[tuple[RawRecord, dict], Verdict]]:
        """Entry `index`'s checked records: partition 0's slice, then 1's...; one file on disk at a time."""
        rel = f"source-{index:04d}.tar"
        for uri, doc in self.parts:
            local = storage.get_published_file(uri, rel, work / "partitions" / f"{doc['partition']:04d}-{rel}",
                                               self.manifests[uri])
            try:
                count = 0
                for item in read_source_part(local, storage.join(uri, rel)):
                    on_record()
                    count += 1
                    yield item
                if count != doc["sources"][index]["records"]:
                    raise PartitionError(f"{storage.join(uri, rel)}: {count} records, partition.json says "
                                         f"{doc['sources'][index]['records']}")
            finally:
                local.unlink(missing_ok=True)

    def remove(self) -> None:
        """Withdraw every partition (manifest first): the stage is published, they are spent."""
        for uri, _ in self.parts:
            remove_partition(uri)


def remove_partition(uri: str) -> None:
    """Withdraw a spent partition (manifest first); one already gone is fine."""
    try:
        storage.unpublish_dir(uri)
    except storage.ManifestMissingError:
        pass

"""Training shards: WebDataset tar files of LLaVA records with their media, local or on S3.

    write_shards(samples, "out/shards", max_per_shard=1000)        # curation writes these, then publishes
    ds = ShardDataset(open_shards("s3://onevision/runs/r1/curate/stage1"), sample_processor)
    item = ds[0]                                                    # a ProcessedSample

Each sample is a group of members sharing a key: `<key>.json` (the LLaVA record, its media paths
rewritten to member names such as `img0.png`) and `<key>.img0.png`, `<key>.vid0.mp4`, ... - the layout
webdataset readers and writers use. Shards on S3 are fetched once into a local cache, verified against
the publish manifest (sha256), and indexed by tar offsets, so samples are random-access: a seeded sampler
gives a reproducible order and a resumed run can skip exactly the batches it has seen.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from onevision import storage

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def shard_key(sample_id: str, index: int) -> str:
    """A tar-safe key: webdataset splits member names at the first dot, so no dots or slashes."""
    return f"{index:09d}_{_KEY_UNSAFE.sub('-', sample_id)[:80]}"


def write_shards(samples: Iterable[tuple[dict[str, Any], Mapping[str, bytes]]], out_dir: str | Path,
                 max_per_shard: int = 1000, prefix: str = "shard", max_bytes: int = 3 << 30) -> list[Path]:
    """Write (record, {original media path: bytes}) pairs as tar shards; returns the shard paths.

    A shard closes at `max_per_shard` samples or `max_bytes`. Member times are fixed (mtime 0), so the
    same samples give byte-identical shards.
    """
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=max_per_shard, maxsize=max_bytes,
                         verbose=0, mtime=0) as sink:
        for index, (record, media) in enumerate(samples):
            key = shard_key(str(record["id"]), index)
            members: dict[str, Any] = {"__key__": key}
            record = dict(record)
            for field, tag in (("image", "img"), ("video", "vid")):
                paths = record.get(field)
                if paths is None:
                    continue
                names = []
                for i, path in enumerate([paths] if isinstance(paths, str) else paths):
                    ext = Path(path).suffix.lower().lstrip(".") or "bin"
                    name = f"{tag}{i}.{ext}"
                    members[name] = media[path]
                    names.append(name)
                record[field] = names[0] if isinstance(paths, str) else names
            members["json"] = json.dumps(record).encode()
            sink.write(members)
    return sorted(out.glob(f"{prefix}-*.tar"))


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
    if not shards:
        raise FileNotFoundError(f"{uri}: no .tar shards")
    return shards


@dataclass(frozen=True)
class _Entry:
    shard: int
    key: str
    members: dict[str, tuple[int, int]]  # member suffix -> (data offset, size)


class ShardDataset(Dataset):
    """Random access to the samples of local tar shards, each processed by a SampleProcessor."""

    def __init__(self, shards: list[Path], sample_processor: Any = None):
        self.shards = [Path(s) for s in shards]
        self.sample_processor = sample_processor
        self.entries: list[_Entry] = []
        for index, shard in enumerate(self.shards):
            grouped: dict[str, dict[str, tuple[int, int]]] = {}
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, suffix = Path(member.name).name.partition(".")
                    grouped.setdefault(key, {})[suffix] = (member.offset_data, member.size)
            self.entries += [_Entry(index, key, members) for key, members in grouped.items() if "json" in members]

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, entry: _Entry, suffix: str) -> bytes:
        offset, size = entry.members[suffix]
        with open(self.shards[entry.shard], "rb") as stream:
            stream.seek(offset)
            return stream.read(size)

    def record(self, index: int) -> dict[str, Any]:
        return json.loads(self._read(self.entries[index], "json"))

    def raw(self, index: int) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(record, {member name: bytes}) without processing."""
        entry = self.entries[index]
        media = {s: self._read(entry, s) for s in entry.members if s != "json"}
        return self.record(index), media

    def __getitem__(self, index: int) -> Any:
        record, media = self.raw(index)
        return self.sample_processor(record, media=media)

    def lengths(self) -> tuple[list[int], list[bool]]:
        """Cheap per-sample (length estimate, is_visual) for the modality-length sampler.

        Uses `meta.num_tokens` when curation wrote it, else words of the conversation + 128 per
        visual input (LLaVA-NeXT's modality_lengths estimate).
        """
        lengths, visual = [], []
        for i in range(len(self)):
            record = self.record(i)
            media = [v for k in ("image", "video") for v in ([record[k]] if isinstance(record.get(k), str) else record.get(k) or [])]
            tokens = (record.get("meta") or {}).get("num_tokens")
            if tokens is None:
                words = sum(len(str(t.get("value", "")).split()) for t in record.get("conversations", []))
                tokens = words + 128 * len(media)
            lengths.append(int(tokens))
            visual.append(bool(media))
        return lengths, visual

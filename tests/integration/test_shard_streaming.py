"""Training shards streamed from the real local S3 through a bounded cache (model/shard_cache.py).

    .venv/bin/python -m pytest tests/integration/test_shard_streaming.py -q

Streaming reads the same samples as the downloaded stage, in the same order for a seed; the cache never
holds more than its cap (so never the whole stage), however the samples are read (in order, in the
window sampler's order, by DataLoader workers); a corrupt shard is refused by name.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.batching import ShardWindowSampler
from model.shard_cache import ShardCache
from model.shard_writer import write_shards
from model.shards import ShardDataset, open_shards
from onevision import storage

pytestmark = pytest.mark.integration
RECORDS, PER_SHARD = 60, 5  # 12 shards


def _png(i: int) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((48 + i % 7, 48), 40 + i).convert("RGB").save(out, format="PNG")  # incompressible-ish
    return out.getvalue()


def _samples():
    for i in range(RECORDS):
        turns = [{"from": "human", "value": ("<image>\n" if i % 4 else "") + "What is it? " * (1 + i % 5)},
                 {"from": "gpt", "value": f"answer {i}"}]
        if i % 4:
            yield {"id": f"s{i}", "image": f"{i}.png", "conversations": turns}, {f"{i}.png": _png(i)}
        else:
            yield {"id": f"s{i}", "conversations": turns}, {}


@pytest.fixture(scope="module")
def stage(local_stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, int]:
    """(s3 prefix, the same stage as a local published folder, its largest shard's bytes)."""
    tmp = tmp_path_factory.mktemp("streaming")
    write_shards(_samples(), tmp / "shards", max_per_shard=PER_SHARD)
    uri = f"s3://onevision/tests/streaming/{uuid.uuid4().hex[:8]}"
    storage.publish_dir(tmp / "shards", uri)
    storage.publish_dir(tmp / "shards", tmp / "published")
    return uri, tmp / "published", max(p.stat().st_size for p in (tmp / "shards").glob("*.tar"))


def _record_only(record: dict, media: dict | None = None) -> dict:
    return record


def _ids(dataset: ShardDataset, order) -> list[str]:
    return [dataset.record(i)["id"] for i in order]


def test_streaming_reads_what_the_download_reads_in_the_same_order(stage, tmp_path: Path) -> None:
    uri, local, largest = stage
    downloaded = ShardDataset(open_shards(str(local)))
    streamed = ShardDataset.streaming(uri, tmp_path / "cache", cap_bytes=3 * largest)
    assert len(streamed) == len(downloaded) == RECORDS
    assert [a.tolist() for a in streamed.lengths()] == [a.tolist() for a in downloaded.lengths()]
    assert streamed.shard_of().tolist() == downloaded.shard_of().tolist()
    sampler = lambda ds: ShardWindowSampler(*ds.lengths(), ds.shard_of(), batch_size=4, window_shards=2, seed=7)  # noqa: E731
    order = list(sampler(streamed))
    assert order == list(sampler(downloaded))
    assert _ids(streamed, order) == _ids(downloaded, order)
    assert [streamed.raw(i)[1] for i in order[:10]] == [downloaded.raw(i)[1] for i in order[:10]]  # media bytes too
    assert streamed.cache.used_bytes() <= 3 * largest
    assert streamed.cache.fetched < 2 * 12  # a window at a time: each shard about once, not once per sample


def test_the_cache_stays_under_its_cap_and_never_holds_the_stage(stage, tmp_path: Path) -> None:
    uri, _, largest = stage
    cap = 2 * largest
    streamed = ShardDataset.streaming(uri, tmp_path / "cache", cap_bytes=cap)
    peak = 0
    for i in range(len(streamed)):  # in shard order, then all over again backwards (evicts and refetches)
        streamed.record(i)
        peak = max(peak, streamed.cache.used_bytes())
    for i in reversed(range(len(streamed))):
        streamed.record(i)
        peak = max(peak, streamed.cache.used_bytes())
    assert peak <= cap
    assert len(list(streamed.cache.folder.glob("*.tar"))) <= 2 < 12
    assert not list(streamed.cache.folder.glob("*.partial"))  # no fetch left half a file behind


def test_dataloader_workers_share_the_cache_and_read_every_sample_once(stage, tmp_path: Path) -> None:
    uri, local, largest = stage
    streamed = ShardDataset.streaming(uri, tmp_path / "cache", cap_bytes=3 * largest, sample_processor=_record_only)
    sampler = ShardWindowSampler(*streamed.lengths(), streamed.shard_of(), batch_size=4, window_shards=2, seed=1)
    loader = torch.utils.data.DataLoader(streamed, batch_size=4, sampler=sampler, num_workers=2,
                                         collate_fn=lambda items: items)
    seen = [record["id"] for batch in loader for record in batch]
    downloaded = ShardDataset(open_shards(str(local)))
    assert seen == _ids(downloaded, list(sampler))
    assert sorted(seen) == sorted(f"s{i}" for i in range(RECORDS))
    assert ShardCache(uri, streamed.cache.folder, 3 * largest).used_bytes() <= 3 * largest


def test_a_corrupt_shard_is_refused_by_name(stage, tmp_path: Path) -> None:
    uri, _, largest = stage
    streamed = ShardDataset.streaming(uri, tmp_path / "cache", cap_bytes=3 * largest)
    name = streamed.shards[0].name
    storage.write_bytes(storage.join(uri, name), b"not the shard the manifest lists")
    try:
        with pytest.raises(storage.StorageError, match=name):
            streamed.record(0)
        assert not list(streamed.cache.folder.glob("*.tar"))
    finally:
        storage.put_file(Path(open_shards(str(stage[1]))[0]), storage.join(uri, name))


def test_a_cap_below_two_shards_is_refused(stage, tmp_path: Path) -> None:
    uri, _, largest = stage
    with pytest.raises(ValueError, match="shard_cache_gb"):
        ShardDataset.streaming(uri, tmp_path / "cache", cap_bytes=largest)

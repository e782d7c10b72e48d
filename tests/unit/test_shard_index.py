"""The shard index (model/shard_index.py): written with the shards, read back without opening a tar.

    .venv/bin/python -m pytest tests/unit/test_shard_index.py -q
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.shard_index import INDEX_NAME, index_shards, read_index, write_index
from model.shard_writer import write_shards
from model.shards import ShardDataset, open_shards
from onevision import storage


def png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (side % 255, 10, 200)).save(out, format="PNG")
    return out.getvalue()


def samples() -> list[tuple[dict, dict[str, bytes]]]:
    turns = lambda ph, answer: [{"from": "human", "value": f"{ph}What is it?"}, {"from": "gpt", "value": answer}]  # noqa: E731
    out = []
    for i in range(7):
        out.append(({"id": f"img{i}", "image": f"{i}.png", "conversations": turns("<image>\n", "red " * i),
                     "meta": {"num_tokens": 100 + i, "modality": "image"}}, {f"{i}.png": png(16 + i)}))
    out.append(({"id": "multi", "image": ["a.png", "b.png"], "conversations": turns("<image><image>\n", "two")},
                {"a.png": png(20), "b.png": png(24)}))
    out.append(({"id": "text", "conversations": turns("", "just words here")}, {}))
    return out


@pytest.fixture()
def published(tmp_path: Path) -> Path:
    write_shards(samples(), tmp_path / "staging", max_per_shard=4)
    storage.publish_dir(tmp_path / "staging", tmp_path / "published")
    return tmp_path / "published"


def test_index_is_written_published_and_points_at_every_member(published: Path) -> None:
    assert INDEX_NAME in storage.read_manifest(str(published))["files"]  # published with the shards
    index = read_index(published / INDEX_NAME)
    assert index.num_rows == len(samples())
    assert sorted(set(index.column("shard").to_pylist())) == ["shard-000000.tar", "shard-000001.tar",
                                                              "shard-000002.tar"]
    for row in index.to_pylist():  # every offset/size reads the very bytes tarfile gives for that member
        with tarfile.open(published / row["shard"]) as tar, open(published / row["shard"], "rb") as raw:
            for suffix, offset, size in zip(row["members"], row["offsets"], row["sizes"], strict=True):
                raw.seek(offset)
                assert raw.read(size) == tar.extractfile(f"{row['key']}.{suffix}").read()
    rows = {row["key"].split("_", 1)[1]: row for row in index.to_pylist()}
    assert (rows["img3"]["num_tokens"], rows["img3"]["modality"], rows["img3"]["images"]) == (103, "image", 1)
    assert (rows["multi"]["modality"], rows["multi"]["images"], rows["multi"]["frames"]) == ("multi_image", 2, 0)
    # no meta.num_tokens: LLaVA-NeXT's estimate, words + 128 per visual input
    assert rows["multi"]["num_tokens"] == len("<image><image>\nWhat is it? two".split()) + 2 * 128
    assert (rows["text"]["modality"], rows["text"]["images"]) == ("text", 0)


def test_index_round_trips_through_parquet(published: Path, tmp_path: Path) -> None:
    table = index_shards(sorted(published.glob("*.tar")))
    assert read_index(write_index(table, tmp_path / "again.parquet")).equals(table)
    assert read_index(published / INDEX_NAME).equals(table)


def test_dataset_opens_no_tar_for_len_and_lengths(published: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = ShardDataset(open_shards(str(published)))
    records = [expected.record(i) for i in range(len(expected))]

    def refuse(*args, **kwargs):
        raise AssertionError("a tar was scanned although the index is there")

    monkeypatch.setattr(tarfile, "open", refuse)
    dataset = ShardDataset(open_shards(str(published)))
    assert len(dataset) == len(samples())
    lengths, visual = dataset.lengths()
    assert visual.tolist() == [r["id"] != "text" for r in records]
    assert lengths[[r["id"] for r in records].index("img5")] == 105
    assert [dataset.record(i) for i in range(len(dataset))] == records  # reads by offset, no tar parsing
    record, media = dataset.raw([r["id"] for r in records].index("multi"))
    assert record["image"] == ["img0.png", "img1.png"] and media["img1.png"] == png(24)


def test_shards_without_an_index_are_indexed_once_with_a_message(published: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with_index = ShardDataset(open_shards(str(published)))
    old = tmp_path / "old"
    old.mkdir()
    for shard in published.glob("*.tar"):  # a stage curated before the index: the tars only
        (old / shard.name).write_bytes(shard.read_bytes())
    dataset = ShardDataset(sorted(old.glob("*.tar")))
    assert "no index.parquet" in capsys.readouterr().out
    assert len(dataset) == len(with_index)
    assert [dataset.record(i) for i in range(len(dataset))] == [with_index.record(i) for i in range(len(with_index))]
    assert [a.tolist() for a in dataset.lengths()] == [a.tolist() for a in with_index.lengths()]


def test_a_subset_of_the_shards_reads_only_their_rows(published: Path) -> None:
    first = sorted(published.glob("*.tar"))[:1]
    dataset = ShardDataset(first)
    assert [dataset.record(i)["id"] for i in range(len(dataset))] == ["img0", "img1", "img2", "img3"]


def test_a_file_that_is_not_an_index_is_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="other.parquet: not a shard index"):
        read_index(tmp_path / "other.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="broken.parquet: not a readable shard index"):
        read_index(tmp_path / "broken.parquet")


def test_dataset_refuses_an_index_naming_other_shards(published: Path) -> None:
    index = read_index(published / INDEX_NAME)
    with pytest.raises(ValueError, match="names shards that were not given"):
        ShardDataset(sorted(published.glob("*.tar"))[:1], index=index)


def test_streamed_index_reads_member_offsets_a_group_at_a_time(published: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """write_index puts whole shards in each row group; open_index then reads only the sampler's columns,
    and MemberReader gives every sample the members the whole index gives it, reading a row group when
    one of its shards is first reached. An index whose row groups split a shard is read whole."""
    import pickle

    import model.shard_index as shard_index
    from model.shard_index import SAMPLER_COLUMNS, MemberReader, open_index

    shards = sorted(published.glob("*.tar"))
    table = read_index(published / INDEX_NAME)  # as curation wrote it: 3 shards, one row group
    assert len(shards) == 3 and pq.read_metadata(published / INDEX_NAME).num_row_groups == 1
    monkeypatch.setattr(shard_index, "ROWS_PER_GROUP", 1)  # a group per shard, as at scale (16k rows)
    write_index(table, tmp_path / INDEX_NAME)
    assert pq.read_metadata(tmp_path / INDEX_NAME).num_row_groups == len(shards)
    light, members = open_index(tmp_path / INDEX_NAME)
    assert light.column_names == SAMPLER_COLUMNS and isinstance(members, MemberReader)
    eager = [dict(zip(m, zip(o, s))) for m, o, s in zip(*(table.column(c).to_pylist() for c in ("members", "offsets", "sizes")))]
    read_groups: list[int] = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **kw: read_groups.append(g) or original(self, g, **kw))
    assert [members(row) for row in range(table.num_rows)] == eager
    assert read_groups == list(range(len(shards)))  # each group once, when its shard is reached
    copy = pickle.loads(pickle.dumps(members))  # what a spawned DataLoader worker gets
    assert copy(table.num_rows - 1) == eager[-1]

    dataset = ShardDataset(shards, index=light, members=members)
    assert [dataset.raw(i) for i in range(len(dataset))] == [ShardDataset(shards).raw(i) for i in range(len(dataset))]

    pq.write_table(table, tmp_path / "split.parquet", row_group_size=2)  # groups that cut shards in two
    whole, none = open_index(tmp_path / "split.parquet")
    assert none is None and whole.column_names == table.column_names

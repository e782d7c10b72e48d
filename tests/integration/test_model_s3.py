"""Model folders and training shards served from the real local S3."""

from __future__ import annotations

from pathlib import Path

import torch

from model.builder import build_tiny, load_pretrained
from model.shard_index import INDEX_NAME
from model.shard_writer import write_shards
from model.shards import ShardDataset, open_shards
from onevision import storage
from onevision.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_checkpoint_published_to_s3_loads_identically(local_stack, tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    model, processor = build_tiny(recipe)
    model.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    storage.publish_dir(tmp_path / "hf", "s3://onevision/tests/models/tiny-hf")
    loaded, loaded_processor = load_pretrained("s3://onevision/tests/models/tiny-hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_unpublished_model_prefix_is_refused(local_stack, tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    storage.put_dir(tmp_path / "half", "s3://onevision/tests/models/half")
    try:
        load_pretrained("s3://onevision/tests/models/half")
    except storage.ManifestMissingError as err:
        assert "never published" in str(err)
    else:
        raise AssertionError("a prefix without manifest must not load")


def test_shards_stream_from_s3(local_stack, tmp_path: Path) -> None:
    records = [({"id": f"t{i}", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, {})
               for i in range(5)]
    write_shards(records, tmp_path / "shards", max_per_shard=2)
    storage.publish_dir(tmp_path / "shards", "s3://onevision/tests/shards/s1")
    dataset = ShardDataset(open_shards("s3://onevision/tests/shards/s1", cache_dir=tmp_path / "cache"))
    assert sorted(dataset.record(i)["id"] for i in range(len(dataset))) == [f"t{i}" for i in range(5)]


def test_a_stage_curated_before_the_index_is_indexed_once_into_the_cache(local_stack, tmp_path: Path, capsys) -> None:
    records = [({"id": f"o{i}", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, {})
               for i in range(5)]
    write_shards(records, tmp_path / "shards", max_per_shard=2)
    (tmp_path / "shards" / INDEX_NAME).unlink()  # what curation published before it wrote an index
    storage.publish_dir(tmp_path / "shards", "s3://onevision/tests/shards/old")
    first = ShardDataset(open_shards("s3://onevision/tests/shards/old", cache_dir=tmp_path / "cache"))
    assert f"no {INDEX_NAME}" in capsys.readouterr().out
    again = ShardDataset(open_shards("s3://onevision/tests/shards/old", cache_dir=tmp_path / "cache"))
    assert "no index" not in capsys.readouterr().out  # indexed once: the cache keeps it
    assert [again.record(i)["id"] for i in range(5)] == [first.record(i)["id"] for i in range(5)] == \
        [f"o{i}" for i in range(5)]

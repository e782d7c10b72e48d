"""Curation fanned out over partitions (issue 15, point 4), without KFP: each partition checks a slice of
every source, the merge publishes the bytes one pod would have, whatever the partition count; a missing
or corrupt partition stops the merge, naming it, and publishes nothing.

    pytest tests/unit/test_curate_partition.py -q

The kfp.local run of the same (ParallelFor over partition tasks, then the merge) is in
tests/integration/test_curate_fanout.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components.curate.core import DataRecipe, curate_data, run_data, run_partition
from components.curate.partition import PartitionError, partition_range, partition_uri, partitions_uri
from components.curate.sources import ParquetSource
from onevision import storage
from onevision_cli.main import main as onevision
from tests.unit.test_curate_core import _parquet, _png, _recipe, planted_corpus, q
from tests.unit.test_curate_exactness import _published


def fan_out_mixture(root: Path) -> list[dict]:
    """Three sources whose duplicates cross partition and source boundaries: the planted JSONL corpus
    (a copy of its first record 15 records later, a resized re-encode after it), a parquet file in row
    groups of 3, sampled at random (rows 9 and 10 left out), repeating the corpus's first image and question, and a JSON list that
    repeats a parquet row."""
    corpus = planted_corpus(root / "src")
    good = (root / "src" / "img" / "good.png").read_bytes()
    rows = [{"id": f"p{i}", "image": {"bytes": _png((40 + i, 40), (10 * i, 50, 0)), "path": f"{i}.png"},
             "conversations": q(f"Colour {i}?"), "data_source": "chart"} for i in range(13)]
    rows[11] = {"id": "p11-copy-of-good", "image": {"bytes": good, "path": "good.png"}, "conversations": q(),
               "data_source": "chart"}
    _parquet(root / "pq" / "part-0.parquet", rows)
    (root / "src" / "p4.png").write_bytes(rows[4]["image"]["bytes"])
    (root / "src" / "list.json").write_text(json.dumps(
        [{"id": "list-0", "image": "p4.png", "conversations": q("Colour 4?")},
         {"id": "list-1", "conversations": q("Say hi.", "Hi, nice to meet you.", "")}]))
    return [{"json_path": str(corpus)},
            {"dataset_uri": str(root / "pq"), "sampling_strategy": "random:85%"},
            {"json_path": str(root / "src" / "list.json")}]


def _data(tmp_path: Path, tiny_recipe) -> DataRecipe:
    recipe = _recipe(tiny_recipe, fan_out_mixture(tmp_path), workers=1, max_rejected_fraction=1.0)
    return DataRecipe.of(recipe, "stage2_si")


def _fan_out(data: DataRecipe, out: str, n: int, work: Path) -> dict:
    for p in range(n):
        run_partition(data, out, p, n, work_dir=str(work / f"pod-{p}"))  # each pod its own folder
    return run_data(data, out, partition_uris=[partition_uri(out, p, n) for p in range(n)],
                    work_dir=str(work / "merge"))


def test_any_partition_count_publishes_the_bytes_of_one_pod(tmp_path: Path, tiny_recipe) -> None:
    data = _data(tmp_path, tiny_recipe)
    one = curate_data(data, str(tmp_path / "one"))
    assert one["totals"]["duplicates"] >= 4  # the mixture exercises dedup across partitions and sources
    for n in (3, 7):
        out = str(tmp_path / f"fan-{n}")
        summary = _fan_out(data, out, n, tmp_path / f"work-{n}")
        assert summary["partitions"] == n and summary["totals"] == one["totals"]
        assert _published(Path(out)) == _published(tmp_path / "one"), n
        assert not storage.list_uris(partitions_uri(out))  # spent partitions are removed
    quarantine = [json.loads(line) for line in (tmp_path / "one" / "quarantine.jsonl").read_text().splitlines()]
    codes = {e["id"]: e["reason_code"] for e in quarantine}
    assert codes["duplicate"] == "duplicate" and codes["p11-copy-of-good"] == "duplicate"
    assert codes["list-0"] == "duplicate" and codes["near-duplicate"] == "near_duplicate"


def test_a_missing_or_corrupt_partition_stops_the_merge_and_a_rerun_completes(tmp_path: Path, tiny_recipe) -> None:
    data = _data(tmp_path, tiny_recipe)
    out, n = str(tmp_path / "out"), 3
    for p in (0, 2):
        assert run_partition(data, out, p, n)["reused"] is False
    uris = [partition_uri(out, p, n) for p in range(n)]
    with pytest.raises(PartitionError, match=r"0001-of-0003: no partition of data recipe"):
        run_data(data, out, partition_uris=uris)
    assert not (tmp_path / "out").exists()  # nothing published

    assert run_partition(data, out, 1, n)["records"] > 0
    assert run_partition(data, out, 1, n)["reused"] is True  # a retried pod does the work once
    tar = Path(uris[2]) / "source-0001.tar"
    body = bytearray(tar.read_bytes())
    body[len(body) // 2] ^= 0xFF  # one corrupt byte inside a member: only the manifest can tell
    tar.write_bytes(bytes(body))
    with pytest.raises(storage.StorageError, match="0002-of-0003/source-0001.tar: size/sha256 differ"):
        run_data(data, out, partition_uris=uris)
    assert not (tmp_path / "out" / storage.MANIFEST_NAME).exists()

    storage.delete(storage.join(uris[2], storage.MANIFEST_NAME))  # what a withdrawn partition looks like
    run_partition(data, out, 2, n)
    merged = run_data(data, out, partition_uris=uris)
    assert merged["reused"] is False and merged["kept"] == curate_data(data, str(tmp_path / "one"))["totals"]["kept"]
    assert run_partition(data, out, 0, n)["reused"] is True  # the stage is there: a late pod checks nothing


def test_partitions_of_another_count_or_data_recipe_are_refused(tmp_path: Path, tiny_recipe) -> None:
    data = _data(tmp_path, tiny_recipe)
    out = str(tmp_path / "out")
    run_partition(data, out, 0, 2)
    run_partition(data, out, 1, 3)
    with pytest.raises(PartitionError, match=r"partitions 0..1 of 2, each once; got \['0/2', '1/3'\]"):
        run_data(data, out, partition_uris=[partition_uri(out, 0, 2), partition_uri(out, 1, 3)])
    other = dataclasses.replace(data, data=data.data[:2], sources=data.sources[:2])  # another mixture
    with pytest.raises(PartitionError, match="no partition of data recipe"):
        run_data(other, out, partition_uris=[partition_uri(out, 0, 2)])
    with pytest.raises(PartitionError, match="partition 3 is not one of 0..2"):
        partition_range(10, 3, 3)


def test_parquet_partitions_read_only_their_row_groups(tmp_path: Path, tiny_recipe, monkeypatch) -> None:
    fan_out_mixture(tmp_path)
    first = pq.read_table(tmp_path / "pq" / "part-0.parquet")
    (tmp_path / "pq2").mkdir()
    pq.write_table(first.slice(0, 7), tmp_path / "pq2" / "a.parquet", row_group_size=3)
    pq.write_table(first.slice(7), tmp_path / "pq2" / "b.parquet", row_group_size=3)
    source = ParquetSource([str(tmp_path / "pq2" / "a.parquet"), str(tmp_path / "pq2" / "b.parquet")], "pq2")
    everything = [(r.index, r.record["id"]) for r in source.records()]
    assert [i for i, _ in everything] == list(range(13))
    read_groups: list[list[int]] = []
    original = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        read_groups.append(list(kwargs.get("row_groups") or []))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    assert [(r.index, r.record["id"]) for r in source.records_between(5, 9)] == everything[5:9]
    assert read_groups == [[1, 2], [0]]  # a.parquet rows 3-6 (groups 1, 2), b.parquet rows 7-9 (group 0)


def test_the_command_line_runs_partitions_and_the_merge(tmp_path: Path, tiny_recipe, capsys) -> None:
    from onevision.recipe import dump_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(_recipe(tiny_recipe, fan_out_mixture(tmp_path), workers=1,
                                        max_rejected_fraction=1.0)))
    out = str(tmp_path / "out")
    base = ["curate", "--recipe", str(path), "--stage", "stage2_si", "--out", out]
    for bad in (["--partitions", "0"], ["--partition", "2/2"], ["--partition", "x"]):
        with pytest.raises(SystemExit) as exit_:
            onevision([*base, *bad])
        assert exit_.value.code == 2 and (bad[1] in capsys.readouterr().err)
    assert onevision([*base, "--partition", "0/2"]) == 0
    assert "partition 0/2:" in capsys.readouterr().out
    assert onevision([*base, "--partitions", "2"]) == 2
    assert "0001-of-0002: no partition" in capsys.readouterr().err
    assert onevision([*base, "--partition", "1/2"]) == 0
    assert onevision([*base, "--partitions", "2"]) == 0
    assert "published" in capsys.readouterr().out and storage.read_manifest(out)["files"]

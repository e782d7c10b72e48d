"""Curation against the real local stack: sources, media tar and parquet on S3, shards published to S3
and read back by the training dataset, the data card logged to the step's MLflow run."""

from __future__ import annotations

import json
import sys
import tarfile
import uuid
from pathlib import Path

from mlflow.tracking import MlflowClient

from components.curate.core import run
from model.shards import ShardDataset, open_shards
from onevision import storage, tracking
from onevision.recipe import dump_recipe, parse_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_curate_core import _parquet, _png, planted_corpus, q  # noqa: E402


def test_s3_sources_to_s3_shards_with_data_card_in_mlflow(local_stack: object, tmp_path: Path, tiny_recipe) -> None:
    prefix = f"s3://onevision/it-curate-{uuid.uuid4().hex[:8]}"
    data = planted_corpus(tmp_path / "src")
    with tarfile.open(tmp_path / "media.tar", "w") as tar:
        tar.add(tmp_path / "src" / "img", arcname="img")
    storage.put_file(data, f"{prefix}/src/data.jsonl")
    storage.put_file(tmp_path / "media.tar", f"{prefix}/src/media.tar")
    _parquet(tmp_path / "pq" / "part-0.parquet",
             [{"id": f"p{i}", "image": {"bytes": _png((48, 40), (i, 1, 2)), "path": "x.png"},
               "conversations": q(f"What is {i}?"), "data_source": "s3"} for i in range(5)])
    storage.put_file(tmp_path / "pq" / "part-0.parquet", f"{prefix}/pq/part-0.parquet")

    doc = tiny_recipe.model_dump(mode="json")
    doc["stages"]["stage2_si"]["data"] = [
        {"json_path": f"{prefix}/src/data.jsonl", "media_root": f"{prefix}/src/media.tar"},
        {"dataset_uri": f"{prefix}/pq"}]
    doc["curation"]["workers"] = 2
    doc["curation"]["max_rejected_fraction"] = 1.0  # the planted corpus is mostly defects, on purpose
    recipe = parse_recipe(doc)
    storage.write_bytes(f"{prefix}/recipe.yaml", dump_recipe(recipe).encode())
    parent = tracking.ensure_pipeline_run(recipe, f"it-curate-{uuid.uuid4().hex[:6]}")

    summary = run(f"{prefix}/recipe.yaml", "stage2_si", f"{prefix}/out", mlflow_parent=parent,
                  work_dir=str(tmp_path / "work"), keep_work=True)
    assert summary["totals"] == {"records_in": 28, "kept": 9, "duplicates": 2, "rejected": 17}
    # streamed, not copied: the kept work folder holds the staging copy of the output and no source
    kept = [p.name for p in (tmp_path / "work").rglob("*") if p.is_file()]
    assert "quarantine.jsonl" in kept and not {"data.jsonl", "media.tar", "part-0.parquet"} & set(kept), kept
    assert summary["manifest_sha256"] == storage.manifest_hash(f"{prefix}/out")

    shards = ShardDataset(open_shards(f"{prefix}/out", cache_dir=tmp_path / "cache"))
    assert sorted(str(shards.record(i)["id"]) for i in range(len(shards))) == sorted(
        ["good", "good-text", "good-other-question", "mc", "p0", "p1", "p2", "p3", "p4"])
    quarantine = storage.read_bytes(f"{prefix}/out/quarantine.jsonl").decode().splitlines()
    assert len(quarantine) == 19 and all(json.loads(line)["reason"] for line in quarantine)

    client = MlflowClient()
    step = next(r for r in client.search_runs([client.get_run(parent).info.experiment_id],
                                              f"tags.`mlflow.parentRunId` = '{parent}'"))
    assert step.data.tags[tracking.TAG_STEP] == "curate_stage2_si"
    assert step.data.metrics["kept"] == 9 and step.data.metrics["records_per_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(step.info.run_id)}
    assert {"data_card.json", "data_card.md"} <= artifacts

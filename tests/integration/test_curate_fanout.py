"""Curation fanned out over pods under kfp.local (issue 15, point 4): the pipeline's own curate tasks
(pipelines.onevision.curate_tasks) with 1 partition and with 3 (a ParallelFor of partition tasks, each a
subprocess with a scratch folder of its own, then the merging curate task) publish the same bytes from
sources on S3, the only thing the simulated pods share.

    pytest tests/integration/test_curate_fanout.py -q
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's real annotation objects.
import json
import uuid
from pathlib import Path

import pytest
from kfp import dsl

from components.curate.datarecipe import DataRecipe
from components.curate.partition import partitions_uri
from onevision import storage
from pipelines.onevision import curate_tasks
from tests.unit.test_curate_core import _recipe
from tests.unit.test_curate_partition import fan_out_mixture


def _upload_mixture(tmp_path: Path, root: str) -> list[dict]:
    """fan_out_mixture's files put on S3, its sources pointed there."""
    mixture = fan_out_mixture(tmp_path / "src")
    storage.put_dir(tmp_path / "src", root)
    local = str(tmp_path / "src")
    return [{key: value.replace(local, root) if key in ("json_path", "dataset_uri") else value
             for key, value in entry.items()} for entry in mixture]


def fan_out_pipeline(partitions: int):
    @dsl.pipeline(name=f"curate-fan-out-{partitions}")
    def curate_stage(data_recipe: str, out_uri: str) -> str:
        return curate_tasks("stage2_si", data_recipe, out_uri, 1, partitions).outputs["shards_uri"]

    return curate_stage


def _published(uri: str) -> tuple[dict, dict[str, bytes]]:
    files = storage.read_manifest(uri)["files"]
    return files, {rel: storage.read_bytes(storage.join(uri, rel)) for rel in files}


# kfp.local warns that a non-Python base_image may lack dependencies; here the subprocess is this venv.
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_three_partition_pods_and_a_merge_publish_what_one_pod_does(local_stack: object, kfp_local: Path,
                                                                    tmp_path: Path, tiny_recipe) -> None:
    root = f"s3://onevision/tests/curate-fanout/{uuid.uuid4().hex[:12]}"
    mixture = _upload_mixture(tmp_path, f"{root}/sources")
    assert all(e.get("json_path", e.get("dataset_uri", "")).startswith("s3://") for e in mixture)
    data = DataRecipe.of(_recipe(tiny_recipe, mixture, workers=1, max_rejected_fraction=1.0), "stage2_si")

    outs = {}
    for n in (1, 3):
        outs[n] = data.curated_uri(f"{root}/curated-{n}")
        run = fan_out_pipeline(n)(data_recipe=data.to_json(), out_uri=outs[n])
        assert run.output == outs[n]
    one, three = _published(outs[1]), _published(outs[3])
    assert one == three  # the same kept records in the same order, the same quarantine, card and index
    assert b'"reason_code": "duplicate"' in one[1]["quarantine.jsonl"]
    assert not storage.list_uris(partitions_uri(outs[3]))  # spent partitions removed by the merge
    # three partition tasks ran, each a process of its own, and split the records between them
    outputs = [json.loads(p.read_text())["parameterValues"]
               for p in sorted(kfp_local.glob("curate-fan-out-3-*/for-loop-*-iteration-*/curate-partition/executor_output.json"))]
    assert [o["partition_uri"].rsplit("/", 1)[1] for o in outputs] == ["0000-of-0003", "0001-of-0003", "0002-of-0003"]
    card = json.loads(one[1]["curation.json"])
    assert sum(o["records"] for o in outputs) == card["totals"]["records_in"] and min(o["records"] for o in outputs) > 0
    assert not any(o["reused"] for o in outputs)
    # media beside an S3 records file (no media_root) is found: only the planted missing file is missing
    assert [e["id"] for e in map(json.loads, one[1]["quarantine.jsonl"].splitlines())
            if e["reason_code"] == "media_missing"] == ["missing"]

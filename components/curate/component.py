"""The curate step as a KFP v2 component: a thin wrapper over `components.curate.core.run_data`.

    from kfp import dsl
    from components.curate.component import curate

    @dsl.pipeline
    def flow(recipe_uri: str):
        pre = preflight(...)                                   # pins each stage's data recipe
        cur = curate(data_recipe=pre.outputs["stage1_data_recipe"], out_uri=pre.outputs["stage1_data_uri"],
                     workers=0)
        cur.outputs["shards_uri"]          # s3://onevision/curated/<recipe>/stage1/<data recipe hash>
        cur.outputs["data_card"]           # Markdown artifact, shown in the KFP UI

Locally: `kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False))`, then call `curate(...)`.

Fanned out (recipe `curation.partitions` > 1; pipelines/onevision.py `curate_tasks`): a dsl.ParallelFor of
`curate_partition` tasks, one per partition, each checking its slice of every source, then one `curate`
task given `partition_uris=dsl.Collected(...)`, which merges them (components/curate/partition.py).

Cached across runs: its inputs are the stage's data recipe (JSON, components/curate/datarecipe.py) and
the content-addressed prefix derived from it, nothing run-specific (no run id, no MLflow parent), so a
second pipeline run with the same data hits KFP's cache on a cluster; where the cache is off or missed
(kfp.local, a changed worker count), the core finds the published manifest and reuses it (`reused`).
The stage's training run logs the data card to MLflow (model.metrics), so lineage needs no curate run.
Large data never passes through KFP: the shards are published by the core under `out_uri` (objects
first, manifest last); the outputs carry only that URI, the manifest hash (the lineage key) and counts.
`workers=0` means the recipe's `curation.workers`.

The function body imports what it needs itself (KFP ships only the function's source to the pod), and
installs nothing (`install_kfp_package=False`, no packages_to_install): the project image (PROJECT_IMAGE)
already holds the code and kfp. No `from __future__ import annotations` here: KFP reads the real
annotation objects to build the component's interface.
"""

from typing import List, NamedTuple

from kfp import dsl

from components import PROJECT_IMAGE


# install_kfp_package=False: with only base_image, KFP still prepends `pip install kfp==<version>` to the
# command; the project image already has kfp (and everything else) installed.
@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def curate(
    data_recipe: str,
    out_uri: str,
    workers: int,
    data_card: dsl.Output[dsl.Markdown],
    metrics: dsl.Output[dsl.Metrics],
    partition_uris: List[str] = [],  # noqa: B006 - a KFP default, never mutated
) -> NamedTuple("Outputs", [("shards_uri", str), ("manifest_sha256", str), ("kept", int), ("reused", bool)]):
    """Curate one stage's data recipe (JSON) into shards published under out_uri, or reuse them; with
    partition_uris (curate_partition's, collected from a ParallelFor), merge those instead of reading."""
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from components.curate.core import DataRecipe, run_data

    data = DataRecipe.from_json(data_recipe)
    with tempfile.TemporaryDirectory(prefix="curate-") as scratch:  # sources, staging: what matters is published
        result = run_data(data, out_uri, workers=workers or None, work_dir=scratch, partition_uris=partition_uris)

    Path(data_card.path).parent.mkdir(parents=True, exist_ok=True)
    Path(data_card.path).write_text(result["card_markdown"], encoding="utf-8")
    data_card.metadata.update({"uri": result["uri"], "manifest_sha256": result["manifest_sha256"],
                               "stage": data.stage, "data_recipe_hash": data.hash()})
    for name in ("kept", "duplicates", "rejected"):  # Metrics metadata holds only numbers (the UI's scalars)
        metrics.log_metric(name, int(result[name]))

    outputs = namedtuple("Outputs", ["shards_uri", "manifest_sha256", "kept", "reused"])
    return outputs(result["uri"], result["manifest_sha256"], int(result["kept"]), bool(result["reused"]))


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def curate_partition(
    data_recipe: str,
    out_uri: str,
    partition: int,
    partitions: int,
    workers: int,
) -> NamedTuple("Outputs", [("partition_uri", str), ("records", int), ("reused", bool)]):
    """Check partition `partition` of `partitions` of every source of the stage and publish it beside
    out_uri for the merging `curate` task (nothing to do when the stage or this partition is published)."""
    import tempfile
    from collections import namedtuple

    from components.curate.core import DataRecipe, run_partition

    data = DataRecipe.from_json(data_recipe)
    with tempfile.TemporaryDirectory(prefix="curate-partition-") as scratch:
        result = run_partition(data, out_uri, partition, partitions, workers=workers or None, work_dir=scratch)
    outputs = namedtuple("Outputs", ["partition_uri", "records", "reused"])
    return outputs(result["partition_uri"], int(result["records"]), bool(result["reused"]))

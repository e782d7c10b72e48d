"""The curate step as a KFP v2 component: a thin wrapper over `components.curate.core.run`.

    from kfp import dsl
    from components.curate.component import curate

    @dsl.pipeline
    def flow(recipe_uri: str, stage1_data: str, mlflow_parent: str = ""):
        cur = curate(recipe_uri=recipe_uri, stage="stage1", out_uri=stage1_data,
                     workers=0, mlflow_parent=mlflow_parent)
        cur.outputs["shards_uri"]          # s3://... prefix with shard-*.tar and _MANIFEST.json
        cur.outputs["data_card"]           # Markdown artifact, shown in the KFP UI

Locally: `kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False))`, then call `curate(...)`.

Large data never passes through KFP: the shards are published by the core under `out_uri` (objects first,
manifest last); the KFP outputs carry only that URI, the manifest hash (the data's lineage key) and counts.
The data card Markdown (small) is the one artifact, with `uri` and `manifest_sha256` in its metadata.
`workers=0` means the recipe's `curation.workers` (KFP has no None); `mlflow_parent=""` means no MLflow.

The function body imports what it needs itself (KFP ships only the function's source to the pod), and
installs nothing (`install_kfp_package=False`, no packages_to_install): the project image (PROJECT_IMAGE)
already holds the code and kfp. No `from __future__ import annotations` here: KFP reads the real
annotation objects to build the component's interface.
"""

from typing import NamedTuple

from kfp import dsl

from components import PROJECT_IMAGE


# install_kfp_package=False: with only base_image, KFP still prepends `pip install kfp==<version>` to the
# command; the project image already has kfp (and everything else) installed.
@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def curate(
    recipe_uri: str,
    stage: str,
    out_uri: str,
    workers: int,
    mlflow_parent: str,
    data_card: dsl.Output[dsl.Markdown],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("Outputs", [("shards_uri", str), ("manifest_sha256", str), ("kept", int)]):
    """Curate one stage's data mixture of the recipe into shards published under out_uri."""
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from components.curate.core import run

    with tempfile.TemporaryDirectory(prefix="curate-") as scratch:  # sources, staging: what matters is published
        result = run(recipe_uri, stage, out_uri, workers=workers or None, mlflow_parent=mlflow_parent or None,
                     work_dir=scratch)

    Path(data_card.path).parent.mkdir(parents=True, exist_ok=True)
    Path(data_card.path).write_text(result["card_markdown"], encoding="utf-8")
    data_card.metadata.update({"uri": result["uri"], "manifest_sha256": result["manifest_sha256"], "stage": stage})
    for name in ("kept", "duplicates", "rejected"):  # Metrics metadata holds only numbers (the UI's scalars)
        metrics.log_metric(name, int(result[name]))

    outputs = namedtuple("Outputs", ["shards_uri", "manifest_sha256", "kept"])
    return outputs(result["uri"], result["manifest_sha256"], int(result["kept"]))

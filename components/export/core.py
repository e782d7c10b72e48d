"""Export a checkpoint for serving: a self-contained Triton model repository and the KServe manifests.

    python -m components.export.core --recipe recipes/tiny.yaml --model s3://onevision/runs/tiny/r1/stage2_ov/hf \
        --out s3://onevision/runs/tiny/r1/export

Published under `out` (manifest last): `triton/<name>/{config.pbtxt, 1/model.py, 1/weights/...}` (the
recipe's triton target: name, max batch size, one instance over its GPUs when it asks for any; weights copied in, so
KServe's storage initializer fetches one folder and the Triton pod needs no S3 credentials), and
`manifests/*.yaml` (serving.manifests for every deploy target, storage pointing at `model` and at the
repository just published). The deploy step and GitOps overlays apply these manifests.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import sys
from pathlib import Path
from typing import Any

from onevision import storage
from onevision.recipe import load_recipe
from onevision.cli_exit import run_command


def run(recipe_uri: str, model_uri: str, out_uri: str, work_dir: str | None = None) -> dict[str, Any]:
    """Build and publish the serving artifacts of `model_uri` (an HF folder, path or s3://)."""
    from serving.manifests import render, write
    from serving.triton_repo import build_model_repository, instance_kind_for

    recipe = load_recipe(recipe_uri)
    triton = next((t for t in recipe.deploy if t.kind == "triton"), None)
    name = triton.name if triton else "onevision"
    try:
        published = storage.read_manifest(out_uri)
    except storage.ManifestMissingError:
        published = None
    if published and published["metadata"].get("model") == model_uri:  # a resumed run: already exported
        return {"uri": out_uri, "triton_uri": storage.join(out_uri, "triton"), "triton_model": name,
                "manifests": sorted(f.split("/")[-1] for f in published["files"] if f.startswith("manifests/")),
                "manifest_sha256": storage.manifest_hash(out_uri)}
    with tempfile.TemporaryDirectory(prefix="export-", dir=work_dir) as staging:
        build_model_repository(model_uri, Path(staging) / "triton", name=name,
                               max_batch_size=triton.max_batch_size if triton else 8, copy_weights=True,
                               instance_kind=instance_kind_for(triton.gpus if triton else 0))
        triton_uri = storage.join(out_uri, "triton")
        manifests = write(render(recipe, model_uri, triton_uri), Path(staging) / "manifests")
        storage.publish_dir(staging, out_uri, metadata={"model": model_uri, "triton_model": name,
                                                        "recipe_hash": recipe.hash()})
    return {"uri": out_uri, "triton_uri": triton_uri, "triton_model": name,
            "manifests": sorted(p.name for p in manifests), "manifest_sha256": storage.manifest_hash(out_uri)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe YAML, local path or s3://")
    parser.add_argument("--model", required=True, help="the checkpoint's HF folder, local or s3://")
    parser.add_argument("--out", required=True, help="where the export is published (path or s3://)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.recipe, args.model, args.out), indent=1))


if __name__ == "__main__":
    sys.exit(run_command("export", main))

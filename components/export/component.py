"""The export step as a KFP v2 component: a thin wrapper over `components.export.core.run`.

    from components.export.component import export
    exported = export(recipe_uri=recipe_uri, model_uri=model_uri, out_uri=f"{run_prefix}/export")
    exported.outputs["triton_uri"]        # the Triton model repository in S3 (KServe storageUri)

Only URIs and the manifest hash cross KFP; the repository (with weights) is published by the core.
No `from __future__ import annotations`: KFP reads the real annotation objects.
"""

from typing import NamedTuple

from kfp import dsl

from components import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def export(recipe_uri: str, model_uri: str, out_uri: str
           ) -> NamedTuple("Outputs", [("triton_uri", str), ("manifests_uri", str), ("manifest_sha256", str)]):
    """Build the Triton model repository and KServe manifests for model_uri; publish under out_uri."""
    import tempfile
    from collections import namedtuple

    from components.export.core import run

    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        result = run(recipe_uri, model_uri, out_uri, work_dir=scratch)
    outputs = namedtuple("Outputs", ["triton_uri", "manifests_uri", "manifest_sha256"])
    return outputs(result["triton_uri"], f"{out_uri.rstrip('/')}/manifests", result["manifest_sha256"])

"""The register and deploy steps as KFP v2 components (thin wrappers over core.register and promote.deploy).

    reg = register_model(recipe_uri=..., model_uri=ov_hf, evaluation_uri=ev_uri, export_uri=ex_uri,
                         pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    with dsl.If(reg.outputs["candidate"] == True):
        deploy_endpoint(name=reg.outputs["name"], version=reg.outputs["version"], env="dev", gitops_repo=...)

No `from __future__ import annotations`: KFP reads the real annotation objects.
"""

from typing import NamedTuple

from kfp import dsl

from components import PROJECT_IMAGE


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def register_model(recipe_uri: str, model_uri: str, evaluation_uri: str, export_uri: str, pipeline_run_id: str,
                   model_card: dsl.Output[dsl.Markdown], data_uris: dict = {}, checkpoints: dict = {}
                   ) -> NamedTuple("Outputs", [("name", str), ("version", str), ("candidate", bool)]):
    """Register model_uri (the merged HF folder in S3) as a version with lineage, scores, gate and card.
    data_uris / checkpoints map each stage to its curated shards / checkpoint (lineage tags, model card)."""
    from collections import namedtuple
    from pathlib import Path

    from components.register.core import register

    result = register(recipe_uri, model_uri, evaluation_uri, pipeline_run_id, export_uri=export_uri or None,
                      data_uris=data_uris or None, checkpoints=checkpoints or None)
    Path(model_card.path).parent.mkdir(parents=True, exist_ok=True)
    Path(model_card.path).write_text(result["model_card"], encoding="utf-8")
    model_card.metadata.update({"name": result["name"], "version": result["version"]})
    outputs = namedtuple("Outputs", ["name", "version", "candidate"])
    return outputs(result["name"], str(result["version"]), bool(result["candidate"]))


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def deploy_endpoint(name: str, version: str, env: str, gitops_repo: str, canary_percent: int
                    ) -> NamedTuple("Outputs", [("branch", str), ("commit", str)]):
    """Write the endpoint overlay of a gated version for a non-production env (a GitOps branch)."""
    from collections import namedtuple

    from components.register.promote import deploy

    result = deploy(name, version, env, gitops_repo, canary_percent or None)
    outputs = namedtuple("Outputs", ["branch", "commit"])
    return outputs(result["branch"], result["commit"])

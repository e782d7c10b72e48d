"""The train step's multi-node path end to end, short of a cluster: `components.train.core.run` on a stage
the recipe spreads over nodes builds the TrainJob, saves it, submits it through the real `kubernetes`
client (configured from a kubeconfig, as on a workstation) to the fake API server of
test_trainjob_api.py, follows it to Complete, and returns only once the stage's checkpoint is published."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.train.core import TrainStepError, run
from onevision import storage
from tests.integration.test_trainjob_api import NS, cluster  # noqa: F401 - the fake API server fixture

ROOT = Path(__file__).resolve().parents[2]


def kubeconfig(tmp_path: Path, host: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": host}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "not-a-secret"}}]}))
    return path


def publish_when_submitted(state: Any, out: str, tmp_path: Path) -> threading.Thread:
    """What the job's rank 0 does at the end: publish <out>/hf (here as soon as the TrainJob is posted)."""
    def publish() -> None:
        deadline = time.monotonic() + 20
        while not state.posted and time.monotonic() < deadline:
            time.sleep(0.02)
        folder = tmp_path / "hf"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        storage.publish_dir(folder, f"{out}/hf", metadata={"steps": 7, "train_loss": 1.5})

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("published", [True, False])
def test_a_multi_node_stage_runs_as_a_trainjob(local_stack, cluster, tmp_path: Path,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch, published: bool) -> None:
    state, client = cluster
    import kubernetes.config.kube_config

    # $KUBECONFIG, as the client reads it at import: a workstation pointed at the fake API server
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        str(kubeconfig(tmp_path, client.configuration.host)))
    monkeypatch.setenv("ONEVISION_NAMESPACE", NS)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    out = f"s3://onevision/it-train-step-{uuid.uuid4().hex[:6]}/stage2_si"
    job_file = tmp_path / "trainjob.json"
    publisher = publish_when_submitted(state, out, tmp_path) if published else None
    call = lambda: run("recipes/ov-7b.yaml", "stage2_si", "s3://onevision/d", out, "s3://onevision/i/hf",  # noqa: E731
                       run_id="r1", trainjob_path=str(job_file), timeout_s=20, poll_s=0.05,
                       node_selector={"pool": "h200"}, tolerations=[])
    if published:
        result = call()
        publisher.join()
        assert result["mode"] == "trainjob" and result["hf_uri"] == f"{out}/hf" and result["steps"] == 7
    else:
        with pytest.raises(TrainStepError, match="not published"):
            call()
    (posted,) = state.posted
    assert json.loads(job_file.read_text()) == posted  # the step's artifact is the manifest submitted
    trainer = posted["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["args"][trainer["args"].index("--out") + 1] == out
    assert posted["metadata"]["name"] == "ov-r1-stage2-si" and posted["metadata"]["namespace"] == NS
    pod = posted["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["template"]["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "h200"}  # the pipeline's JSON

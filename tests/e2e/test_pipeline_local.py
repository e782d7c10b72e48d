"""`onevision run --recipe recipes/tiny.yaml` (what `make run` calls): the whole KFP DAG under kfp.local,
against the session's local stack, interrupted during Stage-2 and resumed, then once more with a gate
that must fail.

The main run is killed (SIGKILL to its whole process group) once Stage-2 SI has published a checkpoint,
then rerun with the same run id: finished steps are not redone, the stage resumes from its checkpoint,
and the DAG goes on to evaluate, export, register and deploy. (That killed-and-resumed training equals an
uninterrupted one, weight for weight, is tests/integration/test_faults.py's job.) Checked here: every
step's output in S3, the MLflow run tree, the registered version with its lineage tags and aliases, the
deploy branch in the GitOps repository, and that the model learned (`pytest -s` prints the scores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from onevision import storage, tracking
from onevision.recipe import STAGE_NAMES as STAGES
from onevision.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RUN = "e2e-1"
PREFIX = f"s3://onevision/runs/tiny/{RUN}"
CLI = str(Path(sys.executable).parent / "onevision")


def cli_args(local_stack, gitops: Path, run_id: str) -> list[str]:
    return [CLI, "run", "--recipe", "recipes/tiny.yaml", "--state-dir", str(local_stack.state_dir),
            "--run-id", run_id, "--gitops-repo", str(gitops)]


def run_cli(local_stack, gitops: Path, run_id: str = RUN, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(local_stack, gitops, run_id), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def task_logs(local_stack, run_id: str = RUN) -> str:
    """Every task's full output of a run, as `onevision run` keeps it (the console shows a line per task)."""
    folder = Path(local_stack.state_dir) / "runs" / run_id / "logs"
    attempts = sorted(folder.glob("attempt-*"), key=lambda p: int(p.name.split("-")[1]))
    return "".join(p.read_text() for p in sorted(attempts[-1].glob("*.log")))  # the latest attempt


def curated(prefix: str = PREFIX) -> dict[str, str]:
    """{stage: the content-addressed prefix of its curated data}, as the run's preflight pinned them."""
    plan = json.loads(storage.read_bytes(f"{prefix}/recipe/data.json"))
    return {stage: plan[stage]["data_uri"] for stage in STAGES}


def kill_once_stage2_si_checkpointed(local_stack, gitops: Path, log: Path) -> dict[str, str]:
    """Start the run, SIGKILL it (all its processes) after Stage-2 SI's first complete checkpoint.
    Returns the manifests' hashes of what had finished by then."""
    from model.train import latest_complete_checkpoint

    with log.open("w") as out:
        proc = subprocess.Popen(cli_args(local_stack, gitops, RUN), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 2400
        try:
            while latest_complete_checkpoint(f"{PREFIX}/stage2_si") is None:
                assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no Stage-2 SI checkpoint in time"
                time.sleep(2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # kfp.local's topological order may curate stage2_ov before or after Stage-2 SI trains
    data = curated()
    published = [uri for uri in [*data.values(), *(f"{PREFIX}/{s}/hf" for s in STAGES)]
                 if storage.exists(f"{uri}/{storage.MANIFEST_NAME}")]
    assert {data["stage2_si"], f"{PREFIX}/stage1/hf", f"{PREFIX}/stage1_5/hf"} <= set(published)
    assert f"{PREFIX}/stage2_si/hf" not in published
    return {uri: storage.manifest_hash(uri) for uri in published}


@pytest.fixture(scope="module")
def gitops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("gitops") / "gitops.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(repo)], check=True)
    return repo


@pytest.fixture(scope="module")
def flow(local_stack, gitops: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    log = tmp_path_factory.mktemp("e2e") / "killed.log"
    before_kill = kill_once_stage2_si_checkpointed(local_stack, gitops, log)
    done = run_cli(local_stack, gitops)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    print(done.stdout[-2500:])
    return {"before_kill": before_kill, "resumed": done, "logs": task_logs(local_stack)}


def test_every_step_published_its_outputs(flow) -> None:
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    assert storage.read_manifest(f"{PREFIX}/recipe")["metadata"]["recipe_hash"] == recipe.hash()
    for stage, data_uri in curated().items():
        assert data_uri.startswith(f"s3://onevision/curated/tiny/{stage}/")  # content-addressed, outside the run
        assert storage.read_manifest(data_uri)["metadata"]["kept"] > 0
        hf = storage.read_manifest(f"{PREFIX}/{stage}/hf")
        assert {"config.json", "model.safetensors", "processor_config.json"} <= set(hf["files"])
        meta = hf["metadata"]
        assert meta["eval_loss_after"] < meta["eval_loss_before"], stage
        print(f"{stage}: held-out loss {meta['eval_loss_before']:.3f} -> {meta['eval_loss_after']:.3f}")
    for stage in ("stage2_si", "stage2_ov"):
        assert {"results.json", "gate.json", "comparison.md"} <= set(storage.read_manifest(f"{PREFIX}/evaluate/{stage}")["files"])
    exported = storage.read_manifest(f"{PREFIX}/export")
    assert exported["metadata"]["model"] == f"{PREFIX}/stage2_ov/hf"
    assert any(f.startswith("triton/") and f.endswith("config.pbtxt") for f in exported["files"])
    assert any(f.startswith("manifests/") for f in exported["files"])


def test_the_interrupted_run_resumed_without_redoing_finished_steps(flow) -> None:
    after = {uri: storage.manifest_hash(uri) for uri in flow["before_kill"]}
    assert after == flow["before_kill"]  # republishing would have rewritten them
    assert "stage2_si: resuming from" in flow["logs"]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("onevision-tiny")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{tracking.TAG_PIPELINE_RUN}` = '{RUN}'")
    steps = [r.data.tags[tracking.TAG_STEP] for r in runs]
    for step in ("pipeline", "stage1", "stage1_5", "stage2_si"):
        assert steps.count(step) == 1, (step, sorted(steps))  # the resumed stage continued its own run
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    si = next(r for r in runs if r.data.tags[tracking.TAG_STEP] == "stage2_si")
    logged_steps = {m.step for m in client.get_metric_history(si.info.run_id, "loss")}
    assert len(logged_steps) == recipe.stages.stage2_si.max_steps


def test_mlflow_has_the_run_tree_and_training_metrics(flow) -> None:
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("onevision-tiny")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{tracking.TAG_PIPELINE_RUN}` = '{RUN}'")
    by_step = {r.data.tags[tracking.TAG_STEP]: r for r in runs}
    assert {"pipeline", "preflight", "evaluate_stage2_si", "evaluate_stage2_ov", *STAGES} <= set(by_step), sorted(by_step)
    parent = by_step["pipeline"].info.run_id
    data = curated()
    for stage in STAGES:
        run = by_step[stage]
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.params["stage.lr"] == str(getattr(recipe.stages, stage).lr)
        # the data it trained on: curation is cached across runs, so its lineage lives in the stage's run
        assert run.data.params["data_uri"] == data[stage] and run.data.metrics["data_kept"] > 0
        assert "data_card.md" in {a.path for a in client.list_artifacts(run.info.run_id)}
        for key in ("grad_norm", "samples_per_s", "tokens_per_s", "mfu", "peak_memory_gb", "lr_rest"):
            assert key in run.data.metrics, (stage, key)
    assert "lr_vision_tower" in by_step["stage2_si"].data.metrics
    assert "lr_vision_tower" not in by_step["stage1"].data.metrics

    # the parent spans the pipeline run (killed once, resumed into the same parent) and carries its summary
    pipeline = by_step["pipeline"]
    assert pipeline.info.status == "FINISHED" and pipeline.data.tags["onevision.pipeline_state"] == "SUCCEEDED"
    last_step_end = max(r.info.end_time for r in runs if r.info.run_id != parent)
    assert pipeline.info.end_time >= last_step_end
    summary = pipeline.data.metrics
    assert summary["wall_s/pipeline"] == pytest.approx((pipeline.info.end_time - pipeline.info.start_time) / 1000)
    for stage in STAGES:
        assert summary[f"records_kept/{stage}"] == storage.read_manifest(data[stage])["metadata"]["kept"]
        hf = storage.read_manifest(f"{PREFIX}/{stage}/hf")["metadata"]
        assert summary[f"heldout_loss/{stage}"] == pytest.approx(hf["eval_loss_after"], rel=1e-5)
        assert summary[f"wall_s/{stage}"] > 0
    assert summary["gate_passed/stage2_ov"] == 1.0 and summary["eval/stage2_ov/shapes_color/exact_match"] > 0
    assert "timeline.png" in {a.path for a in client.list_artifacts(parent)}


def test_the_console_is_short_and_the_logs_are_kept(flow, local_stack) -> None:
    shown = flow["resumed"].stdout.splitlines()
    assert len(shown) <= 80, "\n".join(shown)  # was thousands: executor JSON, a dict per training step
    started = [line[2:] for line in shown if line.startswith("> ")]
    assert {"preflight", "train-stage", "evaluate-2", "register-model", "finish-pipeline-run"} <= set(started)
    for task in started:  # every task that started says how it ended, on one line
        assert any(line.startswith(f"  {task} ") and " ok " in line for line in shown), task
    assert any(line.startswith("  evaluate-2 ") and line.endswith("gate passed") for line in shown)
    assert any(line.startswith("  train-stage-4 ") and "held-out loss" in line for line in shown)
    assert not any(line.lstrip().startswith(("{'loss'", "{\"", "executor_input")) for line in shown)
    assert "registered:" in flow["resumed"].stdout and "task logs:" in flow["resumed"].stdout
    folder = Path(local_stack.state_dir) / "runs" / RUN / "logs"
    assert (folder / "attempt-1").is_dir()  # the killed attempt's logs are kept beside the resumed one's
    resumed = sorted(folder.glob("attempt-2/*-train-stage-3.log"))
    assert resumed and "[progress] stage2_si step" in resumed[0].read_text()
    client = MlflowClient()
    experiment = client.get_experiment_by_name("onevision-tiny")
    parent = tracking.find_pipeline_run(client, experiment.experiment_id, RUN)
    attached = {a.path for a in client.list_artifacts(parent.info.run_id, "logs/attempt-2")}
    assert any(path.endswith("-train-stage-3.log") for path in attached), attached


def test_the_registered_version_carries_lineage_and_was_deployed(flow, gitops: Path) -> None:
    from components.register.core import CANDIDATE, TAG_CHECKPOINT_PREFIX, TAG_EXPORT, TAG_GATE

    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    client = MlflowClient()
    (version,) = [v for v in client.search_model_versions(f"name = '{recipe.registered_model_name}'")
                  if v.tags.get(tracking.TAG_PIPELINE_RUN) == RUN]
    assert tracking.weights_uri(version) == f"{PREFIX}/stage2_ov/hf"
    # its source is the pyfunc logged by the register step's run, under the pipeline's parent run
    assert client.get_run(version.run_id).data.tags[tracking.TAG_STEP] == "register"
    tags = version.tags
    assert tags[tracking.TAG_RECIPE_HASH] == recipe.hash() and tags[TAG_GATE] == "true"
    assert tags[tracking.TAG_GIT_COMMIT] not in ("", "unknown")
    assert set(json.loads(tags[tracking.TAG_DATA_MANIFEST])) == set(STAGES)
    assert {tags[f"{TAG_CHECKPOINT_PREFIX}{s}"] for s in STAGES} == {f"{PREFIX}/{s}/hf" for s in STAGES}
    assert tags[TAG_EXPORT] == f"{PREFIX}/export"
    aliases = client.get_model_version(version.name, version.version).aliases
    assert CANDIDATE in aliases and "dev" in aliases and "champion" not in aliases
    heads = subprocess.run(["git", "-C", str(gitops), "branch", "--list"], capture_output=True, text=True).stdout
    assert f"deploy/{version.name}/dev/v{version.version}" in heads
    assert f"registered: {version.name} v{version.version}" in flow["resumed"].stdout


def test_the_model_learned(flow) -> None:
    """Scores through lmms-eval (offline shapes tasks) after Stage-2 SI and OV; Stage-1 alone for contrast."""
    import tempfile

    from components.curate.core import synthetic_world
    from model.builder import load_pretrained
    from model.generation import score_by_task

    evaluated = {stage: storage.read_manifest(f"{PREFIX}/evaluate/{stage}")["metadata"] for stage in ("stage2_si", "stage2_ov")}
    results = json.loads(storage.read_bytes(f"{PREFIX}/evaluate/stage2_ov/results.json"))
    assert results["n-samples"]["shapes_color"]["effective"] == 64
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    world, _ = synthetic_world("synthetic://shapes/captions", Path(tempfile.mkdtemp()), recipe.training.seed)
    records = json.loads((world / "eval_color.json").read_text())
    model, processor = load_pretrained(f"{PREFIX}/stage1/hf")
    stage1 = score_by_task(model, processor, records, world)["color"]
    print("\nlmms-eval exact match (after stage2_si | after stage2_ov)")
    for key in evaluated["stage2_ov"]:
        if "/" in key:
            print(f"  {key:32s} {evaluated['stage2_si'][key]:.2f} | {evaluated['stage2_ov'][key]:.2f}")
    print(f"  colour after stage1 alone: {stage1['accuracy']:.2f} (chance {stage1['chance']:.2f})")
    assert evaluated["stage2_si"]["gate_passed"] and evaluated["stage2_ov"]["gate_passed"]
    assert evaluated["stage2_ov"]["shapes_color/exact_match"] >= 0.8
    assert stage1["accuracy"] <= stage1["chance"] + 0.15


def test_rerunning_a_finished_run_redoes_nothing(flow, local_stack, gitops: Path) -> None:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("onevision-tiny")
    query = f"tags.`{tracking.TAG_PIPELINE_RUN}` = '{RUN}'"
    runs_before = len(client.search_runs([experiment.experiment_id], query))
    data_created = {uri: storage.read_manifest(uri)["created"] for uri in curated().values()}
    again = run_cli(local_stack, gitops, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    output = task_logs(local_stack)
    for stage in STAGES:
        assert f"[train] {stage}: already published" in output
    # preflight opens one nested run per attempt; a training or evaluation redone would add its own
    assert len(client.search_runs([experiment.experiment_id], query)) == runs_before + 1
    assert {uri: storage.read_manifest(uri)["created"] for uri in data_created} == data_created  # not curated again


def copy_published(src: str, dst: str, tmp: Path, **metadata: object) -> None:
    """Republish a published prefix under another run (its manifest metadata, updated)."""
    local = storage.get_dir(src, tmp / dst.replace("/", "_"))
    storage.publish_dir(local, dst, metadata={**storage.read_manifest(src)["metadata"], **metadata})


def test_a_failed_gate_stops_the_dag_before_register_and_deploy(flow, local_stack, gitops: Path, tmp_path: Path) -> None:
    """A champion far better than this model: the OV gate fails on max_regression, the run fails naming
    it, and nothing is exported, registered or deployed. Checkpoints and the SI evaluation are e2e-1's,
    republished under the new run, so only the OV evaluation runs; the curated data is e2e-1's by itself
    (the same data recipes, so the same content-addressed prefixes, reused and not republished)."""
    from components.evaluate.core import EVAL_TAG_PREFIX

    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    run, prefix = "e2e-gate", "s3://onevision/runs/tiny/e2e-gate"
    data_created = {uri: storage.read_manifest(uri)["created"] for uri in curated().values()}
    for stage in STAGES:
        copy_published(f"{PREFIX}/{stage}/hf", f"{prefix}/{stage}/hf", tmp_path)
    copy_published(f"{PREFIX}/evaluate/stage2_si", f"{prefix}/evaluate/stage2_si", tmp_path,
                   model=f"{prefix}/stage2_si/hf")
    client, name = MlflowClient(), recipe.registered_model_name
    champion = client.create_model_version(name, source=f"{PREFIX}/stage2_ov/hf", tags={
        f"{EVAL_TAG_PREFIX}shapes_color.exact_match": "2.0", "onevision.gate_passed": "true"})
    client.set_registered_model_alias(name, "champion", champion.version)
    try:
        failed = run_cli(local_stack, gitops, run, timeout=1200)
    finally:
        client.delete_registered_model_alias(name, "champion")
        client.delete_model_version(name, champion.version)
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-3000:]
    assert "stop-on-failed-gate" in failed.stderr and "champion" in failed.stderr
    assert "evaluation gate failed after stage2_ov" in failed.stdout + failed.stderr  # the failed task's tail
    gate = json.loads(storage.read_bytes(f"{prefix}/evaluate/stage2_ov/gate.json"))
    assert gate["passed"] is False and any("champion" in r for r in gate["reasons"])
    assert not storage.exists(f"{prefix}/export/_MANIFEST.json")
    assert curated(prefix) == curated() and {u: storage.read_manifest(u)["created"] for u in data_created} == data_created
    assert not [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(tracking.TAG_PIPELINE_RUN) == run]
    parent = tracking.find_pipeline_run(client, client.get_experiment_by_name("onevision-tiny").experiment_id, run)
    assert parent.info.status == "FAILED" and parent.data.tags["onevision.pipeline_state"] == "FAILED"

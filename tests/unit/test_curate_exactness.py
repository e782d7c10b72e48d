"""Curation exactness (issue 19): the same recipe publishes the same bytes on every rerun and with any
worker count; a published stage is reused only for the same data recipe; no work folder outlives a run;
LLaVA's placeholder rules; `onevision curate` and its one-line errors."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

from components.curate.core import DataRecipe, StaleOutputError, curate_stage, run
from model.shards import ShardDataset
from onevision import storage
from onevision_cli.main import main as onevision
from onevision.recipe import dump_recipe, load_recipe, parse_recipe
from tests.unit.test_curate_core import _quarantine, _recipe, planted_corpus, q

ADDRESS = re.compile(r"0x[0-9a-f]{6,}|object at")


@pytest.fixture()
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary folder of our own for tempfile (and spawned workers, through TMPDIR)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _published(out: Path) -> tuple[dict, str, dict[str, bytes]]:
    """(manifest without its creation time, manifest hash, every published file's bytes)."""
    manifest = storage.read_manifest(str(out))
    manifest.pop("created")
    files = {rel: (out / rel).read_bytes() for rel in manifest["files"]}
    return manifest, storage.manifest_hash(str(out)), files


def test_reruns_and_worker_counts_publish_identical_bytes(tmp_path: Path, tiny_recipe, private_tmp: Path) -> None:
    recipe = _recipe(tiny_recipe, [{"json_path": str(planted_corpus(tmp_path / "src"))}],
                     max_rejected_fraction=1.0)  # mostly planted defects, on purpose
    for out, workers in (("a", 1), ("b", 1), ("c", 2)):  # each run in a work folder of its own
        curate_stage(recipe, "stage2_si", str(tmp_path / out), workers=workers)
    a, b, c = (_published(tmp_path / out) for out in "abc")
    assert a == b == c
    quarantine = a[2]["quarantine.jsonl"].decode()
    assert not ADDRESS.search(quarantine), ADDRESS.search(quarantine)
    reasons = {e["id"]: e["reason"] for e in _quarantine(tmp_path / "a")}
    assert reasons["zero-byte"] == "img/zero.png: empty file"
    assert reasons["elf"] == "img/elf.jpg: not an image: starts with bytes 7f454c46"
    assert reasons["image-in-answer"].startswith("turn 1 (assistant) contains 1 <image>")


def _recipe_file(tmp_path: Path, tiny_recipe, name: str, sampling: str = "all", lr: float | None = None) -> str:
    doc = tiny_recipe.model_dump(mode="json")
    doc["stages"]["stage1"]["data"] = [{"dataset_uri": "synthetic://shapes/captions?n=12",
                                        "sampling_strategy": sampling}]
    doc["stages"]["stage2_si"]["data"] = [{"dataset_uri": "synthetic://shapes/vqa?n=6"}]
    doc["curation"]["workers"] = 1
    if lr is not None:
        doc["stages"]["stage1"]["lr"] = lr
    path = tmp_path / f"{name}.yaml"
    path.write_text(dump_recipe(parse_recipe(doc)))
    return str(path)


def test_a_published_stage_is_reused_only_for_the_same_data_recipe(tmp_path: Path, tiny_recipe,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import components.curate.core as core

    base = _recipe_file(tmp_path, tiny_recipe, "base")
    out = str(tmp_path / "out")
    first = run(base, "stage1", out)
    card = json.loads((tmp_path / "out" / "curation.json").read_text())
    assert card["data_recipe_hash"] == first["data_recipe_hash"] == DataRecipe.of(load_recipe(base), "stage1").hash()

    def must_not_curate(*args, **kwargs):
        raise AssertionError("curated again")

    with monkeypatch.context() as patch:
        patch.setattr(core, "curate_stage", must_not_curate)
        # a resumed run, or one that changes what curation does not read: the published stage stands
        assert run(base, "stage1", out)["manifest_sha256"] == first["manifest_sha256"]
        assert run(_recipe_file(tmp_path, tiny_recipe, "lr", lr=1e-2), "stage1", out)["kept"] == first["kept"]
        # another data recipe, or another stage: refused, naming both, and nothing is touched
        with pytest.raises(StaleOutputError, match=r"already holds stage1 curated from data recipe \w{12}, not "
                                                   r"stage1 of recipe tiny \(data recipe \w{12}\).*--force"):
            run(_recipe_file(tmp_path, tiny_recipe, "fewer", sampling="first:5"), "stage1", out)
        with pytest.raises(StaleOutputError, match="not stage2_si"):
            run(base, "stage2_si", out)
    assert storage.manifest_hash(out) == first["manifest_sha256"]

    # --force withdraws the old publish and curates the new data recipe; no old file is left behind
    (tmp_path / "out" / "shard-000001.tar").write_bytes(b"an old publish's extra shard")
    manifest = storage.read_manifest(out)
    manifest["files"]["shard-000001.tar"] = {"size": 28, "sha256": storage.sha256_file(tmp_path / "out" / "shard-000001.tar")}
    storage.write_bytes(storage.join(out, storage.MANIFEST_NAME), json.dumps(manifest).encode())
    forced = run(_recipe_file(tmp_path, tiny_recipe, "fewer", sampling="first:5"), "stage1", out, force=True)
    assert forced["totals"]["records_in"] == 5 and forced["manifest_sha256"] != first["manifest_sha256"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [storage.MANIFEST_NAME, *storage.read_manifest(out)["files"]])
    assert len(ShardDataset(sorted((tmp_path / "out").glob("shard-*.tar")))) == forced["kept"]


def test_work_folders_are_removed_after_a_good_and_a_failing_run(tmp_path: Path, tiny_recipe,
                                                                  private_tmp: Path) -> None:
    good = _recipe(tiny_recipe, [{"json_path": str(planted_corpus(tmp_path / "src"))},
                                 {"dataset_uri": "synthetic://shapes/vqa?n=4"}],  # a generated world too
                   max_rejected_fraction=1.0)  # mostly planted defects, on purpose
    curate_stage(good, "stage2_si", str(tmp_path / "good"), workers=2)
    assert list(private_tmp.iterdir()) == []
    (tmp_path / "broken.json").write_text('[{"id": 1, "conversations": []}, {"id": ')
    bad = _recipe(tiny_recipe, [{"dataset_uri": "synthetic://shapes/vqa?n=4"}, {"json_path": str(tmp_path / "broken.json")}])
    with pytest.raises(Exception, match="not a valid JSON list"):
        curate_stage(bad, "stage2_si", str(tmp_path / "bad"), workers=1)
    assert list(private_tmp.iterdir()) == []
    assert not (tmp_path / "bad").exists() or not (tmp_path / "bad" / storage.MANIFEST_NAME).exists()

    kept = curate_stage(good, "stage2_si", str(tmp_path / "kept"), workers=1, keep_work=True)
    assert Path(kept["work_dir"]).parent == private_tmp and any(Path(kept["work_dir"]).rglob("quarantine.jsonl"))


def _record(first_turn: str, answer: str = "red", image: object = "img/good.png") -> dict:
    record = {"id": "r", "conversations": [{"from": "human", "value": first_turn}, {"from": "gpt", "value": answer}]}
    return {**record, "image": image} if image else record


@pytest.mark.parametrize("written,expected", [
    ("What colour is the square?\n<image>", "<image>\nWhat colour is the square?"),
    ("Look at <image> and name the colour.", "<image>\nLook at and name the colour."),
    ("<image>What colour is the square?", "<image>\nWhat colour is the square?"),
    ("<image>\nWhat colour is the square?", "<image>\nWhat colour is the square?"),  # already canonical
    ("<image>", "<image>"),  # a caption prompt of the placeholder alone (LLaVA strips the newline)
    ("  <image>  ", "<image>"),
])
def test_a_single_image_placeholder_moves_to_the_front_of_its_turn(tmp_path: Path, tiny_recipe, written: str,
                                                                    expected: str) -> None:
    planted_corpus(tmp_path / "src")
    source = tmp_path / "src" / "one.jsonl"
    source.write_text(json.dumps(_record(written)) + "\n")
    recipe = _recipe(tiny_recipe, [{"json_path": str(source)}], normalise_prompts=False, workers=1)
    summary = curate_stage(recipe, "stage2_si", str(tmp_path / "out"))
    kept = ShardDataset(sorted((tmp_path / "out").glob("shard-*.tar"))).record(0)
    assert kept["conversations"][0]["value"] == expected
    assert summary["sources"][0]["placeholders_moved"] == int(written != expected)


def test_multi_image_and_video_records_keep_their_order() -> None:
    from components.curate.normalise import front_image_placeholder

    multi = _record("Image 1: <image>\nImage 2: <image>\nWhich one is red?", "the first",
                    image=["a.png", "b.png"])
    video = {**_record("What moves? <video>", "a circle", image=None), "video": "v.mp4"}
    for record in (multi, video):
        assert front_image_placeholder(record) == (record, False)


def test_placeholders_in_an_answer_have_their_own_reason() -> None:
    from components.curate.checks import Limits, check_record

    limits = Limits(model_max_length=4096, video_frames=4)
    video = {"id": 1, "video": "v.mp4", "conversations": q("What moves?", "the <video> shows a circle", "<video>\n")}
    for record in (_record("<image>\nWhat?", "See <image>"), _record("What?", "<image>\nred", image=None), video):
        verdict = check_record(record, {}, limits)
        assert verdict.reason_code == "placeholder_in_answer", verdict


@pytest.mark.parametrize("question,answer,suffixed", [
    ("Read the text in the image.", "Welcome to the annual city park festival.", False),
    ("Read the text in the image.", "The sign says stop.", False),
    ("What does the sign say?", "STOP", True),
    ("What is written on the bus?", "city centre", True),
    ("What colour is the car?", "It is a red car.", False),
    ("What colour is the car?", "red", True),
    ("Which animal is shown?\nA. cat\nB. dog", "B", True),
    ("Which animal is shown?\nA. cat\nB. dog", "B. It is a dog because of its ears.", False),
])
def test_the_answer_format_suffix_only_where_the_answer_has_that_form(question: str, answer: str,
                                                                      suffixed: bool) -> None:
    from components.curate.normalise import classify, normalise_prompt

    record = _record(f"<image>\n{question}", answer)
    out, changed = normalise_prompt(record, classify(record)[1])
    assert changed == suffixed
    assert out["conversations"][0]["value"].startswith(f"<image>\n{question}")


def test_onevision_curate_command(tmp_path: Path, tiny_recipe, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe_file(tmp_path, tiny_recipe, "cli")
    out = str(tmp_path / "out")
    assert onevision(["curate", "--recipe", recipe, "--stage", "stage2_si", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert f"published  {out}" in printed and "stage2_si: 6 in, 6 kept" in printed

    assert onevision(["curate", "--recipe", recipe, "--stage", "stage1", "--out", out]) == 3  # refused by a check
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"curate: {out} already holds stage2_si") and "--force" in error
    assert onevision(["curate", "--recipe", recipe, "--stage", "stage1", "--out", out, "--force"]) == 0
    assert "stage1: 12 in" in capsys.readouterr().out

    doc = tiny_recipe.model_dump(mode="json")
    doc["stages"]["stage1"]["data"] = [{"json_path": "gs://bucket/llava.json"}]
    (tmp_path / "gs.yaml").write_text(json.dumps(doc))
    assert onevision(["curate", "--recipe", str(tmp_path / "gs.yaml"), "--stage", "stage1", "--out", out]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "gs:// is not a supported source scheme" in error
    assert all(scheme in error for scheme in ("local paths", "s3://", "hf://datasets/", "synthetic://shapes/"))

    doc["stages"]["stage1"]["data"] = [{"json_path": str(tmp_path / "absent.jsonl")}]
    (tmp_path / "absent.yaml").write_text(json.dumps(doc))
    assert onevision(["curate", "--recipe", str(tmp_path / "absent.yaml"), "--stage", "stage1",
                      "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err == f"curate: {tmp_path / 'absent.jsonl'}: no such file\n"
    doc["stages"]["stage1"]["data"] = [{"json_path": str(tmp_path)}]  # a folder given as the records file
    (tmp_path / "folder.yaml").write_text(json.dumps(doc))
    assert onevision(["curate", "--recipe", str(tmp_path / "folder.yaml"), "--stage", "stage1",
                      "--out", str(tmp_path / "o3")]) == 2
    assert capsys.readouterr().err == f"curate: {tmp_path}: a folder, not a file\n"
    assert onevision(["curate", "--recipe", recipe, "--stage", "stage1", "--out", "gs://bucket/out"]) == 2
    assert "publishes to a local path or s3://bucket/prefix, not gs://" in capsys.readouterr().err
    assert not Path("gs:").exists()

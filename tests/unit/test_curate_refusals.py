"""Bad sources are refused before GPUs run (issue 15, point 5): preflight names every input that does not
exist (stage and source); a JSON source that is not a list of records is an error; a source rejecting
more than `curation.max_rejected_fraction` fails curation naming its top reasons, with its quarantine
published and no stage; the command answers each error in one line, exit 2 (bad input) or 3 (refused).
S3 inputs in preflight: tests/integration/test_preflight.py.

    .venv/bin/python -m pytest tests/unit/test_curate_refusals.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.curate.core import CurationError, TooManyRejectedError, curate_stage, run_data
from components.curate.datarecipe import DataRecipe
from components.preflight.core import PreflightError, check_sources, run
from onevision import storage
from onevision_cli.main import main as onevision
from onevision.recipe import dump_recipe
from tests.unit.test_curate_core import _parquet, _png, _recipe, q

ROOT = Path(__file__).resolve().parents[2]


def _good_records(root: Path, n: int) -> list[dict]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        (root / "img" / f"{i}.png").write_bytes(_png((40 + i, 40), (20 * i, 200, 0)))
        records.append({"id": f"r{i}", "image": f"img/{i}.png", "conversations": q(f"Colour {i}?")})
    return records


def _no_stage(out: Path) -> bool:
    return not (out / storage.MANIFEST_NAME).exists() and not list(out.glob("shard-*.tar"))


def test_a_json_object_source_is_an_error_not_an_empty_stage(tmp_path: Path, tiny_recipe) -> None:
    (tmp_path / "data.json").write_text(json.dumps({"data": _good_records(tmp_path, 2)}))  # wrapped in an object
    data = DataRecipe.of(_recipe(tiny_recipe, [{"json_path": str(tmp_path / "data.json")}], workers=1), "stage2_si")
    with pytest.raises(CurationError, match=r"data.json: a JSON object, not a list of records; give a JSON list"):
        run_data(data, str(tmp_path / "out"), work_dir=str(tmp_path / "w"))
    assert _no_stage(tmp_path / "out")
    (tmp_path / "blank.json").write_text("  \n")
    with pytest.raises(CurationError, match="an empty file, not a list of records"):
        curate_stage(_recipe(tiny_recipe, [{"json_path": str(tmp_path / "blank.json")}], workers=1), "stage2_si",
                     str(tmp_path / "out2"), work_dir=str(tmp_path / "w"))
    (tmp_path / "list.json").write_text("\n  " + json.dumps(_good_records(tmp_path, 2)))  # leading space is fine
    summary = curate_stage(_recipe(tiny_recipe, [{"json_path": str(tmp_path / "list.json")}], workers=1),
                           "stage2_si", str(tmp_path / "out3"), work_dir=str(tmp_path / "w"))
    assert summary["totals"]["kept"] == 2


def test_too_many_rejections_fail_with_the_top_reasons_and_publish_only_the_quarantine(
        tmp_path: Path, tiny_recipe, capsys: pytest.CaptureFixture[str]) -> None:
    records = _good_records(tmp_path, 5)
    records += [{"id": f"gone{i}", "image": f"img/gone{i}.png", "conversations": q()} for i in range(3)]  # 3 missing
    records += [{"id": "empty1", "conversations": []}, {"id": "empty2", "conversations": []},  # 2 conversation
                {"id": "abs", "image": "/etc/passwd", "conversations": q()}]  # 1 media_path
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fine = {"dataset_uri": "synthetic://shapes/vqa?n=4"}
    recipe = _recipe(tiny_recipe, [fine, {"json_path": str(tmp_path / "data.jsonl")}], workers=1)
    assert recipe.curation.max_rejected_fraction == 0.2  # the default
    out = tmp_path / "out"
    with pytest.raises(TooManyRejectedError) as err:
        curate_stage(recipe, "stage2_si", str(out), work_dir=str(tmp_path / "w"))
    message = str(err.value)
    assert "\n" not in message
    assert (f"curation of stage2_si refused: {tmp_path / 'data.jsonl'} rejected 6 of 11 records (55%; top reasons: "
            "media_missing (3), conversation (2), media_path (1)); above curation.max_rejected_fraction 0.2") in message
    assert "synthetic://" not in message  # the good source is not named
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in quarantine if e["source"].endswith("data.jsonl")) == [
        "abs", "empty1", "empty2", "gone0", "gone1", "gone2"]
    assert f"its quarantine is at {out / 'quarantine.jsonl'}" in message
    assert sorted(p.name for p in out.iterdir()) == ["quarantine.jsonl"]  # no shard, card or manifest

    # the same refusal from the command: one line, exit 3; a threshold raised in the recipe lets it through
    (tmp_path / "r.yaml").write_text(dump_recipe(recipe))
    args = ["curate", "--recipe", str(tmp_path / "r.yaml"), "--stage", "stage2_si", "--out", str(out), "--workers", "1"]
    assert onevision(args) == 3
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("curate: curation of stage2_si refused: ")
    doc = recipe.model_dump(mode="json")
    doc["curation"]["max_rejected_fraction"] = 6 / 11  # at the threshold is not above it
    (tmp_path / "r.yaml").write_text(json.dumps(doc))
    assert onevision(args) == 0
    assert (out / storage.MANIFEST_NAME).exists() and "rejected" in capsys.readouterr().out


def test_a_missing_media_root_is_named_by_preflight_and_refused_by_curation(tmp_path: Path, tiny_recipe) -> None:
    (tmp_path / "data.json").write_text(json.dumps(_good_records(tmp_path / "elsewhere", 4)))
    source = {"json_path": str(tmp_path / "data.json"), "media_root": str(tmp_path / "no-such-media")}
    recipe = _recipe(tiny_recipe, [source], workers=1)
    assert check_sources(recipe) == [
        f"data: stage2_si source 1 ({tmp_path / 'data.json'}): media_root {tmp_path / 'no-such-media'} does not "
        "exist (a media folder, or an S3 prefix with objects under it)"]
    with pytest.raises(TooManyRejectedError, match=r"rejected 4 of 4 records \(100%; top reasons: media_missing \(4\)\)"):
        curate_stage(recipe, "stage2_si", str(tmp_path / "out"), work_dir=str(tmp_path / "w"))
    assert _no_stage(tmp_path / "out")


def test_preflight_names_every_missing_input_in_one_error(tmp_path: Path, tiny_recipe,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI", "ONEVISION_DATASET_MIRROR"):
        monkeypatch.delenv(name, raising=False)  # those checks fail fast, listed beside the data lines
    (tmp_path / "here.jsonl").write_text("")
    (tmp_path / "media").mkdir()
    (tmp_path / "pq").mkdir()  # a folder with no parquet in it
    doc = tiny_recipe.model_dump(mode="json")
    doc["stages"]["stage1"]["data"] = [{"json_path": str(tmp_path / "absent.json")},
                                       {"dataset_uri": "synthetic://shapes/captions"}]  # generated: nothing to find
    doc["stages"]["stage2_si"]["data"] = [
        {"json_path": str(tmp_path / "here.jsonl"), "media_root": str(tmp_path / "media")},  # both exist
        {"json_path": str(tmp_path / "media")},  # a folder given as the records file
        {"dataset_uri": str(tmp_path / "pq")}, {"dataset_uri": str(tmp_path / "nothing.parquet")},
        {"json_path": str(tmp_path / "here.jsonl"), "media_root": str(tmp_path / "images.tar")},
        {"dataset_uri": "hf://datasets/lmms-lab/LLaVA-OneVision-Data/chart"}]  # no mirror: not checkable offline
    (tmp_path / "tiny.yaml").write_text(json.dumps(doc))
    with pytest.raises(PreflightError) as err:
        run(str(tmp_path / "tiny.yaml"), str(tmp_path / "runs"), "pf-sources")
    data = [line.strip() for line in str(err.value).splitlines() if line.strip().startswith("data: ")]
    assert data == [
        f"data: stage1 source 1 ({tmp_path / 'absent.json'}): json_path {tmp_path / 'absent.json'} does not exist",
        f"data: stage2_si source 2 ({tmp_path / 'media'}): json_path {tmp_path / 'media'} is a folder, not a file",
        f"data: stage2_si source 3 ({tmp_path / 'pq'}): dataset_uri {tmp_path / 'pq'} holds no .parquet files",
        f"data: stage2_si source 4 ({tmp_path / 'nothing.parquet'}): dataset_uri {tmp_path / 'nothing.parquet'} "
        "does not exist",
        f"data: stage2_si source 5 ({tmp_path / 'here.jsonl'}): media_root {tmp_path / 'images.tar'} does not exist"]
    assert not (tmp_path / "runs").exists()  # nothing was pinned

    # a hub source is checked in its mirror when there is one
    monkeypatch.setenv("ONEVISION_DATASET_MIRROR", str(tmp_path / "mirror"))
    hub = _recipe(tiny_recipe, [{"dataset_uri": "hf://datasets/lmms-lab/LLaVA-OneVision-Data/chart"}])
    assert check_sources(hub) == [
        "data: stage2_si source 1 (hf://datasets/lmms-lab/LLaVA-OneVision-Data/chart): dataset_uri "
        f"hf://datasets/lmms-lab/LLaVA-OneVision-Data/chart does not exist in the mirror "
        f"({tmp_path / 'mirror/lmms-lab/LLaVA-OneVision-Data/chart'})"]
    _parquet(tmp_path / "mirror/lmms-lab/LLaVA-OneVision-Data/chart/part-0.parquet",
             [{"id": "a", "image": None, "conversations": q("Hi?", "Hello.", ""), "data_source": "x"}])
    assert check_sources(hub) == []


@pytest.mark.parametrize("entry", ["module", "onevision"])
def test_a_truncated_parquet_is_one_line_and_exit_2(tmp_path: Path, tiny_recipe, entry: str) -> None:
    _parquet(tmp_path / "full.parquet", [{"id": f"p{i}", "image": {"bytes": _png((40, 40), (i, 0, 0)), "path": "x.png"},
                                          "conversations": q(f"What is {i}?"), "data_source": "s"} for i in range(4)])
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "full.parquet").read_bytes()[:-40])
    (tmp_path / "r.yaml").write_text(dump_recipe(_recipe(tiny_recipe, [{"dataset_uri": str(tmp_path / "cut.parquet")}])))
    args = ["--recipe", str(tmp_path / "r.yaml"), "--stage", "stage2_si", "--out", str(tmp_path / "out"), "--workers", "1"]
    command = ([sys.executable, "-m", "components.curate.core", *args] if entry == "module"
               else [str(Path(sys.executable).parent / "onevision"), "curate", *args])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"curate: {tmp_path / 'cut.parquet'}: not a readable parquet file (")
    assert not (tmp_path / "out").exists()

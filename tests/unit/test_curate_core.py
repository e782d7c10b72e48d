"""Curation core: sampling, planted defects land in quarantine with their reason, counts reconcile,
determinism (same recipe -> same bytes, any worker count), streaming sources (JSONL, JSON list, parquet,
image tar, hf:// mirror), flat memory, and shards that the training dataset reads back."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.curate.core import CurationError, apply_sampling, curate_stage
from model.shards import ShardDataset
from onevision import storage
from onevision.recipe import parse_recipe


@pytest.mark.parametrize("strategy,expected", [
    ("all", list(range(10))), ("first:3", [0, 1, 2]), ("end:2", [8, 9]),
    ("first:30%", [0, 1, 2]), ("end:50%", [5, 6, 7, 8, 9]), ("first:20", list(range(10))),
])
def test_sampling_strategies(strategy: str, expected: list[int]) -> None:
    assert apply_sampling(list(range(10)), strategy, seed=0) == expected


def test_random_sampling_is_seeded() -> None:
    a = apply_sampling(list(range(100)), "random:10%", seed=1)
    assert len(a) == 10 and a == apply_sampling(list(range(100)), "random:10%", seed=1)
    assert a != apply_sampling(list(range(100)), "random:10%", seed=2)


def _png(size: tuple[int, int], colour: tuple[int, int, int], fmt: str = "PNG", **kw) -> bytes:
    """A photo-like image (smooth random field seeded by `colour`): flat synthetic images have unstable
    perceptual hashes, photos do not."""
    import numpy as np

    rng = np.random.default_rng(list(colour))
    image = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid PNG header claiming 30000x30000 pixels (the IHDR CRC fixed), with a tiny body."""
    data = bytearray(_png((16, 16), (1, 2, 3)))
    ihdr = data[12:29]  # b"IHDR" + width, height, ...
    ihdr[4:12] = struct.pack(">II", 30000, 30000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def q(text: str = "What colour is the square?", answer: str = "red", placeholder: str = "<image>\n") -> list[dict]:
    return [{"from": "human", "value": f"{placeholder}{text}"}, {"from": "gpt", "value": answer}]


EXPECTED = {  # record id -> reason code in quarantine (None: kept)
    "good": None, "good-text": None, "good-other-question": None, "mc": None,
    "truncated-jpeg": "image_undecodable", "zero-byte": "image_undecodable", "one-pixel": "image_too_small",
    "bomb": "image_bomb", "wrong-count": "placeholders", "empty": "conversation", "one-sided": "conversation",
    "missing": "media_missing", "escape": "media_path", "surrogate": "text_encoding",
    "duplicate": "duplicate", "near-duplicate": "near_duplicate", "too-long": "too_long",
    "sliver": "aspect_ratio", "video-in-image-stage": "video_not_allowed", "elf": "image_undecodable",
    "image-in-answer": "placeholder_in_answer",
}


def planted_corpus(root: Path) -> Path:
    """A JSONL source with one record per defect (and the good ones), media beside it."""
    (root / "img").mkdir(parents=True)
    good = _png((64, 48), (200, 20, 20))
    files = {
        "good.png": good, "good-copy.png": good,
        "near.jpg": _png((58, 44), (200, 20, 20), "JPEG", quality=85),  # resized + re-encoded: near dup
        "truncated.jpg": _png((64, 48), (0, 0, 200), "JPEG")[:200], "zero.png": b"",
        "pixel.png": _png((1, 1), (0, 0, 0)), "bomb.png": _bomb_png(), "sliver.png": _png((400, 12), (9, 9, 9)),
        "elf.jpg": b"\x7fELF\x02\x01\x01" + bytes(200),
    }
    for name, data in files.items():
        (root / "img" / name).write_bytes(data)
    records = [
        {"id": "good", "image": "img/good.png", "conversations": q()},
        {"id": "good-text", "conversations": q("Say hello.", "Hello there, how can I help?", "")},
        {"id": "good-other-question", "image": "img/good.png", "conversations": q("Where is the square?", "center")},
        {"id": "mc", "image": "img/good.png", "conversations": q("What colour?\nA. red\nB. blue", "A")},
        {"id": "truncated-jpeg", "image": "img/truncated.jpg", "conversations": q()},
        {"id": "zero-byte", "image": "img/zero.png", "conversations": q()},
        {"id": "one-pixel", "image": "img/pixel.png", "conversations": q()},
        {"id": "bomb", "image": "img/bomb.png", "conversations": q()},
        {"id": "sliver", "image": "img/sliver.png", "conversations": q()},
        {"id": "wrong-count", "image": "img/good.png", "conversations": q(placeholder="")},
        {"id": "empty", "image": "img/good.png", "conversations": []},
        {"id": "one-sided", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "missing", "image": "img/nope.png", "conversations": q()},
        {"id": "escape", "image": "../img/good.png", "conversations": q()},
        {"id": "duplicate", "image": "img/good-copy.png", "conversations": q()},
        {"id": "near-duplicate", "image": "img/near.jpg", "conversations": q()},
        {"id": "too-long", "image": "img/good.png", "conversations": q(answer="word " * 3000)},
        {"id": "video-in-image-stage", "video": "v.mp4", "conversations": q(placeholder="<video>\n")},
        {"id": "elf", "image": "img/elf.jpg", "conversations": q()},
        {"id": "image-in-answer", "image": "img/good.png", "conversations": q(answer="<image>\nred", placeholder="")},
    ]
    lines = [json.dumps(r).encode() for r in records]
    lines.insert(3, json.dumps({"id": "surrogate", "conversations": q(answer="x")}).encode().replace(b'"x"', b'"\\ud800"'))
    lines.insert(5, b'{"id": "bad-utf8", "conversations": "\xff\xfe"}')
    lines.insert(6, b'{"id": "not json", ')
    (root / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root / "data.jsonl"


def _recipe(tiny_recipe, sources: list[dict], stage: str = "stage2_si", **curation):
    doc = tiny_recipe.model_dump(mode="json")
    doc["stages"][stage]["data"] = sources
    doc["curation"].update(curation)
    return parse_recipe(doc)


def _quarantine(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


def test_each_planted_defect_lands_in_quarantine_with_its_reason(tmp_path: Path, tiny_recipe) -> None:
    data = planted_corpus(tmp_path / "src")
    # a second source (a JSON list) repeating a kept record of the first: duplicates across sources too
    (tmp_path / "src" / "second.json").write_text(json.dumps([{"id": "cross-source", "image": "img/good-copy.png",
                                                               "conversations": q()}]))
    recipe = _recipe(tiny_recipe, [{"json_path": str(data)}, {"json_path": str(tmp_path / "src" / "second.json")}],
                     workers=1, max_rejected_fraction=1.0)  # mostly planted defects: over the default, on purpose
    summary = curate_stage(recipe, "stage2_si", str(tmp_path / "out"), work_dir=str(tmp_path / "work"))

    quarantine = _quarantine(tmp_path / "out")
    reasons = {e["id"]: e["reason_code"] for e in quarantine if e["id"] is not None}
    assert reasons == {**{k: v for k, v in EXPECTED.items() if v is not None}, "cross-source": "duplicate"}
    assert summary["sources"][1] | {"source": None} == {
        "source": None, "strategy": "all", "available": None, "records_in": 1, "kept": 0, "duplicates": 1,
        "rejected": 0, "prompts_normalised": 0, "placeholders_moved": 0, "reasons": {"duplicate": 1}}
    unreadable = [e for e in quarantine if e["reason_code"] == "unreadable"]
    assert sorted(e["reason"].split(" ")[0] for e in unreadable) == ["invalid", "not"]  # bad UTF-8, bad JSON
    assert all(e["raw"] for e in unreadable)  # the unparseable line itself is kept
    assert all(e["reason"] for e in quarantine)
    assert "near-duplicate of" in next(e["reason"] for e in quarantine if e["id"] == "near-duplicate")

    source = summary["sources"][0]
    assert source["records_in"] == len(EXPECTED) + 2 == source["kept"] + source["duplicates"] + source["rejected"]
    assert (source["kept"], source["duplicates"]) == (4, 2)
    assert storage.read_manifest(str(tmp_path / "out"))["metadata"]["kept"] == summary["totals"]["kept"] == 4
    shards = ShardDataset(sorted((tmp_path / "out").glob("*.tar")))
    kept = {shards.record(i)["id"]: shards.record(i) for i in range(len(shards))}
    assert set(kept) == {k for k, v in EXPECTED.items() if v is None}
    assert kept["good"]["conversations"][0]["value"].endswith("Answer the question using a single word or phrase.")
    assert kept["mc"]["meta"]["task_type"] == "mcq" and kept["good-text"]["meta"]["modality"] == "text"
    card = json.loads((tmp_path / "out" / "data_card.json").read_text())
    assert card["rejection_reasons"]["image_undecodable"] == 3 and card["modality"]["single_image"] == 3
    assert "| media_missing | 1 |" in (tmp_path / "out" / "data_card.md").read_text()


def _shapes_recipe(tiny_recipe, seed: int = 7, **curation):
    doc = tiny_recipe.model_dump(mode="json")
    doc["training"]["seed"] = seed
    doc["stages"]["stage2_ov"]["data"] = [
        {"dataset_uri": "synthetic://shapes/vqa?n=40", "sampling_strategy": "random:50%"},
        {"dataset_uri": "synthetic://shapes/multi_image?n=40", "sampling_strategy": "first:10"},
        {"dataset_uri": "synthetic://shapes/video?n=40", "sampling_strategy": "end:5"}]
    doc["curation"].update(curation)
    return parse_recipe(doc)


def _tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != storage.MANIFEST_NAME}


def test_same_recipe_gives_identical_bytes_with_any_worker_count(tmp_path: Path, tiny_recipe) -> None:
    recipe = _shapes_recipe(tiny_recipe, shard_max_records=12)
    work = str(tmp_path / "work")
    curate_stage(recipe, "stage2_ov", str(tmp_path / "a"), work_dir=work, workers=1)
    curate_stage(recipe, "stage2_ov", str(tmp_path / "b"), work_dir=work, workers=2)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a == b and len([n for n in a if n.endswith(".tar")]) >= 3  # shard size is configurable
    assert storage.read_manifest(str(tmp_path / "a"))["files"] == storage.read_manifest(str(tmp_path / "b"))["files"]
    card = json.loads(a["curation.json"])
    assert [s["records_in"] for s in card["sources"]] == [20, 10, 5]
    assert sum(s["records"] for s in card["shards"]) == card["totals"]["kept"]
    assert all(s["sha256"] == storage.sha256_file(tmp_path / "a" / s["name"]) for s in card["shards"])

    other = curate_stage(_shapes_recipe(tiny_recipe, seed=8), "stage2_ov", str(tmp_path / "c"),
                         work_dir=work, workers=1)
    ids = lambda out: {ShardDataset([p]).record(i)["id"] for p in sorted(Path(out).glob("*.tar"))  # noqa: E731
                       for i in range(len(ShardDataset([p])))}
    vqa = lambda out: {i.split("-")[-1] for i in ids(out) if "-vqa-" in i}  # noqa: E731
    assert other["totals"]["records_in"] == 35 and vqa(tmp_path / "a") != vqa(tmp_path / "c")


def test_shards_feed_the_training_dataset(tmp_path: Path, tiny_recipe) -> None:
    from model.builder import build_tiny
    from model.processing import SampleProcessor

    curate_stage(_shapes_recipe(tiny_recipe), "stage2_ov", str(tmp_path / "out"), work_dir=str(tmp_path / "w"),
                 workers=1)
    _, processor = build_tiny(tiny_recipe)
    dataset = ShardDataset(sorted((tmp_path / "out").glob("*.tar")),
                           SampleProcessor(processor, "qwen_1_5", 768, video_frames=8))
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 35 and all((item.labels != -100).any() for item in items)
    assert sum(len(item.pixel_values_videos) for item in items) == 5
    lengths, visual = dataset.lengths()
    assert all(visual) and all(n >= len(item) for n, item in zip(lengths, items))  # the estimate is an upper bound


def _parquet(path: Path, rows: list[dict]) -> None:
    schema = pa.schema([("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
                        ("data_source", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=3)


def test_parquet_with_embedded_images_through_a_hub_mirror(tmp_path: Path, tiny_recipe, monkeypatch) -> None:
    rows = [{"id": f"r{i}", "image": {"bytes": _png((40 + i, 40), (10 * i, 0, 0)), "path": f"{i}.png"},
             "conversations": q(f"Colour {i}?"), "data_source": "chart"} for i in range(7)]
    rows[2]["image"]["bytes"] = b"\x89PNG broken"
    rows[5]["image"] = None  # no image, yet an <image> placeholder
    _parquet(tmp_path / "mirror" / "lmms-lab/LLaVA-OneVision-Data/chart/train-00000-of-00001.parquet", rows)
    recipe = _recipe(tiny_recipe, [{"dataset_uri": "hf://datasets/lmms-lab/LLaVA-OneVision-Data/chart"}], workers=1,
                     max_rejected_fraction=0.3)  # 2 of 7 planted defects
    with pytest.raises(CurationError, match="ONEVISION_DATASET_MIRROR"):
        curate_stage(recipe, "stage2_si", str(tmp_path / "o0"), work_dir=str(tmp_path / "w"))
    monkeypatch.setenv("ONEVISION_DATASET_MIRROR", str(tmp_path / "mirror"))
    summary = curate_stage(recipe, "stage2_si", str(tmp_path / "out"), work_dir=str(tmp_path / "w"))
    assert summary["totals"] == {"records_in": 7, "kept": 5, "duplicates": 0, "rejected": 2}
    assert {e["id"]: e["reason_code"] for e in _quarantine(tmp_path / "out")} == {"r2": "image_undecodable",
                                                                                 "r5": "placeholders"}
    shards = ShardDataset(sorted((tmp_path / "out").glob("*.tar")))
    record, media = shards.raw(0)
    assert record["meta"]["data_source"] == "chart" and Image.open(io.BytesIO(media["img0.png"])).size == (40, 40)


def test_json_list_with_an_image_tar(tmp_path: Path, tiny_recipe) -> None:
    import tarfile

    (tmp_path / "m").mkdir()
    for i in range(3):
        (tmp_path / "m" / f"{i}.png").write_bytes(_png((50, 50 + 5 * i), (0, 90 * i, 0)))
    with tarfile.open(tmp_path / "images.tar", "w") as tar:
        tar.add(tmp_path / "m", arcname="imgs")
    records = [{"id": i, "image": f"imgs/{i}.png", "conversations": q(f"Q{i}?")} for i in range(4)]  # 3.png: absent
    (tmp_path / "data.json").write_text(json.dumps(records))
    recipe = _recipe(tiny_recipe, [{"json_path": str(tmp_path / "data.json"), "media_root": str(tmp_path / "images.tar")}],
                     workers=1, max_rejected_fraction=0.25)  # 1 of 4 missing, on purpose
    summary = curate_stage(recipe, "stage2_si", str(tmp_path / "out"), work_dir=str(tmp_path / "w"))
    assert (summary["totals"]["kept"], summary["sources"][0]["reasons"]) == (3, {"media_missing": 1})

    (tmp_path / "broken.json").write_text('[{"id": 1, "conversations": []}, {"id": ')
    with pytest.raises(CurationError, match="not a valid JSON list"):
        curate_stage(_recipe(tiny_recipe, [{"json_path": str(tmp_path / "broken.json")}]), "stage2_si",
                     str(tmp_path / "o2"), work_dir=str(tmp_path / "w"), workers=1)
    assert not (tmp_path / "o2" / storage.MANIFEST_NAME).exists()  # nothing half-published


def _peak_python_memory(tmp_path: Path, tiny_recipe, n: int) -> int:
    root = tmp_path / f"n{n}"
    (root / "img").mkdir(parents=True)
    with open(root / "data.jsonl", "w") as out:
        for i in range(n):
            (root / "img" / f"{i}.png").write_bytes(_png((96, 96), (i % 250, (7 * i) % 250, 100)))
            out.write(json.dumps({"id": i, "image": f"img/{i}.png", "conversations": q(f"What is {i}?" + " pad" * 40)}) + "\n")
    recipe = _recipe(tiny_recipe, [{"json_path": str(root / "data.jsonl")}], workers=1, dedup=False,
                     near_dup_distance=None, shard_max_records=50)
    tracemalloc.start()
    curate_stage(recipe, "stage2_si", str(root / "out"), work_dir=str(root / "w"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_stays_flat_as_the_source_grows(tmp_path: Path, tiny_recipe) -> None:
    small, large = _peak_python_memory(tmp_path, tiny_recipe, 100), _peak_python_memory(tmp_path, tiny_recipe, 800)
    assert large < 1.5 * small, (small, large)  # 8x the records, not 8x the memory


def test_a_recaptioned_source_is_resumable_in_the_flow(tmp_path: Path, tiny_recipe, monkeypatch) -> None:
    from model.builder import build_tiny

    model, processor = build_tiny(tiny_recipe)
    model.save_pretrained(tmp_path / "captioner")
    processor.save_pretrained(tmp_path / "captioner")
    doc = tiny_recipe.model_dump(mode="json")
    doc["stages"]["stage1_5"]["data"] = [{"dataset_uri": "synthetic://shapes/descriptions?n=12", "recaption": {
        "model": str(tmp_path / "captioner"), "batch_size": 4, "max_new_tokens": 6}}]
    recipe = parse_recipe(doc)
    summary = curate_stage(recipe, "stage1_5", str(tmp_path / "out"), work_dir=str(tmp_path / "w"), workers=1)
    shards = ShardDataset(sorted((tmp_path / "out").glob("*.tar")))
    records = [shards.record(i) for i in range(len(shards))]
    assert len(records) == summary["totals"]["kept"] > 0
    assert all(r["meta"].get("recaptioned_by") == str(tmp_path / "captioner") or r["meta"].get("recaption_error")
               for r in records)
    parts = sorted((tmp_path / "out-recaption" / "source-0").glob("part-*.jsonl"))
    assert len(parts) == -(-len(records) // 4)  # one progress part per batch of 4
    first = _tree(tmp_path / "out")

    def no_generation(*args, **kwargs):
        raise AssertionError("a rerun must reuse the stored captions")

    import components.curate.recaption as recaption_module

    monkeypatch.setattr(recaption_module, "generate", no_generation)
    curate_stage(recipe, "stage1_5", str(tmp_path / "out"), work_dir=str(tmp_path / "w"), workers=1)
    assert _tree(tmp_path / "out") == first  # resumed from the progress parts, same bytes


def test_videos_are_decoded_and_a_broken_one_is_quarantined(tmp_path: Path, tiny_recipe) -> None:
    from components.curate.sources import synthetic_world

    world, _ = synthetic_world("synthetic://shapes/video?n=4", tmp_path / "w", 7)
    video = json.loads((world / "video.json").read_text())[0]
    (world / "videos" / "broken.mp4").write_bytes((world / video["video"]).read_bytes()[:300])
    records = [video, {**video, "id": "broken-video", "video": "videos/broken.mp4"}]
    (world / "mixed.json").write_text(json.dumps(records))
    recipe = _recipe(tiny_recipe, [{"json_path": str(world / "mixed.json")}], stage="stage2_ov", workers=1,
                     max_rejected_fraction=0.5)  # 1 of 2 broken, on purpose
    summary = curate_stage(recipe, "stage2_ov", str(tmp_path / "out"), work_dir=str(tmp_path / "work"))
    assert (summary["totals"]["kept"], summary["sources"][0]["reasons"]) == (1, {"video_unreadable": 1})
    assert _quarantine(tmp_path / "out")[0]["id"] == "broken-video"

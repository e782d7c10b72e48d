"""The synthetic shapes world: deterministic, valid LLaVA format, answers true to the pixels."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from model import shapes_world as sw

N, N_EVAL = 36, 24
PALETTE = np.array([sw.RGB[c] for c in sw.COLORS], dtype=float)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict]]]:
    out = tmp_path_factory.mktemp("world")
    paths = sw.generate_world(out, seed=0, n_per_kind=N, n_eval=N_EVAL)
    assert set(paths) == set(sw.KINDS + sw.EVAL_KINDS)
    return out, {k: json.loads(p.read_text()) for k, p in paths.items()}


def media(rec: dict) -> list[str]:
    if "video" in rec:
        return [rec["video"]]
    return rec["image"] if isinstance(rec["image"], list) else [rec["image"]]


def file_hashes(out: Path) -> dict[str, str]:
    """sha256 per file; for videos, of the decoded frames (x264's bitstream varies run to run, its pixels not)."""
    def digest(p: Path) -> str:
        if p.suffix == ".mp4":
            return hashlib.sha256(b"".join(f.tobytes() for f in decode_video(p))).hexdigest()
        return hashlib.sha256(p.read_bytes()).hexdigest()
    return {str(p.relative_to(out)): digest(p) for p in sorted(out.rglob("*")) if p.is_file()}


def nearest_color(rgb) -> str:
    return sw.COLORS[int(np.argmin(((PALETTE - np.asarray(rgb, float)) ** 2).sum(1)))]


def dominant_color(arr: np.ndarray) -> str:
    """Nearest palette colour of the saturated pixels (the background is light grey, text dark)."""
    a = arr.reshape(-1, 3).astype(int)
    saturated = a[(a.max(1) - a.min(1)) > 60]
    assert len(saturated) > 20, "no coloured shape pixels"
    names = Counter(nearest_color(p) for p in saturated[:: max(1, len(saturated) // 400)])
    return names.most_common(1)[0][0]


def decode_video(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_same_seed_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    sw.generate_world(a, seed=3, n_per_kind=8, n_eval=6)
    sw.generate_world(b, seed=3, n_per_kind=8, n_eval=6)
    sw.generate_world(c, seed=4, n_per_kind=8, n_eval=6)
    ha, hb, hc = file_hashes(a), file_hashes(b), file_hashes(c)
    assert len(ha) > 100 and ha == hb
    assert (a / "vqa.json").read_bytes() != (c / "vqa.json").read_bytes()
    media_a = {h for k, h in ha.items() if not k.endswith(".json")}
    media_c = {h for k, h in hc.items() if not k.endswith(".json")}
    assert not media_a & media_c
    world = json.loads((a / "world.json").read_text())
    assert world["seed"] == 3 and world["counts"]["vqa"] == 8 and world["counts"]["eval_mc"] == 6


def test_every_sample_is_valid_llava_format(world) -> None:
    out, data = world
    ids = [r["id"] for recs in data.values() for r in recs]
    assert len(ids) == len(set(ids))
    for kind, recs in data.items():
        assert len(recs) == (N_EVAL if kind.startswith("eval_") else N)
        for rec in recs:
            conv = rec["conversations"]
            assert len(conv) >= 2 and len(conv) % 2 == 0
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            human = " ".join(t["value"] for t in conv if t["from"] == "human")
            assert all("<image>" not in t["value"] and "<video>" not in t["value"]
                       for t in conv if t["from"] == "gpt")
            assert conv[0]["value"].startswith(("<image>", "<video>", "Image 1: <image>"))
            assert ("image" in rec) != ("video" in rec)
            meta = rec["meta"]
            assert {"task", "answer", "chance"} <= set(meta) and 0.0 <= meta["chance"] < 1.0
            assert conv[-1]["value"] == meta["answer"]
            files = media(rec)
            if "video" in rec:
                assert human.count("<video>") == 1 and "<image>" not in human
                frames = decode_video(out / rec["video"])
                w, h = meta["scene"]["size"]
                assert len(frames) == meta["scene"]["num_frames"] and frames[0].shape == (h, w, 3)
                continue
            assert human.count("<image>") == len(files) and "<video>" not in human
            scenes = meta["scenes"] if "scenes" in meta else [meta["scene"]]
            assert len(scenes) == len(files)
            if kind in ("multi_image", "eval_multi_image"):
                assert 2 <= len(files) <= 3 and isinstance(rec["image"], list)
            for name, scene in zip(files, scenes):
                assert not Path(name).is_absolute() and name.startswith("images/")
                with Image.open(out / name) as im:
                    assert im.format == "PNG" and im.mode == "RGB"
                    assert list(im.size) == scene["size"]
                    assert 56 <= min(im.size) and max(im.size) <= 224


def test_image_sizes_exercise_anyres(world) -> None:
    _, data = world
    sizes = [tuple(r["meta"]["scene"]["size"]) for recs in data.values() for r in recs
             if "scene" in r["meta"] and "num_frames" not in r["meta"]["scene"]]
    aspects = [w / h for w, h in sizes]
    assert max(aspects) >= 3 and min(aspects) <= 1 / 3  # extreme grids (e.g. 224x56, 56x224)
    assert len(set(sizes)) > len(sizes) // 2


def test_multiple_choice_and_short_answer_formats(world) -> None:
    _, data = world
    seen_tasks = Counter()
    for recs in data.values():
        for rec in recs:
            meta, human = rec["meta"], rec["conversations"][0]["value"]
            task = meta["task"]
            seen_tasks[task] += 1
            if task.startswith("mc_"):
                lines = human.split("\n")
                assert lines[-1] == sw.MC_SUFFIX
                options = [ln for ln in lines if re.fullmatch(r"[A-F]\. .+", ln)]
                letters = [ln[0] for ln in options]
                assert letters == list(sw.LETTERS[: len(options)]) and len(options) == 4
                values = [ln[3:] for ln in options]
                assert values == meta["choices"] and len(set(values)) == len(values)
                assert meta["answer"] in letters
                assert rec["conversations"][1]["value"] == meta["answer"]
                truth = meta["scene"]["color" if task == "mc_color" else "shape"]
                assert values[letters.index(meta["answer"])] == meta["answer_text"] == truth
                assert meta["chance"] == pytest.approx(1 / len(options))
            elif task in ("color", "shape", "count", "position", "ocr", "mi_same_color",
                          "mi_color_of", "video_color", "video_direction"):
                assert human.endswith("\n" + sw.SHORT_SUFFIX)
                assert len(meta["answer"].split()) == 1
            elif task == "mi_which_color":
                assert human.endswith("\n" + sw.IMAGE_NUMBER_SUFFIX)
                assert meta["answer"] in {"1", "2", "3"}
            else:
                assert task in ("caption", "description")
    for task in ("color", "shape", "count", "position", "mc_color", "mc_shape", "ocr", "caption",
                 "description", "mi_which_color", "mi_same_color", "mi_color_of", "video_color",
                 "video_direction"):
        assert seen_tasks[task] > 0, task
    assert {r["meta"]["task"] for r in data["vqa_color"]} == {"color"}


def test_eval_shares_no_media_with_training_and_is_balanced(world) -> None:
    out, data = world
    train = {hashlib.sha256((out / f).read_bytes()).hexdigest()
             for k in sw.KINDS for r in data[k] for f in media(r)}
    evals = {hashlib.sha256((out / f).read_bytes()).hexdigest()
             for k in sw.EVAL_KINDS for r in data[k] for f in media(r)}
    assert len(train) > 200 and len(evals) > 150 and not train & evals
    expected = {"eval_color": sw.COLORS, "eval_shape": sw.SHAPES, "eval_position": sw.POSITIONS,
                "eval_count": tuple(str(c) for c in sw.COUNTS)}
    for kind, values in expected.items():
        answers = Counter(r["meta"]["answer"] for r in data[kind])
        assert set(answers) == set(values), kind
        assert max(answers.values()) - min(answers.values()) <= 1, kind
    letters = Counter(r["meta"]["answer"] for r in data["eval_mc"])
    assert set(letters) == set("ABCD")
    assert {r["meta"]["task"] for r in data["eval_mc"]} == {"mc_color", "mc_shape"}
    assert {r["meta"]["answer"] for r in data["eval_ocr"]} <= set(sw.WORDS)


def test_exclusion_redraws_colliding_media(tmp_path: Path) -> None:
    _, taken = sw._write_kind(sw._prepare(tmp_path / "a"), "eval_color", 3, 0)
    _, again = sw._write_kind(sw._prepare(tmp_path / "b"), "eval_color", 3, 0, exclude=taken)
    assert len(taken) == 3 and len(again) == 3 and not taken & again


def test_drawn_colour_position_and_word_are_in_the_pixels(world) -> None:
    out, data = world
    checked = 0
    for kind in ("vqa_color", "vqa", "eval_color", "eval_mc", "eval_position", "eval_count",
                 "descriptions", "captions", "multi_image", "eval_multi_image", "eval_ocr"):
        for rec in data[kind]:
            meta = rec["meta"]
            scenes = meta["scenes"] if "scenes" in meta else [meta["scene"]]
            for name, scene in zip(media(rec), scenes):
                arr = np.asarray(Image.open(out / name).convert("RGB"))
                h, w = arr.shape[:2]
                assert dominant_color(arr) == scene["color"], name
                assert len(scene["centers"]) == scene["count"]
                for cx, cy in scene["centers"]:
                    assert nearest_color(arr[cy, cx]) == scene["color"], (name, cx, cy)
                    assert (arr[cy, cx].max() - arr[cy, cx].min()) > 60
                dark = int((arr.max(2) < 80).sum())
                assert (dark > 30) == bool(scene["word"]), name  # the rendered word, and only then
                pos, (cx, cy) = scene["position"], scene["centers"][0]
                if pos is not None:
                    assert {"left": cx < 0.4 * w, "right": cx > 0.6 * w, "top": cy < 0.4 * h,
                            "bottom": cy > 0.6 * h,
                            "center": 0.4 * w <= cx <= 0.6 * w and 0.4 * h <= cy <= 0.6 * h}[pos]
                checked += 1
            if meta["task"] == "color":
                assert meta["answer"] == meta["scene"]["color"]
    assert checked > 300


def test_videos_show_the_colour_and_the_direction(world) -> None:
    out, data = world
    for kind in ("video", "eval_video"):
        for rec in data[kind]:
            scene = rec["meta"]["scene"]
            frames = decode_video(out / rec["video"])
            assert dominant_color(frames[len(frames) // 2]) == scene["color"]
            centroids = []
            for f in (frames[0], frames[-1]):
                a = f.astype(int)
                ys, xs = np.nonzero((a.max(2) - a.min(2)) > 60)
                centroids.append((xs.mean(), ys.mean()))
            dx, dy = centroids[1][0] - centroids[0][0], centroids[1][1] - centroids[0][1]
            if abs(dx) > abs(dy):
                moved = "right" if dx > 0 else "left"
            else:
                moved = "down" if dy > 0 else "up"
            assert moved == scene["direction"] and max(abs(dx), abs(dy)) > 10
            if rec["meta"]["task"] == "video_direction":
                assert rec["meta"]["answer"] == scene["direction"]


def test_corpus_covers_every_text(world) -> None:
    _, data = world
    corpus = sw.corpus_texts()
    assert corpus == sw.corpus_texts() and len(corpus) == len(set(corpus))
    phrases = set(corpus)
    tokens = {t for text in corpus for t in text.split()}
    for recs in data.values():
        for rec in recs:
            meta = rec["meta"]
            for value in [meta["answer"], meta.get("answer_text"), *meta.get("choices", [])]:
                if value is not None:
                    assert value in phrases, value
            for turn in rec["conversations"]:
                text = turn["value"].replace("<image>", " ").replace("<video>", " ")
                missing = set(text.split()) - tokens
                assert not missing, (rec["id"], missing)
    for value in (*sw.COLORS, *sw.SHAPES, *sw.POSITIONS, *sw.DIRECTIONS, *sw.WORDS, *"ABCDEF",
                  "yes", "no", sw.SHORT_SUFFIX, sw.MC_SUFFIX):
        assert value in phrases


def test_gif_fallback_when_no_mp4_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sw, "VIDEO_CODECS", ())
    sw.video_codec.cache_clear()
    try:
        assert sw.video_codec() == "gif"
        recs = json.loads(sw.generate_kind(tmp_path, "video", 4, seed=0).read_text())
    finally:
        monkeypatch.undo()
        sw.video_codec.cache_clear()
    for rec in recs:
        assert rec["video"].endswith(".gif")
        frames = decode_video(tmp_path / rec["video"])
        assert len(frames) == rec["meta"]["scene"]["num_frames"]
        assert dominant_color(frames[0]) == rec["meta"]["scene"]["color"]
    assert sw.video_codec() in ("libx264", "mpeg4")


def test_cli_and_per_kind_counts(tmp_path: Path) -> None:
    sw.main(["--out", str(tmp_path / "cli"), "--seed", "1", "--n-per-kind", "2", "--n-eval", "1"])
    info = json.loads((tmp_path / "cli" / "world.json").read_text())
    assert info["counts"]["video"] == 2 and info["counts"]["eval_video"] == 1
    paths = sw.generate_world(tmp_path / "d", seed=0, n_per_kind={"vqa": 3, "video": 1}, n_eval=1)
    assert len(json.loads(paths["vqa"].read_text())) == 3
    assert len(json.loads(paths["video"].read_text())) == 1
    assert len(json.loads(paths["captions"].read_text())) == 200
    with pytest.raises(ValueError):
        sw.generate_kind(tmp_path, "nonsense", 1, 0)


def test_ov_mix_follows_the_onevision_length_mix(tmp_path: Path) -> None:
    """synthetic://shapes/ov_mix: OV_MIX's proportions, images sized to their AnyRes grid (1x1..3x3 tiles),
    2-6 images, 8-32-frame videos, a card, and the same bytes for the same seed; curation's URI reaches it."""
    from components.curate.sources import synthetic_world

    n, tile = 40, 56
    world, kind = synthetic_world(f"synthetic://shapes/ov_mix?n={n}&tile={tile}", tmp_path, seed=5)
    assert kind == "ov_mix" and world.name == f"shapes-ov_mix-seed5-n{n}-tile{tile}"
    records = json.loads((world / "ov_mix.json").read_text())
    counts = Counter(r["meta"]["modality"] for r in records)
    assert counts == {m: round(share * n) for m, share in sw.OV_MIX}
    info = json.loads((world / "world.json").read_text())
    assert info["tile"] == tile and "729" in info["card"] and (world / "README.md").read_text() == info["card"]
    grids = set()
    for r in records:
        modality = r["meta"]["modality"]
        if modality == "text":
            assert "image" not in r and "video" not in r and "<image>" not in r["conversations"][0]["value"]
        elif modality == "image":
            a, b = r["meta"]["grid"]
            assert Image.open(world / r["image"]).size == (a * tile, b * tile)  # exactly its AnyRes grid
            grids.add((a, b))
        elif modality == "multi_image":
            assert 2 <= len(r["image"]) <= 6 == sw.OV_IMAGES[1]
            assert r["conversations"][0]["value"].count("<image>") == len(r["image"])
        else:
            assert sw.OV_FRAMES[0] <= r["meta"]["scene"]["num_frames"] <= sw.OV_FRAMES[1]
            assert len(decode_video(world / r["video"])) == r["meta"]["scene"]["num_frames"]
    assert {g[0] * g[1] for g in grids} >= {1, 9}  # from one tile to the largest grid
    again = sw.generate_ov_mix(tmp_path / "again", n, seed=5, tile=tile)
    assert again.read_bytes() == (world / "ov_mix.json").read_bytes()

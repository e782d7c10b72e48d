"""Re-captioning: order and pass-through, batching, resumable progress parts, laziness, error paths.

A tiny random captioner writes arbitrary tokens, so these check structure and behaviour, never content.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from components.curate import recaption as rc
from onevision import storage
from onevision.recipe import RecaptionSpec

MODEL = "s3://onevision/runs/test/captioner"  # never loaded: the tests hand the model in


@pytest.fixture(scope="module")
def captioner(tiny_recipe):
    from model.builder import build_tiny

    return build_tiny(tiny_recipe)


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _qa(question: str = "<image>\nColour?", answer: str = "red") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def corpus() -> list[tuple[dict, dict[str, bytes]]]:
    """7 single-image records (two multi-turn) among text, multi-image and video records."""
    pngs = [_png(s, c) for s, c in [((56, 56), (200, 30, 30)), ((80, 40), (30, 200, 30)), ((40, 90), (30, 30, 200))]]
    items: list[tuple[dict, dict[str, bytes]]] = []
    for k in range(7):
        name = f"img/{k}.png"
        conv = _qa() if k % 3 else [*_qa(), {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]
        items.append(({"id": f"s{k}", "image": name if k % 2 else [name], "conversations": conv,
                       "meta": {"source": "unit"}}, {name: pngs[k % 3]}))
        if k in (0, 2, 3, 5):  # others interleaved, some inside batches
            items.append(({"id": f"t{k}", "conversations": _qa("Hi?", "hello")}, {}))
    items.insert(4, ({"id": "multi", "image": ["img/0.png", "img/1.png"],
                      "conversations": _qa("<image>\n<image>\nSame?", "no")},
                     {"img/0.png": pngs[0], "img/1.png": pngs[1]}))
    items.append(({"id": "vid", "video": "clip.mp4", "conversations": _qa("<video>\nWhat moves?", "a box")},
                  {"clip.mp4": b"not decoded: never captioned"}))
    return items


def n_single(items) -> int:
    return sum(rc.single_image(r) is not None for r, _ in items)


class CallLog(list):
    """The prompt ids of each generate call; `fail_on = k` makes call k raise (an interrupted run)."""

    fail_on: int | None = None


@pytest.fixture()
def calls(monkeypatch) -> CallLog:
    real = rc.generate
    log = CallLog()

    def counting(model, processor, prompts, **kwargs):
        log.append([p.id for p in prompts])
        if log.fail_on == len(log):
            raise RuntimeError("interrupted")
        return real(model, processor, prompts, **kwargs)

    monkeypatch.setattr(rc, "generate", counting)
    return log


def run(items, spec, progress, captioner) -> list[tuple[dict, dict[str, bytes]]]:
    return list(rc.recaption(iter(items), spec, str(progress), model_and_processor=captioner))


def parts(progress: Path) -> list[str]:
    return sorted(p.name for p in progress.iterdir()) if progress.exists() else []


def test_order_passthrough_and_captions(captioner, calls, tmp_path: Path) -> None:
    items = corpus()
    snapshot = json.dumps([r for r, _ in items])
    spec = RecaptionSpec(model=MODEL, batch_size=3, max_new_tokens=6)
    out = run(items, spec, tmp_path / "p", captioner)
    assert json.dumps([r for r, _ in items]) == snapshot  # the caller's records are not mutated
    assert [r["id"] for r, _ in out] == [r["id"] for r, _ in items]
    stored = {row["id"]: row for part in sorted((tmp_path / "p").iterdir())
              for row in map(json.loads, part.read_text().splitlines())}
    assert sorted(stored) == sorted(r["id"] for r, _ in items if rc.single_image(r))
    for (before, media_in), (after, media_out) in zip(items, out):
        assert media_out is media_in
        if rc.single_image(before) is None:
            assert after is before  # text, multi-image and video records: the same object
            continue
        assert stored[after["id"]]["index"] == items.index((before, media_in))
        assert after["meta"]["source"] == "unit"
        assert [t["from"] for t in after["conversations"]] == [t["from"] for t in before["conversations"]]
        assert after["conversations"][:-1] == before["conversations"][:-1]  # only the last answer changes
        caption = stored[after["id"]]["caption"]
        if caption.strip():
            assert after["conversations"][-1]["value"] == caption and after["meta"]["recaptioned_by"] == MODEL
        else:  # a random model may well say nothing
            assert after["conversations"] == before["conversations"]
            assert after["meta"]["recaption_error"] == "empty caption"


@pytest.mark.parametrize("batch_size", [1, 3, 7, 10])
def test_one_generate_call_per_batch(captioner, calls, tmp_path: Path, batch_size: int) -> None:
    items = corpus()
    run(items, RecaptionSpec(model=MODEL, batch_size=batch_size, max_new_tokens=2), tmp_path / "p", captioner)
    assert len(calls) == math.ceil(n_single(items) / batch_size)
    assert all(len(ids) <= batch_size for ids in calls)
    assert sorted(i for ids in calls for i in ids) == sorted(r["id"] for r, _ in items if rc.single_image(r))
    assert len(parts(tmp_path / "p")) == len(calls)


def test_resume_regenerates_only_missing_part(captioner, calls, tmp_path: Path) -> None:
    items, progress = corpus(), tmp_path / "p"
    spec = RecaptionSpec(model=MODEL, batch_size=3, max_new_tokens=6)
    first = run(items, spec, progress, captioner)
    names = parts(progress)
    assert len(names) == 3 and names[0] == "part-000000000.jsonl"
    missing = progress / names[1]
    kept = missing.read_bytes()
    missing.unlink()
    calls.clear()
    again = run(items, spec, progress, captioner)
    assert len(calls) == 1
    assert calls[0] == [json.loads(line)["id"] for line in kept.decode().splitlines()]
    assert again == first and parts(progress) == names


def test_fully_covered_run_never_loads_the_model(captioner, calls, tmp_path: Path, monkeypatch) -> None:
    items, progress = corpus(), tmp_path / "p"
    spec = RecaptionSpec(model=MODEL, batch_size=4, max_new_tokens=4)
    first = run(items, spec, progress, captioner)
    loads: list[str] = []
    monkeypatch.setattr(rc, "load_pretrained", lambda source: loads.append(source) or captioner)
    calls.clear()
    assert list(rc.recaption(iter(items), spec, str(progress))) == first
    assert loads == [] and calls == []
    # Nothing stored: the model is loaded once, on the first batch that needs it, from spec.model.
    assert list(rc.recaption(iter(items), spec, str(tmp_path / "fresh"))) == first
    assert loads == [MODEL] and len(calls) == 2
    # Nothing to caption at all: never loaded.
    text_only = [it for it in items if rc.single_image(it[0]) is None]
    assert list(rc.recaption(iter(text_only), spec, str(tmp_path / "none"))) == text_only
    assert loads == [MODEL] and not (tmp_path / "none").exists()


def test_interrupted_run_resumes_to_identical_output(captioner, calls, tmp_path: Path) -> None:
    items = corpus()
    spec = RecaptionSpec(model=MODEL, batch_size=2, max_new_tokens=6)
    reference = run(items, spec, tmp_path / "ref", captioner)
    progress = tmp_path / "p"
    calls.clear()
    calls.fail_on = 2
    seen = []
    with pytest.raises(RuntimeError, match="interrupted"):
        for item in rc.recaption(iter(items), spec, str(progress), model_and_processor=captioner):
            seen.append(item)  # noqa: PERF402 (list() would drop what came before the raise)
    assert parts(progress) == parts(tmp_path / "ref")[:1]  # exactly the completed batch
    assert seen == reference[:len(seen)]
    calls.clear()
    calls.fail_on = None
    assert run(items, spec, progress, captioner) == reference
    assert len(calls) == math.ceil(n_single(items) / 2) - 1
    assert parts(progress) == parts(tmp_path / "ref")
    for name in parts(progress):
        assert (progress / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_streams_at_most_one_batch_ahead(captioner, calls, tmp_path: Path) -> None:
    items = [it for it in corpus() if rc.single_image(it[0])]
    batch_size = 3
    pulled = 0

    def source() -> Iterator[tuple[dict, dict[str, bytes]]]:
        nonlocal pulled
        for item in items:
            pulled += 1
            yield item

    spec = RecaptionSpec(model=MODEL, batch_size=batch_size, max_new_tokens=2)
    stream = rc.recaption(source(), spec, str(tmp_path / "p"), model_and_processor=captioner)
    assert pulled == 0  # nothing read before the first request
    for k, _ in enumerate(stream, 1):
        assert pulled <= k - 1 + batch_size, (k, pulled)
    assert pulled == len(items)


def test_errors_pass_through_with_reason(captioner, calls, tmp_path: Path, monkeypatch) -> None:
    good = ({"id": "good", "image": "a.png", "conversations": _qa(), "meta": {"k": 1}}, {"a.png": _png((56, 56), (9, 9, 9))})
    broken = ({"id": "broken", "image": "b.png", "conversations": _qa()}, {"b.png": b"\x89PNG truncated"})
    missing = ({"id": "missing", "image": "c.png", "conversations": _qa()}, {})
    spec = RecaptionSpec(model=MODEL, batch_size=8, max_new_tokens=2)
    out = run([good, broken, missing], spec, tmp_path / "p", captioner)
    assert [r["id"] for r, _ in out] == ["good", "broken", "missing"]
    assert "not a decodable image" in out[1][0]["meta"]["recaption_error"]
    assert "not in the shard" in out[2][0]["meta"]["recaption_error"]
    assert out[1][0]["conversations"] == broken[0]["conversations"] and "meta" not in broken[0]
    assert calls == [["good"]]
    stored = [json.loads(line) for line in (tmp_path / "p" / "part-000000000.jsonl").read_text().splitlines()]
    assert [row["id"] for row in stored] == ["good"]  # errors are not progress: a rerun retries them

    # An empty caption keeps the original answer.
    monkeypatch.setattr(rc, "generate", lambda model, processor, prompts, **kw: [""] * len(prompts))
    (record, _), = run([good], spec, tmp_path / "empty", captioner)
    assert record["conversations"] == good[0]["conversations"]
    assert record["meta"] == {"k": 1, "recaption_error": "empty caption"}
    assert good[0]["meta"] == {"k": 1}


def test_progress_on_s3_like_uri_uses_storage(captioner, monkeypatch, tmp_path: Path) -> None:
    """Parts go through storage.write_bytes / list_uris / read_bytes, so s3:// works like a local path."""
    objects: dict[str, bytes] = {}
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: objects.__setitem__(uri, data))
    monkeypatch.setattr(storage, "list_uris", lambda prefix: sorted(u for u in objects if u.startswith(prefix + "/")))
    monkeypatch.setattr(storage, "read_bytes", lambda uri: objects[uri])
    monkeypatch.setattr(rc, "generate", lambda model, processor, prompts, **kw: [f"cap {p.id}" for p in prompts])
    items = [it for it in corpus() if rc.single_image(it[0])][:3]
    spec = RecaptionSpec(model=MODEL, batch_size=2, max_new_tokens=2)
    out = list(rc.recaption(iter(items), spec, "s3://bucket/run/recaption", model_and_processor=captioner))
    assert sorted(objects) == ["s3://bucket/run/recaption/part-000000000.jsonl",
                               "s3://bucket/run/recaption/part-000000002.jsonl"]
    assert [r["conversations"][-1]["value"] for r, _ in out] == ["cap s0", "cap s1", "cap s2"]
    monkeypatch.setattr(rc, "generate", lambda *a, **kw: pytest.fail("everything is stored"))
    assert list(rc.recaption(iter(items), spec, "s3://bucket/run/recaption")) == out

"""The review gallery builder: which samples, their marks, the champion column, a self-contained page."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

from components.evaluate.gallery import GALLERY_HTML, GALLERY_PNG, answer_of, build_gallery, choose


def _png_uri(colour: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _samples(tmp_path: Path) -> tuple[dict, dict]:
    """Three tasks: two of 20 samples with images on disk (every third one right), one of 3 with a data: URI."""
    picture = tmp_path / "shape.png"
    Image.new("RGB", (300, 200), "red").save(picture)
    samples, docs = {}, {}
    for task in ("shapes_color", "shapes_multi_image"):
        samples[task] = [{"doc_id": i, "input": f"<image>\nQ{i} of {task}?", "target": "red",
                          "filtered_resps": "red" if i % 3 == 0 else f"blue{i}", "exact_match": float(i % 3 == 0)}
                         for i in range(20)]
        docs[task] = [{"question": f"<image>\nQ{i} of {task}?", "answer": "red",
                       "visuals": [str(picture)] * (2 if task == "shapes_multi_image" else 1)} for i in range(20)]
    samples["ai2d"] = [{"doc_id": i, "input": f"Which part? {i}", "target": ["A", "a"], "filtered_resps": ["B"],
                        "exact_match": 0.0, "input_media": [_png_uri("green"), "https://example.com/x.png"]}
                       for i in range(3)]
    return samples, docs


def test_choice_is_spread_over_tasks_and_deterministic(tmp_path: Path) -> None:
    samples, _ = _samples(tmp_path)
    chosen = choose(samples, 24)
    per_task = {t: [s["doc_id"] for task, s in chosen if task == t] for t in samples}
    assert {t: len(ids) for t, ids in per_task.items()} == {"ai2d": 3, "shapes_color": 11, "shapes_multi_image": 10}
    assert per_task["shapes_color"][0] == 0 and per_task["shapes_color"][-1] >= 18  # spread, not the first 11
    assert len(set(per_task["shapes_color"])) == 11
    shuffled = {t: list(reversed(rows)) for t, rows in reversed(list(samples.items()))}
    assert choose(shuffled, 24) == chosen
    assert len(choose(samples, 100)) == 43  # never more than there are


def _cards(page: str) -> list[str]:
    return re.findall(r'<article class="card".*?</article>', page, re.S)


def test_marks_champion_column_and_a_self_contained_page(tmp_path: Path) -> None:
    samples, docs = _samples(tmp_path)
    metrics = dict.fromkeys(samples, "exact_match")
    alone = build_gallery(samples, metrics, tmp_path / "alone", title="tiny / stage2_ov", docs=docs)
    page = (tmp_path / "alone" / GALLERY_HTML).read_text()
    cards = _cards(page)
    assert len(cards) == alone["samples"] == 24
    assert "champion" not in page  # no champion: no column
    for card in cards:
        right = re.search(r'class="candidate"><span class="answer">([^<]*)</span> <span class="mark (\w+)"', card)
        assert right.group(2) == ("right" if right.group(1) == "red" else "wrong"), card
    assert alone["candidate_right"] == page.count('class="mark right"') > 0
    assert "Q0 of shapes_color?" in page and "<dd class=\"reference\">A / a</dd>" in page

    # every picture is embedded; a remote one is not fetched but noted; no external resource at all
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(srcs) == alone["images"] == 11 * 1 + 10 * 2 + 3
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, re.I) and "@import" not in page
    assert "1 of 2 media not available" in page
    assert Image.open(tmp_path / "alone" / GALLERY_PNG).size[0] > 1000

    champion = {"shapes_color": [dict(s, filtered_resps="red", exact_match=1.0) for s in samples["shapes_color"][:10]]}
    champion["shapes_color"][0]["input"] = "another question"  # not the same doc: not matched
    shown = build_gallery(samples, metrics, tmp_path / "vs", title="t", docs=docs, champion=champion,
                          champion_label="champion v3")
    page = (tmp_path / "vs" / GALLERY_HTML).read_text()
    assert all("<dt>champion</dt>" in card for card in _cards(page))
    answered = [c for c in _cards(page) if re.search(r'class="champion"><span class="answer">red</span> '
                                                     r'<span class="mark right"', c)]
    # shapes_color's chosen doc ids are 0 1 3 5 7 9 10 12...: the champion answered 1 3 5 7 9 (0 is another doc)
    assert len(answered) == shown["champion_answers"] == 5
    assert page.count("not answered") == 24 - 5


def test_a_mark_comes_from_the_samples_metric() -> None:
    def mark(score):
        return answer_of({"filtered_resps": ["x\x07"], "m": score}, "m")

    assert [mark(s).right for s in (1.0, 0.0, 0.75, 0.2, True, False)] == [True, False, True, False, True, False]
    assert mark(float("nan")).right is mark({"judge": 3}).right is mark(None).right is None
    assert mark(1.0).text == "x\ufffd"  # a control character is never written into the page

"""A review gallery of an evaluation: held-out samples with the reference, the candidate's answer and the
champion's, each marked right or wrong. Built from lmms-eval's logged samples (`--log_samples`), never by
generating again.

    from components.evaluate.gallery import build_gallery
    summary = build_gallery(samples, metrics, out_dir, docs=docs, champion=champion_samples, title="...")
    # out_dir/gallery.html: one self-contained page (media as data: URIs, no external resource)
    # out_dir/gallery.png: the same samples as a contact sheet

`samples` is {task: [lmms-eval logged sample, ...]} (the rows of samples_<task>.jsonl: doc_id, input,
target, filtered_resps, the per-sample metric, input_media for images); `docs` is {task: [doc, ...]}
indexed by doc_id (our offline tasks' shapes_data/<task>.jsonl rows, whose `visuals` also name videos);
`champion` is the champion's logged samples for the same tasks, matched by doc_id, question and reference.
A sample is right when its metric is >= 0.5 (exact match: 1); a metric that is not a number is unmarked.
"""

from __future__ import annotations

import base64
import html
import io
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from model.media import decode_image, load_image, load_video  # the project's checked decoders (size, pixels)

GALLERY_HTML, GALLERY_PNG = "gallery.html", "gallery.png"
SAMPLES = 24
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")
VIDEO_FRAMES = 4
THUMB = 224  # longest side of one image in the page; frames and several images are smaller


@dataclass
class Answer:
    text: str
    right: bool | None  # None: not scored per sample (or no number)
    score: Any = None


@dataclass
class Card:
    task: str
    doc_id: int
    question: str
    reference: str
    candidate: Answer
    champion: Answer | None  # None: the champion did not answer this sample (or no champion)
    media: list[Image.Image] = field(default_factory=list)
    media_kind: str = "image"  # image, images, video, none
    media_note: str = ""


def load_samples(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """{task: [sample, ...]} from the samples_<task>.jsonl files in `folder`."""
    return {path.stem.removeprefix("samples_"): parse_jsonl(path.read_text())
            for path in sorted(Path(folder).glob("samples_*.jsonl"))}


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def choose(samples: dict[str, list[dict[str, Any]]], n: int = SAMPLES) -> list[tuple[str, dict[str, Any]]]:
    """About `n` samples spread over the tasks (equal shares, a short task's share going to the others), each
    task's evenly spaced over its doc_ids; deterministic: the same samples give the same choice."""
    tasks = sorted(t for t, rows in samples.items() if rows)
    quota = dict.fromkeys(tasks, 0)
    left = n
    while left > 0 and any(quota[t] < len(samples[t]) for t in tasks):
        for task in tasks:
            if left and quota[task] < len(samples[task]):
                quota[task] += 1
                left -= 1
    chosen = []
    for task in tasks:
        rows = sorted(samples[task], key=lambda s: int(s.get("doc_id", 0)))
        k = quota[task]
        chosen += [(task, rows[i * len(rows) // k]) for i in range(k)]
    return chosen


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # several references, or an older lmms-eval's [[answer]]
        return " / ".join(_text(v) for v in value)
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict) else str(value)
    # a tiny model answers with control characters: shown as U+FFFD, never as raw bytes in the page
    return "".join("\ufffd" if unicodedata.category(c) == "Cc" and c not in "\n\t" else c for c in text)


def answer_of(sample: dict[str, Any], metric: str) -> Answer:
    """The answer lmms-eval logged (after its filters) and its mark from the sample's metric."""
    score = sample.get(metric)
    if isinstance(score, bool):
        right = score
    elif isinstance(score, (int, float)) and score == score:  # NaN is not scored
        right = score >= 0.5
    else:  # no per-sample number (a judge's dict, an aggregate-only metric)
        right = None
    return Answer(_text(sample.get("filtered_resps", sample.get("resps"))), right, score)


def _same_doc(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _text(a.get("input")) == _text(b.get("input")) and _text(a.get("target")) == _text(b.get("target"))


def _thumb(image: Image.Image, side: int) -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail((side, side))
    return image


def media_of(sample: dict[str, Any], doc: dict[str, Any] | None) -> tuple[list[Image.Image], str, str]:
    """(thumbnails, kind, note): the doc's visuals (images or a video's frames), else lmms-eval's input_media
    (local paths or data: URIs; a remote URL is not fetched, the page stays self-contained)."""
    sources = list((doc or {}).get("visuals") or sample.get("input_media") or [])
    images, kind, missing = [], "images" if len(sources) > 1 else "image", 0
    for source in sources:
        try:
            if isinstance(source, str) and source.startswith("data:"):
                images.append(_thumb(decode_image(base64.b64decode(source.split(",", 1)[1]), "a data: URI"), THUMB))
            elif isinstance(source, str) and source.lower().endswith(VIDEO_SUFFIXES) and Path(source).is_file():
                frames = load_video(source, VIDEO_FRAMES)
                images += [_thumb(Image.fromarray(f), THUMB // 2) for f in frames]
                kind = "video"
            elif isinstance(source, str) and Path(source).is_file():
                images.append(_thumb(load_image(source), THUMB if len(sources) == 1 else THUMB // 2))
            else:
                missing += 1
        except Exception:  # a broken file is shown as missing; the evaluation itself already used or refused it
            missing += 1
    note = f"{missing} of {len(sources)} media not available" if missing else ("" if sources else "no media")
    return images, kind if images else "none", note


def cards_of(samples: dict[str, list[dict[str, Any]]], metrics: dict[str, str], *, n: int = SAMPLES,
             docs: dict[str, list[dict[str, Any]]] | None = None,
             champion: dict[str, list[dict[str, Any]]] | None = None) -> list[Card]:
    cards = []
    for task, sample in choose(samples, n):
        doc_id = int(sample.get("doc_id", 0))
        rows = (docs or {}).get(task) or []
        doc = rows[doc_id] if doc_id < len(rows) and _text(rows[doc_id].get("question")) == _text(sample.get("input")) \
            else None
        theirs = next((s for s in (champion or {}).get(task) or [] if int(s.get("doc_id", -1)) == doc_id
                       and _same_doc(s, sample)), None)
        media, kind, note = media_of(sample, doc)
        metric = metrics.get(task, "exact_match")
        cards.append(Card(task, doc_id, _text(sample.get("input")), _text(sample.get("target")),
                          answer_of(sample, metric), answer_of(theirs, metric) if theirs else None,
                          media, kind, note))
    return cards


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _mark(answer: Answer | None) -> tuple[str, str]:
    """(css class, label) of an answer's mark."""
    if answer is None:
        return "absent", "not answered"
    return {True: ("right", "\u2713 right"), False: ("wrong", "\u2717 wrong"), None: ("unscored", "not scored")}[
        answer.right]


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;background:#f6f6f4;color:#222}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:20px 0 8px}
.summary{color:#555;margin-bottom:8px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px}
.media{display:flex;flex-wrap:wrap;gap:4px;margin-bottom:6px;min-height:40px}
.media img{border:1px solid #ccc;max-height:180px;width:auto;height:auto}
.note{color:#a60;font-size:12px}
.q{white-space:pre-wrap;margin:4px 0;font-family:ui-monospace,monospace;font-size:12px;background:#f3f3f3;padding:4px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 8px;margin:4px 0}
dt{color:#666} dd{margin:0;word-break:break-word}
.right{color:#176b2c;font-weight:600} .wrong{color:#b3261e;font-weight:600}
.unscored,.absent{color:#777}
.id{color:#888;font-size:12px}
"""


def render_html(cards: list[Card], *, title: str, champion_label: str | None) -> str:
    """The page: one card per sample, grouped by task; a champion row only when there is a champion."""
    def answer_row(label: str, answer: Answer | None, cls: str) -> str:
        mark_cls, mark = _mark(answer)
        text = html.escape(answer.text) if answer else "&mdash;"
        return (f'<dt>{label}</dt><dd class="{cls}"><span class="answer">{text}</span> '
                f'<span class="mark {mark_cls}">{mark}</span></dd>')

    def card_html(card: Card) -> str:
        imgs = "".join(f'<img src="{_data_uri(im)}" width="{im.width}" height="{im.height}" '
                       f'alt="{card.task} #{card.doc_id} {card.media_kind} {i + 1}">' for i, im in enumerate(card.media))
        note = f'<div class="note">{html.escape(card.media_note)}</div>' if card.media_note else ""
        rows = [f'<dt>reference</dt><dd class="reference">{html.escape(card.reference)}</dd>',
                answer_row("candidate", card.candidate, "candidate")]
        if champion_label:
            rows.append(answer_row("champion", card.champion, "champion"))
        return (f'<article class="card" data-task="{html.escape(card.task)}" data-doc-id="{card.doc_id}">'
                f'<div class="id">{html.escape(card.task)} #{card.doc_id} &middot; {card.media_kind}</div>'
                f'<div class="media">{imgs}</div>{note}<p class="q">{html.escape(card.question)}</p>'
                f'<dl>{"".join(rows)}</dl></article>')

    def tally(get) -> str:
        marked = [a.right for a in map(get, cards) if a is not None and a.right is not None]
        return f"{sum(marked)}/{len(marked)} right"

    tasks = list(dict.fromkeys(c.task for c in cards))
    summary = f"{len(cards)} held-out samples from {len(tasks)} tasks; candidate {tally(lambda c: c.candidate)}"
    if champion_label:
        summary += f"; {html.escape(champion_label)} {tally(lambda c: c.champion)}"
    sections = "".join(f'<h2>{html.escape(t)}</h2><div class="grid">'
                       + "".join(card_html(c) for c in cards if c.task == t) + "</div>" for t in tasks)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>'
            f'<div class="summary">{summary}</div>{sections}</body></html>\n')


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_sheet(cards: list[Card], *, title: str, champion_label: str | None, columns: int = 4) -> Image.Image:
    """The contact sheet: the same cards on one PNG (media strip, question, reference, answers and marks)."""
    cell_w, media_h, line_h = 320, 130, 17
    lines = 5 + bool(champion_label)
    cell_h = media_h + 12 + lines * line_h
    rows = max(1, -(-len(cards) // columns))
    sheet = Image.new("RGB", (columns * cell_w + 10, 40 + rows * (cell_h + 10)), "white")
    draw = ImageDraw.Draw(sheet)
    big, small = _font(18), _font(13)
    draw.text((10, 10), title, fill="black", font=big)
    colours = {"right": (23, 107, 44), "wrong": (179, 38, 30), "unscored": (110, 110, 110), "absent": (110, 110, 110)}
    for i, card in enumerate(cards):
        x0, y0 = 10 + (i % columns) * cell_w, 40 + (i // columns) * (cell_h + 10)
        draw.rectangle((x0, y0, x0 + cell_w - 10, y0 + cell_h), outline=(200, 200, 200))
        x = x0 + 4
        per = (cell_w - 18) // max(1, len(card.media)) - 4
        for image in card.media:
            thumb = _thumb(image, min(media_h - 8, max(per, 24)))
            sheet.paste(thumb, (x, y0 + 4))
            x += thumb.width + 4
        y = y0 + media_h + 4
        text = [(f"{card.task} #{card.doc_id}", (120, 120, 120)), ("Q: " + card.question.replace("<image>", "[image]")
                                                                      .replace("<video>", "[video]"), (0, 0, 0)),
                ("ref: " + card.reference, (0, 0, 0))]
        answers = [("cand", card.candidate)] + ([("champ", card.champion)] if champion_label else [])
        for label, answer in answers:
            cls, _ = _mark(answer)
            text.append((f"{label}: [{cls if cls != 'absent' else 'n/a'}] {answer.text if answer else '-'}",
                         colours[cls]))
        for line, colour in text:
            draw.text((x0 + 4, y), _fit(draw, line, small, cell_w - 20), fill=colour, font=small)
            y += line_h
    return sheet


def build_gallery(samples: dict[str, list[dict[str, Any]]], metrics: dict[str, str], out_dir: str | Path, *,
                  title: str, docs: dict[str, list[dict[str, Any]]] | None = None,
                  champion: dict[str, list[dict[str, Any]]] | None = None, champion_label: str | None = None,
                  n: int = SAMPLES) -> dict[str, Any]:
    """Write gallery.html and gallery.png into `out_dir`; returns a summary (samples per task, marks).
    A champion column appears when `champion_label` is given (a champion exists), answered or not."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cards = cards_of(samples, metrics, n=n, docs=docs, champion=champion if champion_label else None)
    (out_dir / GALLERY_HTML).write_text(render_html(cards, title=title, champion_label=champion_label),
                                        encoding="utf-8")
    render_sheet(cards, title=title, champion_label=champion_label).save(out_dir / GALLERY_PNG, optimize=True)
    per_task: dict[str, int] = {}
    for card in cards:
        per_task[card.task] = per_task.get(card.task, 0) + 1
    return {"samples": len(cards), "per_task": per_task, "images": sum(len(c.media) for c in cards),
            "candidate_right": sum(c.candidate.right is True for c in cards),
            "champion_answers": sum(c.champion is not None for c in cards) if champion_label else None}

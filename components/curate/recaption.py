"""Re-caption single-image records with a LLaVA-OneVision captioner (the paper's self-improvement data).

    from components.curate.recaption import recaption
    spec = RecaptionSpec(model="s3://onevision/runs/r1/stage1_5/model", batch_size=8)
    for record, media in recaption(items, spec, progress_uri="s3://onevision/runs/r1/curate/recaption/src0"):
        ...  # every input item, in order; single-image records carry the captioner's description

`items` yields (LLaVA record, {media path: bytes}). A record with exactly one image and no video gets its
last assistant turn replaced by the greedy answer to `"<image>\\n" + spec.prompt` (a fresh one-turn
conversation, not the record's own question) and `meta.recaptioned_by = spec.model`; every other record
passes through as the same object. A record whose prompt cannot be built (undecodable or missing image)
passes through with `meta.recaption_error`; so does one whose caption comes out empty (original answer kept).

Streaming: at most one batch (spec.batch_size image records and whatever lies between them) is held.
Resumable: each generated batch writes `<progress_uri>/part-<index of its first item:09d>.jsonl`, one
{"index", "id", "caption"} line per caption; a rerun reads every part first and reuses a stored caption for
the same (index, id), so a batch whose captions are all stored never touches the model, which is loaded
(`load_pretrained(spec.model)`) only when something must be generated. A progress_uri belongs to one
(input, spec) pair: captions are matched by position and id, not by content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from model import chat
from model.builder import load_pretrained
from model.generation import generate
from model.processing import SampleError, SampleProcessor
from onevision import storage
from onevision.recipe import RecaptionSpec

Item = tuple[dict[str, Any], dict[str, bytes]]
Key = tuple[int, str]  # (position in the input stream, record id)

PART_RE = re.compile(r"part-(\d{9})\.jsonl")
# prompt() never truncates, and a captioning prompt is one image and one sentence: any bound will do.
PROMPT_MAX_LENGTH = 32768


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def single_image(record: dict[str, Any]) -> str | None:
    """The record's image path if it has exactly one image and no video, else None."""
    # Same fields SampleProcessor reads, so what we caption is what training would see.
    images = _as_list(record.get("image") or record.get("images"))
    if len(images) != 1 or _as_list(record.get("video")):
        return None
    return images[0]


def last_assistant_turn(record: dict[str, Any]) -> int | None:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return None
    for i in range(len(turns) - 1, -1, -1):
        if isinstance(turns[i], dict) and chat.ROLES.get(str(turns[i].get("from", "")).lower()) == "assistant":
            return i
    return None


def part_uri(progress_uri: str, first_index: int) -> str:
    return storage.join(progress_uri, f"part-{first_index:09d}.jsonl")


def load_progress(progress_uri: str) -> dict[str, dict[Key, str]]:
    """{part uri: {(index, id): caption}} of every finished part under progress_uri."""
    parts: dict[str, dict[Key, str]] = {}
    for uri in storage.list_uris(progress_uri):
        # Only finished parts: a local write's temporary ".part-....part" file never matches.
        if not PART_RE.fullmatch(uri.rsplit("/", 1)[-1]):
            continue
        entries: dict[Key, str] = {}
        for n, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                entries[(int(row["index"]), str(row["id"]))] = str(row["caption"])
            except (ValueError, KeyError, TypeError) as err:
                # Parts are written atomically, so this is damage, not a crash mid-write; regenerating
                # silently could hide it, so stop and say which object to remove.
                raise ValueError(f"{uri} line {n}: not a recaption progress line ({err}); "
                                 f"delete the part to regenerate it") from None
        parts[uri] = entries
    return parts


def _with_meta(record: dict[str, Any], **meta: Any) -> dict[str, Any]:
    """A copy of the record with `meta` keys set; the caller's dict, turns and meta stay untouched."""
    out = dict(record)
    out["meta"] = {**(record.get("meta") or {}), **meta}
    return out


def _recaptioned(record: dict[str, Any], turn: int, caption: str, model: str) -> dict[str, Any]:
    if not caption.strip():
        return _with_meta(record, recaption_error="empty caption")
    out = _with_meta(record, recaptioned_by=model)
    out["conversations"] = [dict(t) for t in record["conversations"]]
    out["conversations"][turn]["value"] = caption
    return out


def recaption(items: Iterable[Item], spec: RecaptionSpec, progress_uri: str, template: chat.Template = "qwen_1_5",
              model_and_processor: tuple[Any, Any] | None = None) -> Iterator[Item]:
    """Every item of `items`, in order, single-image records re-captioned (see the module docstring)."""
    parts = load_progress(progress_uri)
    stored: dict[Key, str] = {key: caption for entries in parts.values() for key, caption in entries.items()}
    loaded: list[Any] = list(model_and_processor) if model_and_processor is not None else []
    sp: list[SampleProcessor] = []

    def captioner() -> tuple[Any, Any, SampleProcessor]:
        if not loaded:  # first batch with something to generate
            import torch

            model, processor = load_pretrained(spec.model)
            loaded.extend([model.to("cuda") if torch.cuda.is_available() else model, processor])
        if not sp:
            loaded[0].eval()
            sp.append(SampleProcessor(loaded[1], template, PROMPT_MAX_LENGTH))
        return loaded[0], loaded[1], sp[0]

    def flush(batch: list[tuple[int, dict[str, Any], dict[str, bytes], bool]]) -> Iterator[Item]:
        """Caption the batch's image records (stored captions first) and yield the whole batch."""
        todo = [i for i, (index, record, _, eligible) in enumerate(batch)
                if eligible and (index, str(record.get("id"))) not in stored]
        captions: dict[int, str] = {}
        errors: dict[int, str] = {}
        if todo:
            model, processor, prompts_of = captioner()
            prompts, positions = [], []
            for i in todo:
                _, record, media, _ = batch[i]
                prompt = {"id": record.get("id", "<no id>"), "image": single_image(record),
                          "conversations": [{"from": "human", "value": f"{chat.IMAGE_TOKEN}\n{spec.prompt}"}]}
                try:
                    prompts.append(prompts_of.prompt(prompt, media))
                    positions.append(i)
                except SampleError as err:
                    errors[i] = err.reason
            if prompts:
                texts = generate(model, processor, prompts, max_new_tokens=spec.max_new_tokens)
                captions = dict(zip(positions, texts))
                first = batch[0][0]
                # The part holds every caption of the batch (stored ones too) plus whatever an earlier run
                # with another batch layout wrote under the same name, so overwriting it loses nothing.
                rows = dict(parts.get(part_uri(progress_uri, first), {}))
                for i, (index, record, _, eligible) in enumerate(batch):
                    key = (index, str(record.get("id")))
                    if i in captions:
                        rows[key] = captions[i]
                    elif eligible and key in stored:
                        rows[key] = stored[key]
                lines = [json.dumps({"index": index, "id": id_, "caption": caption}, ensure_ascii=False)
                         for (index, id_), caption in sorted(rows.items())]
                storage.write_bytes(part_uri(progress_uri, first), ("\n".join(lines) + "\n").encode())
        for i, (index, record, media, eligible) in enumerate(batch):
            if not eligible:
                yield record, media
            elif i in errors:
                yield _with_meta(record, recaption_error=errors[i]), media
            else:
                caption = captions[i] if i in captions else stored[(index, str(record.get("id")))]
                yield _recaptioned(record, last_assistant_turn(record), caption, spec.model), media

    batch: list[tuple[int, dict[str, Any], dict[str, bytes], bool]] = []
    n_eligible = 0
    for index, (record, media) in enumerate(items):
        # A record without an assistant turn has no answer to replace: pass it through, don't caption it.
        eligible = single_image(record) is not None and last_assistant_turn(record) is not None
        if not batch and not eligible:
            yield record, media  # nothing held before it: no reason to wait
            continue
        batch.append((index, record, media, eligible))
        n_eligible += eligible
        if n_eligible == spec.batch_size:
            yield from flush(batch)
            batch, n_eligible = [], 0
    if batch:
        yield from flush(batch)

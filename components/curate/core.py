"""Curate one stage's data mixture into training shards, keeping every rejected record with its reason.

    from components.curate.core import curate_stage
    curate_stage(load_recipe("recipes/tiny.yaml"), "stage1", out="s3://onevision/runs/r1/curate/stage1")

Per data source of the stage (LLaVA-NeXT mixture semantics): load the records (`json_path` JSON/JSONL, or
`synthetic://shapes/<kind>[?n=N]`: the seeded shapes world), apply `sampling_strategy` (`all`,
`first:N`, `end:N`, `random:N`; N a count or a percentage; random is seeded by the recipe), validate
each record (conversation structure, placeholder/media counts, every image and video decodes), and
write the kept ones with their media into WebDataset shards. Rejected records go to `rejected.jsonl`
with the reason. The prefix is published atomically: shards, rejects and `curation.json`, manifest last.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from model import chat
from model.media import MediaError, decode_image, load_video
from model.shards import write_shards
from onevision import storage
from onevision.recipe import DataSource, Recipe

SYNTHETIC_DEFAULT_N = 1000


class CurationError(ValueError):
    """A data source cannot be read at all (as opposed to a bad record, which is rejected and kept)."""


def apply_sampling(records: list[Any], strategy: str, seed: int) -> list[Any]:
    """LLaVA-NeXT `sampling_strategy`: all | first:N | end:N | random:N, N a count or N%."""
    if strategy == "all":
        return list(records)
    how, amount = strategy.split(":")
    n = int(amount.rstrip("%"))
    count = min(len(records), round(len(records) * n / 100) if amount.endswith("%") else n)
    if how == "first":
        return list(records[:count])
    if how == "end":
        return list(records[len(records) - count:]) if count else []
    return random.Random(seed).sample(list(records), count)


def synthetic_world(uri: str, work: Path, seed: int) -> tuple[Path, str]:
    """(world dir, kind) for synthetic://shapes/<kind>[?n=N]; one world per (seed, n), generated once."""
    from model import shapes_world

    parsed = urlparse(uri)
    kind = parsed.path.strip("/")
    if parsed.netloc != "shapes" or kind not in (*shapes_world.KINDS, *shapes_world.EVAL_KINDS):
        raise CurationError(f"{uri}: not synthetic://shapes/<kind> with kind in {shapes_world.KINDS}")
    n = int(parse_qs(parsed.query).get("n", [SYNTHETIC_DEFAULT_N])[0])
    world = work / f"shapes-seed{seed}-n{n}"
    if not (world / "world.json").exists():
        shapes_world.generate_world(world, seed=seed, n_per_kind=n, n_eval=64)
    return world, kind


def load_source(source: DataSource, work: Path, seed: int) -> tuple[list[dict[str, Any]], Path]:
    """(records, media root) of one mixture entry."""
    if source.dataset_uri is not None:
        if source.dataset_uri.startswith("synthetic://"):
            world, kind = synthetic_world(source.dataset_uri, work, seed)
            return json.loads((world / f"{kind}.json").read_text()), world
        raise CurationError(f"{source.dataset_uri}: only synthetic:// dataset URIs are readable offline; "
                            "export the dataset to LLaVA JSON + media and name it with json_path")
    path = source.json_path
    raw = storage.read_bytes(path) if storage.is_s3(path) else Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.endswith(".jsonl") \
            else json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CurationError(f"{path}: not valid JSON/JSONL ({err})") from None
    if not isinstance(records, list):
        raise CurationError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    root = Path(source.media_root) if source.media_root else Path(path).parent
    return records, root


def _media_paths(record: dict[str, Any]) -> list[str]:
    out = []
    for field in ("image", "video"):
        value = record.get(field)
        out += [value] if isinstance(value, str) else list(value or [])
    return out


def check_record(record: Any, root: Path, video_frames: int | None) -> tuple[dict[str, bytes] | None, str | None]:
    """(media bytes by path, None) for a usable record, else (None, reason)."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)):
        return None, "record is not an object with an 'id'"
    try:
        turns = chat.normalise_turns(record.get("conversations"))
    except chat.ConversationError as err:
        return None, str(err)
    if turns[-1][0] != "assistant":
        return None, "a training conversation must end with an assistant turn"
    images = record.get("image")
    images = [images] if isinstance(images, str) else list(images or [])
    videos = [record["video"]] if isinstance(record.get("video"), str) else list(record.get("video") or [])
    n_image, n_video = chat.count_placeholders(record["conversations"])
    if (n_image, n_video) != (len(images), len(videos)):
        return None, f"{n_image} <image>/{n_video} <video> placeholders for {len(images)} image(s)/{len(videos)} video(s)"
    if videos and not video_frames:
        return None, "video sample in a stage without video_frames"
    media: dict[str, bytes] = {}
    for rel in _media_paths(record):
        if Path(rel).is_absolute() or ".." in Path(rel).parts or re.match(r"^[a-z]+://", rel):
            return None, f"media path {rel!r} must be relative to the media root"
        try:
            data = (root / rel).read_bytes()
            if rel in images:
                decode_image(data, rel)
            else:
                load_video(rel, 1, data=data)
        except OSError:
            return None, f"media file {rel} is missing"
        except MediaError as err:
            return None, str(err)
        media[rel] = data
    return media, None


def curate_stage(recipe: Recipe, stage_name: str, out: str, work_dir: str | None = None,
                 max_per_shard: int = 500) -> dict[str, Any]:
    """Build and publish one stage's shards; returns the curation summary."""
    stage = getattr(recipe.stages, stage_name)
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"curate-{stage_name}-"))
    work.mkdir(parents=True, exist_ok=True)
    kept: list[tuple[dict[str, Any], dict[str, bytes]]] = []
    rejected: list[dict[str, Any]] = []
    sources = []
    for index, source in enumerate(stage.data):
        records, root = load_source(source, work, recipe.training.seed)
        chosen = apply_sampling(records, source.sampling_strategy, recipe.training.seed + index)
        reasons: Counter[str] = Counter()
        for record in chosen:
            media, reason = check_record(record, root, stage.video_frames)
            if reason is None:
                kept.append((record, media))
            else:
                reasons[reason.split(":")[0]] += 1
                rejected.append({"source": source.json_path or source.dataset_uri, "reason": reason, "record": record})
        sources.append({"source": source.json_path or source.dataset_uri, "strategy": source.sampling_strategy,
                        "available": len(records), "sampled": len(chosen), "rejected": sum(reasons.values())})
    random.Random(recipe.training.seed).shuffle(kept)  # sources interleave; the sampler reorders per epoch
    staging = Path(tempfile.mkdtemp(prefix=f"publish-{stage_name}-", dir=work))  # never a previous run's files
    write_shards(kept, staging, max_per_shard=max_per_shard)
    (staging / "rejected.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rejected))
    summary = {"stage": stage_name, "kept": len(kept), "rejected": len(rejected), "sources": sources}
    (staging / "curation.json").write_text(json.dumps(summary, indent=1))
    storage.publish_dir(staging, out, metadata={"kept": len(kept), "rejected": len(rejected)})
    return summary

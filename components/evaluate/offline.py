"""Data for the offline lmms-eval tasks shipped in components/evaluate/tasks (the synthetic shapes world).

    names = write_offline_data(["shapes_color", "shapes_video"], data_dir="work/shapes_data", seed=7)

Task `shapes_<x>` reads the world's held-out split `eval_<x>` (never trained on): one JSONL row per
record with the user turn as the question (placeholders kept, so interleaved multi-image prompts match
training), the reference answer, absolute media paths and the chance rate of the question type.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.curate.sources import synthetic_world

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_PREFIX = "shapes_"


def offline_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob(f"{OFFLINE_PREFIX}*.yaml"))


def is_offline(task: str) -> bool:
    return task in offline_task_names()


def write_offline_data(tasks: list[str], data_dir: str | Path, seed: int, limit: dict[str, int] | None = None,
                       work: str | Path | None = None) -> list[Path]:
    """Write shapes_data/<task>.jsonl for each offline task in `tasks`; returns the files written."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    world, _ = synthetic_world("synthetic://shapes/captions", Path(work or data_dir.parent / "world"), seed)
    written = []
    for task in tasks:
        if not is_offline(task):
            continue
        records = json.loads((world / f"eval_{task.removeprefix(OFFLINE_PREFIX)}.json").read_text())
        records = records[: (limit or {}).get(task) or len(records)]
        path = data_dir / f"{task}.jsonl"
        with open(path, "w") as out:
            for r in records:
                media = [r[k]] if isinstance(r.get(k := "image"), str) else list(r.get("image") or [])
                media += [r["video"]] if isinstance(r.get("video"), str) else list(r.get("video") or [])
                out.write(json.dumps({"id": r["id"], "question": r["conversations"][0]["value"],
                                      "answer": r["meta"]["answer"], "task": r["meta"]["task"],
                                      "chance": r["meta"].get("chance", 0.0),
                                      "visuals": [str((world / m).resolve()) for m in media]}) + "\n")
        written.append(path)
    return written

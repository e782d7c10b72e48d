"""Batched greedy generation with the training-time prompt format, and exact-match scoring.

    from model.generation import answer_records, exact_match
    answers = answer_records(model, processor, records, media_root="world/", template="qwen_1_5")
    accuracy = exact_match(answers, [r["meta"]["answer"] for r in records])

Prompts are rendered by model.chat exactly as in training (the reference answer dropped), padded on
the left so every row's next token is at the end, and decoded greedily. The serving engine and the
evaluation plugin call these same functions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model import chat
from model.batching import visual_fields
from model.processing import ProcessedSample, SampleProcessor


def collate_left(items: Sequence[ProcessedSample], pad_token_id: int, square: bool = False) -> dict[str, Any]:
    """Left-padded prompts (B, T) with attention mask, plus the visual inputs."""
    longest = max(len(item) for item in items)
    input_ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, longest - len(item):] = item.input_ids
        attention_mask[row, longest - len(item):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, **visual_fields(items, square)}


@torch.no_grad()
def generate(model: Any, processor: Any, items: Sequence[ProcessedSample], max_new_tokens: int = 16,
             square: bool = False) -> list[str]:
    """Greedy continuations of already-processed prompts."""
    batch = collate_left(items, processor.tokenizer.pad_token_id, square)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=processor.tokenizer.convert_tokens_to_ids(chat.IM_END),
                         pad_token_id=processor.tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def answer_records(model: Any, processor: Any, records: Sequence[dict[str, Any]], media_root: str | Path,
                   template: chat.Template = "qwen_1_5", batch_size: int = 16, max_new_tokens: int = 16,
                   video_frames: int | None = 8) -> list[str]:
    """Answer LLaVA-format records (their last assistant turn, if any, is ignored)."""
    sp = SampleProcessor(processor, template, 32768, video_frames=video_frames, media_root=media_root)
    model.eval()
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        prompts = [sp.prompt(r) for r in records[start: start + batch_size]]
        answers += generate(model, processor, prompts, max_new_tokens)
    return answers


def normalise(text: str) -> str:
    """lmms-eval style: lower case, no surrounding space or final period, single spaces."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if not references:
        return 0.0
    return sum(normalise(p) == normalise(r) for p, r in zip(predictions, references)) / len(references)


def score_by_task(model: Any, processor: Any, records: Sequence[dict[str, Any]], media_root: str | Path,
                  **kwargs: Any) -> dict[str, dict[str, float]]:
    """Exact-match accuracy per `meta.task` of records that carry `meta.answer` (and `meta.chance`)."""
    answers = answer_records(model, processor, records, media_root, **kwargs)
    tasks: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for record, answer in zip(records, answers):
        tasks.setdefault(record["meta"]["task"], []).append((answer, record["meta"]))
    return {task: {"accuracy": exact_match([a for a, _ in rows], [m["answer"] for _, m in rows]),
                   "chance": float(rows[0][1].get("chance", 0.0)), "n": len(rows)}
            for task, rows in sorted(tasks.items())}

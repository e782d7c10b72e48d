"""Batched greedy generation with the training-time prompt format, and exact-match scoring.

    from model.generation import answer_records, exact_match
    answers = answer_records(model, processor, records, media_root="world/", template="qwen_1_5")
    accuracy = exact_match(answers, [r["meta"]["answer"] for r in records])

Prompts are rendered by model.chat exactly as in training (the reference answer dropped), padded on
the left so every row's next token is at the end, and decoded greedily. The evaluation plugin calls
`generate`; the serving engine decodes with `RunningBatch` (rows join and leave between steps, the
same greedy tokens as `generate`), both over `collate_left`.
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


class RunningBatch:
    """Rows that decode together one token per step; rows join (prefilled) and leave between steps.

        batch = RunningBatch(model, pad_token_id)
        logits = batch.join(items)     # (n, V) next-token logits of the new rows, which are appended last
        logits = batch.step(tokens)    # feed one token per row (B,) -> (B, V)
        batch.keep([0, 2])             # every other row leaves: its cache is freed

    The serving engine's continuous batching runs on this. Every row's tokens are the right-hand end of
    the cache's columns (rows are padded on the left when they join), and positions are counted per row,
    so a row's logits do not depend on which rows share its batch.
    """

    def __init__(self, model: Any, pad_token_id: int):
        self.model, self.pad_token_id = model, pad_token_id
        self.cache: Any = None  # transformers DynamicCache: keys/values (B, heads, T, head_dim) per layer
        self.mask: torch.Tensor | None = None  # (B, T) 1 where a row has a token
        self.positions: torch.Tensor | None = None  # (B,) the position of each row's next token

    def __len__(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def width(self) -> int:
        """Columns of the cache (T): the longest row."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    @torch.no_grad()
    def join(self, items: Sequence[ProcessedSample]) -> torch.Tensor:
        """Prefill new rows (one forward over their left-padded prompts and media); their logits (n, V)."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in collate_left(items, self.pad_token_id).items()}
        mask = batch["attention_mask"]  # (n, Tn)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does for left padding
        out = self.model(**batch, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        self._merge(out.cache, mask, mask.sum(-1))
        return out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each row its next token; the logits for the token after it (B, V)."""
        assert self.mask is not None and self.positions is not None and len(tokens) == len(self)
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)  # (B, T + 1)
        input_ids = torch.tensor(list(tokens), dtype=torch.long, device=device)[:, None]  # (B, 1)
        out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=self.positions[:, None],
                         cache=self.cache, use_cache=True)
        self.positions = self.positions + 1
        return out.logits[:, -1].float()

    def keep(self, rows: Sequence[int]) -> None:
        """Only `rows` stay, in that order; columns no remaining row uses are dropped."""
        if len(rows) == len(self) and list(rows) == list(range(len(self))):
            return
        if not rows:
            self.cache = self.mask = self.positions = None
            return
        assert self.mask is not None and self.positions is not None
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        first = int(mask.any(0).nonzero()[0])  # leading columns that are padding in every remaining row
        self.mask, self.positions = mask[:, first:], self.positions[index]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]

    def _merge(self, cache: Any, mask: torch.Tensor, lengths: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask, self.positions = cache, mask, lengths
            return
        assert self.mask is not None and self.positions is not None
        width = max(self.width, int(mask.shape[1]))

        def left_pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - x.shape[dim]
            if missing == 0:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([left_pad(old.keys, 2), left_pad(new.keys, 2)], dim=0)
            old.values = torch.cat([left_pad(old.values, 2), left_pad(new.values, 2)], dim=0)
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(mask, 1)], dim=0)
        self.positions = torch.cat([self.positions, lengths])

"""The data card of one curated stage: what went in, what was kept, and why the rest was not.

    stats = CardStats(); stats.add_kept(verdict, source); ...
    card = stats.card("stage2_si", "tiny", data_recipe_hash, shards)   # JSON-able dict
    markdown = render_markdown(card)

Counts by source (in = kept + duplicates + rejected, and what sampling left out), by modality and task
type, an estimated token-length histogram (power-of-two bins), and rejection reasons. Deterministic: no
paths, hosts or times, so the same recipe gives a byte-identical card.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from components.curate.checks import Verdict

TOKEN_BINS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def token_bin(n: int) -> str:
    for edge in TOKEN_BINS:
        if n <= edge:
            return f"<={edge}"
    return f">{TOKEN_BINS[-1]}"


@dataclass
class SourceStats:
    name: str
    strategy: str
    available: int | None = None  # None when sampling did not need to count (all, first:N)
    records_in: int = 0
    kept: int = 0
    duplicates: int = 0
    rejected: int = 0
    normalised: int = 0
    placeholders_moved: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def count_in(self) -> None:
        self.records_in += 1

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.name, "strategy": self.strategy, "available": self.available,
                "records_in": self.records_in, "kept": self.kept, "duplicates": self.duplicates,
                "rejected": self.rejected, "prompts_normalised": self.normalised,
                "placeholders_moved": self.placeholders_moved,
                "reasons": dict(sorted(self.reasons.items()))}


@dataclass
class CardStats:
    sources: list[SourceStats] = field(default_factory=list)
    modality: Counter[str] = field(default_factory=Counter)
    task_type: Counter[str] = field(default_factory=Counter)
    by_source_task: Counter[tuple[str, str]] = field(default_factory=Counter)
    tokens: Counter[str] = field(default_factory=Counter)

    def add_kept(self, verdict: Verdict, source: SourceStats) -> None:
        source.kept += 1
        source.normalised += verdict.normalised
        source.placeholders_moved += verdict.placeholder_moved
        self.modality[verdict.modality] += 1
        self.task_type[verdict.task] += 1
        self.by_source_task[(source.name, verdict.task)] += 1
        self.tokens[token_bin(verdict.num_tokens)] += 1

    def card(self, stage: str, recipe_name: str, data_recipe_hash: str, shards: list[dict[str, Any]]) -> dict[str, Any]:
        reasons: Counter[str] = Counter()
        for s in self.sources:
            reasons.update(s.reasons)
        totals = {k: sum(getattr(s, k) for s in self.sources) for k in ("records_in", "kept", "duplicates", "rejected")}
        return {
            "stage": stage, "recipe": recipe_name, "data_recipe_hash": data_recipe_hash,
            "totals": totals,
            "sources": [s.as_dict() for s in self.sources],
            "modality": dict(sorted(self.modality.items())),
            "task_type": dict(sorted(self.task_type.items())),
            "token_length_histogram": {b: self.tokens[b] for b in [token_bin(e) for e in TOKEN_BINS] + [token_bin(1 << 40)]
                                       if self.tokens[b]},
            "rejection_reasons": dict(sorted(reasons.items())),
            "shards": shards,
        }


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(card: dict[str, Any]) -> str:
    t = card["totals"]
    parts = [
        f"# Data card: {card['recipe']} / {card['stage']}",
        f"Data recipe hash `{card['data_recipe_hash'][:12]}`. {t['records_in']} records in: {t['kept']} kept, "
        f"{t['duplicates']} duplicates, {t['rejected']} rejected; {len(card['shards'])} shard(s), "
        f"{sum(s['bytes'] for s in card['shards'])} bytes.",
        "## Sources",
        _table(("source", "sampling", "available", "in", "kept", "duplicates", "rejected", "prompts normalised",
                "placeholders moved"),
               [(s["source"], s["strategy"], "-" if s["available"] is None else s["available"], s["records_in"],
                 s["kept"], s["duplicates"], s["rejected"], s["prompts_normalised"], s["placeholders_moved"])
                for s in card["sources"]]),
        "## Modality",
        _table(("modality", "records"), list(card["modality"].items())),
        "## Task type",
        _table(("task type", "records"), list(card["task_type"].items())),
        "## Estimated token length",
        _table(("tokens", "records"), list(card["token_length_histogram"].items())),
        "## Rejections and duplicates",
        _table(("reason", "records"), list(card["rejection_reasons"].items())) if card["rejection_reasons"] else "None.",
    ]
    return "\n\n".join(parts) + "\n"

"""Exact and near-duplicate detection over a stream of checked records, within and across sources.

    dedup = Deduplicator(exact=True, near_distance=4)
    hit = dedup.check(verdict, "src.json#17")     # None (kept, remembered) or (code, message)

Exact: the same media bytes and the same conversation (Verdict.content_hash). Near: the same conversation
(case and spacing folded) on images whose 64-bit pHashes are all within `near_distance` Hamming bits of
an earlier record's (re-encoded, resized or re-compressed copies). A different question on a similar
image is NOT a duplicate: VQA data asks many questions of one image. Memory is a few hashes per kept
record, never media; the first occurrence in stream order wins, so the result does not depend on the
number of workers.
"""

from __future__ import annotations

from components.curate.checks import Verdict


class Deduplicator:
    def __init__(self, exact: bool = True, near_distance: int | None = 4):
        self.exact, self.near_distance = exact, near_distance
        self._by_content: dict[str, str] = {}
        self._by_text: dict[str, list[tuple[tuple[int, ...], str]]] = {}

    def check(self, verdict: Verdict, label: str) -> tuple[str, str] | None:
        """(reason code, message) when `verdict` duplicates an earlier record, else None (and remember it)."""
        if self.exact:
            first = self._by_content.get(verdict.content_hash)
            if first is not None:
                return "duplicate", f"exact duplicate of {first} (same media bytes and conversation)"
        if self.near_distance is not None and verdict.phashes:
            for phashes, first in self._by_text.get(verdict.text_key, []):
                if len(phashes) == len(verdict.phashes):
                    distance = max((a ^ b).bit_count() for a, b in zip(phashes, verdict.phashes))
                    if distance <= self.near_distance:
                        return "near_duplicate", (f"near-duplicate of {first} (same conversation, pHash "
                                                  f"distance {distance} <= {self.near_distance})")
        if self.exact:
            self._by_content[verdict.content_hash] = label
        if self.near_distance is not None and verdict.phashes:
            self._by_text.setdefault(verdict.text_key, []).append((verdict.phashes, label))
        return None

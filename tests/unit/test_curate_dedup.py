"""The deduplicator's band index gives the answers of a full scan, whatever the stream."""

import random

import pytest

from components.curate.checks import Verdict
from components.curate.dedup import BAND_INDEX_FROM, PHASH_BITS, Deduplicator, band_slices


def scan_reference(stream: list[Verdict], near_distance: int) -> list[tuple[str, str] | None]:
    """The plain formulation: each record against every earlier kept record of its conversation."""
    by_content: dict[str, str] = {}
    by_text: dict[str, list[tuple[tuple[int, ...], str]]] = {}
    out = []
    for i, v in enumerate(stream):
        label = f"src#{i}"
        if v.content_hash in by_content:
            out.append(("duplicate", f"exact duplicate of {by_content[v.content_hash]} (same media bytes and conversation)"))
            continue
        hit = None
        for phashes, first in by_text.get(v.text_key, []):
            if len(phashes) == len(v.phashes):
                distance = max((a ^ b).bit_count() for a, b in zip(phashes, v.phashes))
                if distance <= near_distance:
                    hit = ("near_duplicate", f"near-duplicate of {first} (same conversation, pHash distance "
                                             f"{distance} <= {near_distance})")
                    break
        out.append(hit)
        if hit is None:
            by_content[v.content_hash] = label
            by_text.setdefault(v.text_key, []).append((v.phashes, label))
    return out


def flip(value: int, bits: int, rng: random.Random) -> int:
    for bit in rng.sample(range(PHASH_BITS), bits):
        value ^= 1 << bit
    return value


def synthetic_stream(seed: int, n: int) -> list[Verdict]:
    """A few conversations shared by many records (past the index threshold), images drawn from a small
    pool of base hashes with 0-9 bits flipped, some records with two images, some exact repeats."""
    rng = random.Random(seed)
    bases = [rng.getrandbits(PHASH_BITS) for _ in range(40)]
    stream = []
    for i in range(n):
        images = 2 if rng.random() < 0.2 else 1
        phashes = tuple(flip(rng.choice(bases), rng.randint(0, 9), rng) for _ in range(images))
        text = f"q{rng.randint(0, 2)}"
        content = f"c{rng.randint(0, n // 4)}" if rng.random() < 0.1 else f"u{i}"
        stream.append(Verdict(None, content_hash=content, text_key=text, phashes=phashes))
    return stream


@pytest.mark.parametrize("near_distance", [0, 2, 4, 7, 12])
def test_band_index_answers_as_the_full_scan(near_distance):
    stream = synthetic_stream(near_distance, 1500)
    dedup = Deduplicator(exact=True, near_distance=near_distance)
    got = [dedup.check(v, f"src#{i}") for i, v in enumerate(stream)]
    assert got == scan_reference(stream, near_distance)
    kinds = {hit[0] for hit in got if hit}
    assert len([hit for hit in got if hit is None]) > 3 * BAND_INDEX_FROM  # conversations past the threshold
    assert "duplicate" in kinds and (near_distance == 0 or "near_duplicate" in kinds)
    if band_slices(near_distance) is not None:  # the index was built, and it narrowed the search
        conversation = dedup._by_text["q0"]
        assert conversation.bands is not None
        assert len(conversation.candidates(stream[0].phashes, dedup._slices)) < len(conversation.entries)


@pytest.mark.parametrize("distance", range(0, 8))
def test_bands_cover_the_hash_and_a_near_pair_shares_one(distance):
    slices = band_slices(distance)
    assert len(slices) == distance + 1
    covered = 0
    for shift, mask in slices:
        assert covered & (mask << shift) == 0  # disjoint
        covered |= mask << shift
    assert covered == (1 << PHASH_BITS) - 1  # every bit in one band
    rng = random.Random(distance)
    for _ in range(500):
        a = rng.getrandbits(PHASH_BITS)
        b = flip(a, distance, rng)
        assert any((a >> shift) & mask == (b >> shift) & mask for shift, mask in slices)


def test_wide_distances_scan_instead_of_banding():
    assert band_slices(8) is None  # 9 bands of 7 bits: too narrow to narrow anything
    assert band_slices(64) is None

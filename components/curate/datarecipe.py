"""A stage's data recipe: everything that decides its curated bytes, its hash, and where those bytes live.

    data = DataRecipe.of(load_recipe("recipes/tiny.yaml"), "stage1")   # one HEAD (or stat) per record file
    data.hash()                                     # sha256 of the canonical JSON: the lineage and cache key
    data.curated_uri("s3://onevision/curated")      # s3://onevision/curated/tiny/stage1/<first 16 of the hash>
    DataRecipe.from_json(data.to_json())            # what the pipeline hands the (cached) curate step

Covered by the hash: the recipe's name, the stage, its mixture (sources, sampling, re-captioning), the
`curation` settings that change bytes (all but `workers` and `partitions`), the stage's limits (`model_max_length`,
`video_frames`, visual-token budgets), the seed, CURATION_FORMAT, and the identity of every record
file (S3 ETag and size; a local file's size and modification time; each parquet file of a folder or
hub mirror; a media tar). A media *folder* is named by its URI only: fingerprinting millions of images
would cost more than it saves, so replace media under new names. Not covered: the learning rates, the
worker and partition counts, anything else of the recipe, so runs that change only those share one curated prefix.
Light on purpose (no torch): preflight imports it to pin every stage's data recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from components.curate.checks import Limits
from onevision import storage
from onevision.recipe import CurationSpec, DataSource, Recipe

CURATION_FORMAT = 3  # bump when the same inputs would curate to other bytes (checks, shards, card layout)


def _record_files(source: DataSource) -> list[str]:
    """The files whose bytes are the source's records (and its media tar), as URIs."""
    uris = [source.json_path] if source.json_path else []
    if source.media_root and source.media_root.endswith(".tar"):  # a media folder is known by its URI only
        uris.append(source.media_root)
    uri = source.dataset_uri or ""
    if uri.startswith("hf://datasets/") and os.environ.get("ONEVISION_DATASET_MIRROR"):
        uri = storage.join(os.environ["ONEVISION_DATASET_MIRROR"], uri.removeprefix("hf://datasets/"))
    if uri and not uri.startswith(("synthetic://", "hf://")):
        uris += [uri] if uri.endswith(".parquet") else [u for u in storage.list_uris(uri) if u.endswith(".parquet")]
    return uris


def fingerprint(source: DataSource) -> list[dict[str, Any]]:
    """[{uri, size, etag | mtime_ns}] of a source's record files; {uri, missing: true} for an absent one
    (curation then fails naming it)."""
    out = []
    for uri in _record_files(source):
        try:
            out.append({"uri": uri, **storage.stat(uri)})
        except storage.StorageNotFoundError:
            out.append({"uri": uri, "missing": True})
    return out


@dataclass(frozen=True)
class DataRecipe:
    recipe: str  # the recipe's name: the card's title and the first level of the curated prefix
    stage: str
    data: tuple[DataSource, ...]
    curation: CurationSpec
    limits: Limits
    seed: int
    sources: tuple[tuple[dict[str, Any], ...], ...] = ()  # per mixture entry, its record files' identity

    @classmethod
    def of(cls, recipe: Recipe, stage_name: str, fingerprints: bool = True) -> DataRecipe:
        stage = getattr(recipe.stages, stage_name, None)
        if stage is None:
            from components.curate.sources import CurationError

            raise CurationError(f"recipe {recipe.name} has no stage {stage_name!r}")
        return cls(recipe.name, stage_name, tuple(stage.data), recipe.curation,
                   Limits.for_stage(recipe, stage_name), recipe.training.seed,
                   tuple(tuple(fingerprint(s)) for s in stage.data) if fingerprints else ())

    def doc(self) -> dict[str, Any]:
        """The canonical document (JSON types only) that the hash covers."""
        curation = self.curation.model_dump(mode="json")
        curation.pop("workers")  # how fast, not what
        curation.pop("partitions")
        return {"format": CURATION_FORMAT, "recipe": self.recipe, "stage": self.stage,
                "data": [entry.model_dump(mode="json") for entry in self.data], "curation": curation,
                "limits": asdict(self.limits), "seed": self.seed, "sources": [list(s) for s in self.sources]}

    def to_json(self) -> str:
        return json.dumps(self.doc(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DataRecipe:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != CURATION_FORMAT:
            raise ValueError(f"not a data recipe of format {CURATION_FORMAT}: {text[:80]!r}")
        return cls(doc["recipe"], doc["stage"], tuple(DataSource.model_validate(d) for d in doc["data"]),
                   CurationSpec.model_validate(doc["curation"]), Limits(**doc["limits"]), doc["seed"],
                   tuple(tuple(s) for s in doc["sources"]))

    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def curated_uri(self, data_root: str) -> str:
        """Where this data recipe's shards are published: content-addressed, shared by every run."""
        return storage.join(data_root, self.recipe, self.stage, self.hash()[:16])

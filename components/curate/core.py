"""Curate one stage's data mixture into training shards; nothing is lost, everything is counted.

    onevision curate --recipe recipes/tiny.yaml --stage stage2_si --out /tmp/si [--workers 2] [--force]
    python -m components.curate.core ...   # the same (cli.py): an error is one line, exit 2 or 3

    from components.curate.core import DataRecipe, curate_data, curate_stage, run
    summary = curate_stage(load_recipe("recipes/tiny.yaml"), "stage1", out="/tmp/stage1")
    data = DataRecipe.of(load_recipe("recipes/tiny.yaml"), "stage1")    # what the pipeline curates from
    summary = curate_data(data, out=data.curated_uri("s3://onevision/curated"))

Per mixture entry, streamed (memory stays flat in the dataset size): read (sources.py: LLaVA JSON/JSONL
with a media folder or tar, parquet with embedded images, synthetic://shapes), sample by index with the
recipe's `sampling_strategy` (seeded), check each record in worker processes (checks.py: structure,
encoding, media, size, length; classify and normalise prompts), deduplicate in stream order (dedup.py),
optionally re-caption (recaption.py), and write WebDataset shards. Published atomically under `out`:
`shard-*.tar`, `quarantine.jsonl` (every rejected or duplicate record with its reason code and message),
`curation.json` (per-source counts that reconcile: in = kept + duplicates + rejected; per-shard records,
bytes, sha256), `data_card.json` and `data_card.md`, then the manifest last. Same recipe, same bytes,
whatever the worker count: no reason names an object address, a path of this machine or a time.

Reuse (`run`, `run_data`): a prefix that already holds a published stage is returned as it is only when
its card records this stage's data recipe hash (datarecipe.py: the mixture, the curation settings, the
stage's limits, the seed, the record files' identity); anything else is refused (StaleOutputError)
unless `force`, which withdraws the old publish (manifest first) and curates again. The pipeline
curates into the data recipe's content-addressed prefix, so a second run with the same data reuses it.
Work folders (synthetic worlds, staging) are removed on success and on failure unless `keep_work`; S3
sources are streamed, not copied.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.curate import cli
from components.curate.card import CardStats, SourceStats, render_markdown
from components.curate.checks import Verdict
from components.curate.datarecipe import DataRecipe
from components.curate.dedup import Deduplicator
from components.curate.partition import (PartitionReader, partition_range, partition_uri, published_partition,
                                         remove_partition, write_partition)
from components.curate.sources import CurationError, RawRecord, open_source, synthetic_world
from components.curate.stream import apply_sampling, checked_stream, select_indices
from model.shard_writer import write_shards
from onevision import storage
from onevision.recipe import Recipe, load_recipe

__all__ = ["CurationError", "DataRecipe", "DiskFullError", "StaleOutputError", "TooManyRejectedError",
           "apply_sampling", "curate_data", "curate_stage", "run", "run_data", "run_partition", "select_indices",
           "synthetic_world"]


class _Quarantine:
    def __init__(self, path: Path):
        self.stream = open(path, "w", encoding="utf-8")

    def add(self, source: SourceStats, raw: RawRecord, code: str, message: str) -> None:
        source.reasons[code] += 1
        record_id = raw.record.get("id") if isinstance(raw.record, dict) else None
        entry = {"source": source.name, "index": raw.index, "id": record_id, "reason_code": code,
                 "reason": message, "record": raw.record, "raw": raw.raw}
        self.stream.write(json.dumps(entry, default=str, sort_keys=True) + "\n")  # ASCII: lone surrogates escape

    def close(self) -> None:
        self.stream.close()


def _kept_records(data: DataRecipe, work: Path, workers: int, stats: CardStats, quarantine: _Quarantine,
                  recaption_uri: str, partitions: PartitionReader | None = None
                  ) -> Iterator[tuple[dict[str, Any], dict[str, bytes]]]:
    """The stage's kept (record, media) in deterministic order; counts and quarantines the rest. With
    `partitions`, the checked records come from the partition pods instead of being read and checked here:
    the same stream, so deduplication and everything after it see what one pod would."""
    dedup = Deduplicator(data.curation.dedup, data.curation.near_dup_distance)
    for index, entry in enumerate(data.data):
        if partitions is None:
            source = open_source(entry, work, data.seed)
            selected, available = select_indices(entry.sampling_strategy, source.count, data.seed + index)
            counts = SourceStats(source.name, entry.sampling_strategy, available)
            checked = checked_stream(source, selected, data.limits, workers, on_record=counts.count_in)
        else:
            name, available = partitions.source(index)
            counts = SourceStats(name, entry.sampling_strategy, available)
            checked = partitions.checked(index, work, on_record=counts.count_in)
        stats.sources.append(counts)
        kept = _deduplicated(checked, counts, dedup, stats, quarantine)
        if entry.recaption is not None:
            from components.curate.recaption import recaption

            kept = recaption(kept, entry.recaption, storage.join(recaption_uri, f"source-{index}"))
        yield from kept


def _deduplicated(checked: Iterator[tuple[tuple[RawRecord, dict], Verdict]], counts: SourceStats,
                  dedup: Deduplicator, stats: CardStats, quarantine: _Quarantine
                  ) -> Iterator[tuple[dict[str, Any], dict[str, bytes]]]:
    for (raw, media), verdict in checked:
        if verdict.reason_code is not None:
            counts.rejected += 1
            quarantine.add(counts, raw, verdict.reason_code, verdict.reason or "")
            continue
        hit = dedup.check(verdict, f"{counts.name}#{raw.index}")
        if hit is not None:
            counts.duplicates += 1
            quarantine.add(counts, raw, *hit)
            continue
        stats.add_kept(verdict, counts)
        record = verdict.record
        record["meta"]["source"] = counts.name
        yield record, media


class StaleOutputError(CurationError):
    """`out` already holds a stage curated from another data recipe (or another stage)."""


class TooManyRejectedError(CurationError):
    """A source rejected more than `curation.max_rejected_fraction` of its records: the stage is not
    published (no manifest), its quarantine is, for inspection."""


DEDUP_CODES = ("duplicate", "near_duplicate")  # a repeated record is not a bad one


def _refuse_rejections(stats: CardStats, data: DataRecipe, staging: Path, out: str) -> None:
    """Per source, rejected / records in against the threshold. Over it: publish the quarantine alone
    (beside no manifest, so no reader takes the prefix for a stage) and raise, naming every such source
    with its top three rejection reasons."""
    limit = data.curation.max_rejected_fraction
    over = [s for s in stats.sources if s.records_in and s.rejected / s.records_in > limit]
    if not over:
        return
    quarantine = storage.join(out, "quarantine.jsonl")
    storage.put_file(staging / "quarantine.jsonl", quarantine)
    named = []
    for source in over:
        reasons = sorted(((n, code) for code, n in source.reasons.items() if code not in DEDUP_CODES),
                         key=lambda item: (-item[0], item[1]))[:3]
        named.append(f"{source.name} rejected {source.rejected} of {source.records_in} records "
                     f"({source.rejected / source.records_in:.0%}; top reasons: "
                     f"{', '.join(f'{code} ({n})' for n, code in reasons)})")
    raise TooManyRejectedError(
        f"curation of {data.stage} refused: {'; '.join(named)}; above curation.max_rejected_fraction {limit:g}. "
        f"The stage was not published; its quarantine is at {quarantine}")


class DiskFullError(OSError):
    """Curation ran out of disk (ENOSPC/EDQUOT); the message names the path, and nothing was published."""


def _withdraw(staging: Path, out: str) -> None:
    """Best effort: remove what a failed publish of `staging` may have put under `out` (its manifest is
    already gone), so that no shard lies there for a reader that does not check manifests."""
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        try:
            storage.delete(storage.join(out, path.relative_to(staging).as_posix()))
        except (OSError, storage.StorageError):
            pass


def _shard_table(staging: Path) -> list[dict[str, Any]]:
    """Per shard: records (counted from the index write_shards wrote, not by scanning the tar again), bytes, sha256."""
    from collections import Counter

    from model.shard_index import INDEX_NAME, read_index

    records = Counter(read_index(staging / INDEX_NAME).column("shard").to_pylist())
    return [{"name": shard.name, "records": records[shard.name], "bytes": shard.stat().st_size,
             "sha256": storage.sha256_file(shard)} for shard in sorted(staging.glob("shard-*.tar"))]


def curate_stage(recipe: Recipe, stage_name: str, out: str, work_dir: str | None = None,
                 workers: int | None = None, keep_work: bool = False) -> dict[str, Any]:
    """curate_data for a stage of a recipe (its record files fingerprinted now)."""
    return curate_data(DataRecipe.of(recipe, stage_name), out, work_dir, workers, keep_work)


def curate_data(data: DataRecipe, out: str, work_dir: str | None = None, workers: int | None = None,
                keep_work: bool = False, partitions: PartitionReader | None = None) -> dict[str, Any]:
    """Build and publish one stage's shards under `out`; returns the summary (also in curation.json).

    `workers`: check processes (default: the recipe's `curation.workers`; 0 = one per core).
    `work_dir` (default: a new temporary folder) holds generated synthetic worlds and the staging copy;
    what this call put there is removed when it returns or fails, unless `keep_work`.
    `partitions`: merge what partition pods checked (partition.py) instead of reading the sources."""
    with _work_folders(data, work_dir, keep_work) as (work, staging):
        summary = _curate_into(data, out, work, staging, _workers(data, workers), partitions)
        return {**summary, "work_dir": str(work)} if keep_work else summary


def _workers(data: DataRecipe, workers: int | None) -> int:
    workers = data.curation.workers if workers is None else workers
    return workers or os.cpu_count() or 1


@contextmanager
def _work_folders(data: DataRecipe, work_dir: str | None, keep_work: bool) -> Iterator[tuple[Path, Path]]:
    """(work, staging): `work_dir` or a new temporary folder, and a fresh staging folder in it (never a
    previous run's files); what this call created is removed on exit unless `keep_work`."""
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=f"curate-{data.stage}-"))
    work.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"publish-{data.stage}-", dir=work))
    try:
        yield work, staging
    finally:
        if not keep_work:
            shutil.rmtree(work if not work_dir else staging, ignore_errors=True)


def _curate_into(data: DataRecipe, out: str, work: Path, staging: Path, workers: int,
                 partitions: PartitionReader | None = None) -> dict[str, Any]:
    stage_name = data.stage
    stats = CardStats()
    quarantine = _Quarantine(staging / "quarantine.jsonl")
    started = time.perf_counter()

    publishing = False
    try:
        try:
            kept = _kept_records(data, work, workers, stats, quarantine, f"{out.rstrip('/')}-recaption", partitions)
            write_shards(kept, staging, max_per_shard=data.curation.shard_max_records,
                         max_bytes=data.curation.shard_max_bytes)
        finally:
            quarantine.close()
        _refuse_rejections(stats, data, staging, out)
        card = stats.card(stage_name, data.recipe, data.hash(), _shard_table(staging))
        for source in card["sources"]:  # the invariant the quarantine promises; a bug here must not publish
            if source["records_in"] != source["kept"] + source["duplicates"] + source["rejected"]:
                raise RuntimeError(f"curation counts do not reconcile for {source['source']}: {source}")
        (staging / "curation.json").write_text(json.dumps(card, indent=1, sort_keys=True))
        (staging / "data_card.json").write_text(json.dumps(card, indent=1, sort_keys=True))
        (staging / "data_card.md").write_text(render_markdown(card))
        publishing = True
        storage.publish_dir(staging, out, metadata=dict(card["totals"], stage=stage_name))
        seconds = time.perf_counter() - started  # the whole stage: read, check, write, card, publish
    except BaseException as err:
        # a failed attempt leaves nothing behind: its staged shards would keep a full disk full for the retry
        if publishing and isinstance(err, OSError):
            _withdraw(staging, out)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            where = err.filename or staging
            raise DiskFullError(err.errno, f"curation of {stage_name}: disk full ({err.strerror}) while writing "
                                           f"{where}; nothing was published at {out}. Free space or point "
                                           f"work_dir/out at a larger volume, then run again") from err
        raise
    records_in = card["totals"]["records_in"]
    return {**card, "uri": out, "seconds": seconds, "records_per_s": records_in / seconds if seconds else 0.0,
            "workers": workers, "card_markdown": render_markdown(card)}


def published_summary(out_uri: str) -> dict[str, Any] | None:
    """The summary of shards already published at `out_uri` (read from their data card), else None."""
    try:
        storage.read_manifest(out_uri)
    except storage.ManifestMissingError:
        return None
    card = json.loads(storage.read_bytes(storage.join(out_uri, "curation.json")))
    return {**card, **card["totals"], "uri": out_uri, "seconds": 0.0, "records_per_s": 0.0, "workers": 0,
            "card_markdown": storage.read_bytes(storage.join(out_uri, "data_card.md")).decode(),
            "manifest_sha256": storage.manifest_hash(out_uri)}


def _unpublish(out_uri: str) -> None:
    """Withdraw a published stage: the manifest first (from then on it is not complete for any reader),
    then the files it listed, then the re-captioning progress that belonged to it."""
    storage.unpublish_dir(out_uri)
    for uri in storage.list_uris(f"{out_uri.rstrip('/')}-recaption"):
        storage.delete(uri)


def run(recipe_uri: str, stage: str, out_uri: str, workers: int | None = None,
        mlflow_parent: str | None = None, work_dir: str | None = None, force: bool = False,
        keep_work: bool = False, partitions: int = 1) -> dict[str, Any]:
    """`onevision curate`: run_data for `stage` of the recipe at `recipe_uri` (path or s3://); with
    `partitions` > 1, merging the partitions run_partition published for it."""
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", out_uri)
    if scheme and scheme.group(1) != "s3":
        raise CurationError(f"{out_uri}: curation publishes to a local path or s3://bucket/prefix, "
                            f"not {scheme.group(1)}://")
    uris = [partition_uri(out_uri, p, partitions) for p in range(partitions)] if partitions > 1 else []
    return run_data(DataRecipe.of(load_recipe(recipe_uri), stage), out_uri, workers, mlflow_parent, work_dir,
                    force, keep_work, uris)


def run_data(data: DataRecipe, out_uri: str, workers: int | None = None, mlflow_parent: str | None = None,
             work_dir: str | None = None, force: bool = False, keep_work: bool = False,
             partition_uris: Sequence[str] = ()) -> dict[str, Any]:
    """The pipeline step's core: curate `data` into `out_uri` (`reused` in the result says whether it did).

    A stage already published at `out_uri` from the same data recipe is returned as it is (a resumed or
    retried run, or another run with the same data, curates nothing twice); from another one,
    StaleOutputError, or with `force` it is withdrawn and curated again. With `partition_uris` (every
    partition run_partition published for this stage), merges them instead of reading the sources, then
    removes them. With `mlflow_parent`, logs counts, throughput and the data card (JSON + Markdown) to a
    nested run `curate_<stage>` under that pipeline run.
    """
    published = _published_for(data, out_uri, force)
    if published is not None:
        for uri in partition_uris:  # a merge retried after it published: the partitions are spent
            remove_partition(uri)
        return {**published, "reused": True}
    partitions = PartitionReader(list(partition_uris), data.hash(), len(data.data)) if partition_uris else None
    if not mlflow_parent:
        summary = curate_data(data, out_uri, work_dir, workers, keep_work, partitions)
    else:
        import mlflow

        from onevision import tracking

        with tracking.step_run(f"curate_{data.stage}", mlflow_parent, params={"out_uri": out_uri}):
            summary = curate_data(data, out_uri, work_dir, workers, keep_work, partitions)
            mlflow.log_metrics({**summary["totals"], "records_per_s": summary["records_per_s"]})
            card = {k: v for k, v in summary.items() if k not in ("card_markdown", "seconds", "records_per_s", "workers", "uri")}
            mlflow.log_dict(card, "data_card.json")
            mlflow.log_text(summary["card_markdown"], "data_card.md")
    if partitions is not None:
        partitions.remove()
    summary.update(summary["totals"], manifest_sha256=storage.manifest_hash(out_uri), reused=False,
                   partitions=len(partition_uris) or 1)
    return summary


def _published_for(data: DataRecipe, out_uri: str, force: bool) -> dict[str, Any] | None:
    """The summary of the stage published at `out_uri` when it is this data recipe's; None when there is
    none (or `force` withdrew another's); StaleOutputError when another data recipe's is there."""
    expected, stage = data.hash(), data.stage
    published = published_summary(out_uri)
    if published is None:
        return None
    recorded = (published.get("stage"), published.get("data_recipe_hash"))
    if recorded == (stage, expected):
        return published
    if not force:
        held = (f"{recorded[0]} curated from data recipe {recorded[1][:12]}" if recorded[1]
                else f"{recorded[0]} with no data recipe hash (curated by an older version)")
        raise StaleOutputError(
            f"{out_uri} already holds {held}, not {stage} of recipe {data.recipe} (data recipe "
            f"{expected[:12]}): curate into another --out, or pass --force to replace it")
    _unpublish(out_uri)
    return None


def run_partition(data: DataRecipe, out_uri: str, partition: int, partitions: int, workers: int | None = None,
                  work_dir: str | None = None) -> dict[str, Any]:
    """One partition pod: check partition `partition` of `partitions` of every source and publish it at
    partition_uri(out_uri, ...) for run_data's merge. Nothing to do (`reused`) when the stage or this
    partition is already published for this data recipe; StaleOutputError as run_data."""
    uri = partition_uri(out_uri, partition, partitions)
    partition_range(0, partition, partitions)  # a bad index fails before any source is opened
    if _published_for(data, out_uri, force=False) is not None or published_partition(uri, data.hash()) is not None:
        return {"partition_uri": uri, "records": 0, "reused": True}
    with _work_folders(data, work_dir, keep_work=False) as (work, staging):
        sources = []
        for index, entry in enumerate(data.data):
            source = open_source(entry, work, data.seed)
            selected, available = select_indices(entry.sampling_strategy, source.count, data.seed + index)
            sources.append((source, entry.sampling_strategy, selected, available))
        doc = write_partition(sources, data.limits, partition, partitions, _workers(data, workers), staging, data.hash())
        storage.publish_dir(staging, uri, metadata={"stage": data.stage, "partition": partition,
                                                   "partitions": partitions})
    return {"partition_uri": uri, "records": sum(s["records"] for s in doc["sources"]), "reused": False}


def command(args: argparse.Namespace) -> int:
    """Curate as `args` say and print what was published; an error: one line on stderr, exit 2 or 3."""
    from onevision.recipe import RecipeError

    try:
        if args.partition is not None:
            part = run_partition(DataRecipe.of(load_recipe(args.recipe), args.stage), args.out, *args.partition,
                                 workers=args.workers, work_dir=args.work_dir)
            done = "already published" if part["reused"] else f"{part['records']} records checked"
            print(f"{args.stage} partition {args.partition[0]}/{args.partition[1]}: {done}")
            print(f"published  {part['partition_uri']}")
            return 0
        summary = run(args.recipe, args.stage, args.out, workers=args.workers, force=args.force,
                      keep_work=args.keep_work, work_dir=args.work_dir, partitions=args.partitions)
    except (TooManyRejectedError, StaleOutputError) as err:
        return cli.fail(err, cli.EXIT_REFUSED)
    except (CurationError, RecipeError, storage.StorageError, OSError) as err:  # DiskFullError is an OSError
        return cli.fail(err, cli.EXIT_BAD_INPUT)
    t = summary["totals"]
    print(f"{args.stage}: {t['records_in']} in, {t['kept']} kept, {t['duplicates']} duplicates, "
          f"{t['rejected']} rejected ({len(summary['shards'])} shard(s))")
    print(f"published  {summary['uri']}  manifest sha256 {summary['manifest_sha256'][:12]}")
    print(f"data card  {storage.join(summary['uri'], 'data_card.md')}")
    if summary.get("work_dir"):
        print(f"work kept  {summary['work_dir']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m components.curate.core`: the same arguments and answers as `onevision curate`."""
    parser = argparse.ArgumentParser(prog="python -m components.curate.core",
                                     description="Curate one stage's data mixture into published shards.")
    return command(cli.add_arguments(parser).parse_args(argv))


if __name__ == "__main__":  # spawned check workers import this module as __mp_main__: nothing runs there
    sys.exit(main())

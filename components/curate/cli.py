"""The curate command line's arguments and exit codes, shared by `onevision curate` and
`python -m components.curate.core` (core.command runs it).

    python -m components.curate.core --recipe recipes/tiny.yaml --stage stage2_si --out /tmp/si [--workers 2]
    python -m components.curate.core ... --partition 1/3     # one partition pod's share (partition.py)
    python -m components.curate.core ... --partitions 3      # the merge, after partitions 0/3, 1/3, 2/3

An error is one line on stderr, never a traceback, with the exit status saying which kind:
  2  bad input: a recipe that does not validate, a source that cannot be read (missing file, JSON that is
     not a list of records, truncated parquet, bad tar), an out URI it cannot publish to, a storage error
  3  refused by a check: a source rejected more than `curation.max_rejected_fraction` of its records (its
     quarantine is published, the stage is not), or `--out` holds a stage of another data recipe
Light on purpose (argparse only at import): `onevision` builds its parser from it for every command.
"""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT, EXIT_REFUSED = 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from onevision.recipe import STAGE_NAMES

    parser.add_argument("--recipe", required=True, help="recipe YAML, local path or s3://")
    parser.add_argument("--stage", required=True, choices=STAGE_NAMES)
    parser.add_argument("--out", required=True, help="where the shards are published (path or s3://)")
    parser.add_argument("--workers", type=int, default=None, help="check processes (default: recipe; 0 = cores)")
    parser.add_argument("--force", action="store_true",
                        help="replace a stage already published at --out from another data recipe")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (synthetic worlds, staging)")
    fan_out = parser.add_mutually_exclusive_group()
    fan_out.add_argument("--partition", type=partition_arg, default=None, metavar="P/N",
                         help="check only partition P of N of every source and publish it beside --out "
                              "(one pod of a fanned-out curation)")
    fan_out.add_argument("--partitions", type=partition_count, default=1, metavar="N",
                         help="merge the N published partitions into the stage (after every --partition P/N)")
    return parser


def partition_count(text: str) -> int:
    """`N` >= 1 (1: no partitions to merge, the stage is curated here)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a partition count (a whole number >= 1)")
    return n


def partition_arg(text: str) -> tuple[int, int]:
    """`P/N` -> (P, N), 0 <= P < N."""
    try:
        p, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not P/N (e.g. 0/4)") from None
    if not 0 <= p < n:
        raise argparse.ArgumentTypeError(f"{text!r}: P must be 0..N-1")
    return p, n


def fail(err: BaseException, code: int) -> int:
    """Say `err` on one line of stderr; returns `code`."""
    print(f"curate: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
    return code

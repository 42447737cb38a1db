"""The ``pgreplica dump`` command: its options, and export, ``--verify`` or
``--check-visibility``."""

from __future__ import annotations

import argparse
import logging
import sys

from pgreplica.config import Settings
from pgreplica.dump.check import CheckResult, check_schema, check_visibility
from pgreplica.dump.export import dump
from pgreplica.dump.output import add_output_arguments, output_options
from pgreplica.dump.verify import verify
from pgreplica.dump.visibility import AUTO, FORMATS, Visibility
from pgreplica.errors import ConfigError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pgreplica dump``."""
    parser.add_argument(
        "--config", help="pgreplica TOML file (default: $PGREPLICA_CONFIG or the environment)"
    )
    parser.add_argument("--database", help="configured database to dump (default: the first)")
    parser.add_argument(
        "--visibility", metavar="FILE", help="TOML file classifying every exported column"
    )
    parser.add_argument(
        "--visibility-format",
        choices=FORMATS,
        default=AUTO,
        help="the visibility file's format: crates.io's [TABLE.columns] or pgreplica's "
        "[tables.TABLE] (default: auto, told apart by its shape)",
    )
    parser.add_argument("--out", metavar="DIR|FILE.tar.gz", help="new directory, or a .tar.gz file")
    parser.add_argument(
        "--jobs", type=_positive, default=1, metavar="N", help="parallel connections (1)"
    )
    parser.add_argument(
        "--allow-primary",
        action="store_true",
        help="dump from the primary when no replica is healthy (announced on stderr)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress output (warnings still shown)"
    )
    parser.add_argument(
        "--verify",
        metavar="DIR|FILE.tar.gz",
        help="import a dump into a scratch database on the primary and check it",
    )
    parser.add_argument(
        "--check-visibility",
        action="store_true",
        help="compare the visibility file with the database and name every unclassified "
        "or unknown table and column; exports nothing (exit status 1 on a mismatch)",
    )
    parser.add_argument(
        "--schema",
        metavar="FILE.sql",
        help="with --check-visibility: compare with this schema (pg_dump --schema-only) "
        "instead of a database",
    )
    add_output_arguments(parser)  # --fidelity, --import, --layout, ...


def run(args: argparse.Namespace) -> int:
    """``pgreplica dump``: export, or with ``--verify`` check an export."""
    # The prober logs replicas going down; the dump's own error already says so.
    health = logging.getLogger("pgreplica.health")
    level = health.level
    health.setLevel(logging.ERROR)
    try:
        return _run(args)
    finally:
        health.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    if args.check_visibility:
        return _check(args)
    if args.schema is not None:
        raise ConfigError("--schema", "only with --check-visibility")
    settings = Settings.from_env() if args.config is None else Settings.from_toml(args.config)
    if args.verify is not None:
        if args.out is not None or args.visibility is not None:
            raise ConfigError("--verify", "takes no --out or --visibility")
        verify(args.verify, settings, database=args.database)
        return 0
    for option, value in (("--visibility", args.visibility), ("--out", args.out)):
        if value is None:
            raise ConfigError(option, "required (or --verify DIR to check a dump)")
    dump(
        settings,
        Visibility.load(args.visibility, format=args.visibility_format),
        args.out,
        database=args.database,
        jobs=args.jobs,
        allow_primary=args.allow_primary,
        quiet=args.quiet,
        **output_options(args),
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    """``--check-visibility``: every mismatch on stderr and exit status 1, or one OK line."""
    for option, value in (("--out", args.out), ("--verify", args.verify)):
        if value is not None:
            raise ConfigError(option, "not with --check-visibility, which exports nothing")
    if args.visibility is None:
        raise ConfigError("--visibility", "required: the file --check-visibility checks")
    visibility = Visibility.load(args.visibility, format=args.visibility_format)
    result: CheckResult
    if args.schema is not None:
        for option, given in (
            ("--config", args.config is not None),
            ("--database", args.database is not None),
            ("--allow-primary", args.allow_primary),
        ):
            if given:
                raise ConfigError(option, "not with --schema, which reads no database")
        result = check_schema(visibility, args.schema)
    else:
        settings = Settings.from_env() if args.config is None else Settings.from_toml(args.config)
        result = check_visibility(
            settings,
            visibility,
            database=args.database,
            allow_primary=args.allow_primary,
            stderr=sys.stderr,
        )
    for message in result.warnings:
        print(f"pgreplica: warning: {message}", file=sys.stderr)
    if not result.ok:
        print(f"pgreplica: {result.report()}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0

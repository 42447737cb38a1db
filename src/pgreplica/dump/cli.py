"""The ``pgreplica dump`` command: its options, and export or ``--verify``."""

from __future__ import annotations

import argparse
import logging

from pgreplica.config import Settings
from pgreplica.dump.export import dump
from pgreplica.dump.verify import verify
from pgreplica.dump.visibility import Visibility
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
        Visibility.load(args.visibility),
        args.out,
        database=args.database,
        jobs=args.jobs,
        allow_primary=args.allow_primary,
        quiet=args.quiet,
    )
    return 0

"""The ``amaters`` command: run and manage a server, and talk to one.

Each command group is a module exposing ``add_commands(subparsers)``, which adds its subcommands,
each storing ``func(args) -> int`` (the exit status) in its defaults.  :data:`GROUPS` lists them;
adding a group is one line there.  Every failure prints one clear line on stderr and exits
non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from amaters.cli.client import client_options
from amaters.cli.common import EXIT_FAIL, EXIT_USAGE, err
from amaters.config import ConfigError

#: The command groups, in the order their commands appear in ``amaters --help``.  Each module has
#: ``add_commands(subparsers)``; they are imported when the parser is built.
GROUPS: tuple[str, ...] = (
    "amaters.cli.server",  # version, validate-config, start, stop, reload, status
    "amaters.cli.admin",  # admin ...
    "amaters.cli.client",  # set, get, delete, range, collections, info, ping, keygen
    "amaters.cli.fhe",  # fhe keygen|upload, filter, update; set/get with --fhe-keys
    "amaters.cli.auth",  # auth new-key, auth hash-key
    "amaters.cli.snapshot",  # snapshot ..., migrate
    "amaters.cli.cluster",  # cluster status|nodes|shards|add-shard|move|snapshot
)


def build_parser(groups: Sequence[str] = GROUPS) -> argparse.ArgumentParser:
    """The ``amaters`` argument parser with every group's commands."""
    parser = argparse.ArgumentParser(
        prog="amaters",
        description="amaters encrypted key-value database: server and client.",
        # The connection options are also accepted before the command (``amaters --ca F get ...``).
        parents=[client_options()],
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in groups:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``amaters`` command; returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Any = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(func(args))
    except ConfigError as e:
        for problem in e.problems:
            err(f"config: {problem}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_FAIL
    except OSError as e:
        err(str(e))
        return EXIT_FAIL


__all__ = ["GROUPS", "build_parser", "main"]

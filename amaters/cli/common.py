"""What every command group of the ``amaters`` command shares: exit statuses, one-line errors, the
``--config``/``--set`` options and loading the configuration they name."""

from __future__ import annotations

import argparse
import os
import re
import sys

from amaters.compose import load_server_config
from amaters.config import Config

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A failure to report on one line of stderr, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.status = status


def err(message: str) -> None:
    """Print ``amaters: message`` on stderr."""
    print(f"amaters: {message}", file=sys.stderr)


def config_options() -> argparse.ArgumentParser:
    """A parent parser with ``--config FILE`` and repeatable ``--set SECTION.KEY=VALUE``."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file")
    parent.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a setting (repeatable)"
    )
    return parent


def load(args: argparse.Namespace) -> Config:
    """The configuration named by ``--config`` and ``--set`` (and the environment); raises ConfigError."""
    return load_server_config(getattr(args, "config", None), getattr(args, "set", None) or [], os.environ)


def endpoint_url(description: str) -> str:
    """``http://host:port`` of a TCP server endpoint string (to reach the ops site from this host).

    A wildcard interface (``0.0.0.0``, ``::``) is reached on 127.0.0.1.  Raises ValueError when the
    description has no TCP port.
    """
    parts = re.split(r"(?<!\\):", description)
    port = next((p for p in parts[1:] if p.isdigit()), None)
    host = "127.0.0.1"
    for p in parts[1:]:
        if p.startswith("interface="):
            host = p.split("=", 1)[1].replace("\\", "") or host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    if port is None:
        raise ValueError(f"cannot reach {description!r}: no TCP port")
    return f"http://{host}:{port}"

"""twistd entry point: ``Options`` parses and validates, ``makeService`` asks the composition root
(:mod:`amaters.compose`) for the service tree.

``makeService`` does no I/O: binding ports, opening storage and generating TLS files all happen when
the services start.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import service
from twisted.python import usage

from amaters import __version__
from amaters.compose import AmatersService, build_service, load_server_config
from amaters.config import Config, ConfigError, Sources


class Options(usage.Options):
    """``twistd amaters [--config FILE] [--set section.key=value ...]``."""

    synopsis = "[--config FILE] [--set section.key=value ...]"
    longdesc = (
        "Run the amaters encrypted key-value server. Settings come from built-in defaults, the TOML"
        " file, AMATERS_<SECTION>__<KEY> environment variables and --set, in that order."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.overrides: list[str] = []
        self.config: Config | None = None
        self.sources: Sources | None = None

    def opt_set(self, value: str) -> None:
        """Override one setting: section.key=value (repeatable)."""
        self.overrides.append(value)

    opt_s = opt_set

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"amaters {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        self.sources = Sources(self["config"], tuple(self.overrides), None)
        try:
            self.config = load_server_config(self["config"], self.overrides, os.environ)
        except ConfigError as e:
            # Not a UsageError: twistd would print its whole usage text before the problems.
            print("amaters: invalid configuration:", file=sys.stderr)
            for problem in e.problems:
                print(f"  {problem}", file=sys.stderr)
            raise SystemExit(2) from None


def makeService(options: Options, reactor: Any = None) -> service.IService:
    """twistd's hook: the service tree for the parsed options (built by :mod:`amaters.compose`)."""
    assert options.config is not None, "postOptions validates the config"
    root = build_service(options.config, reactor, options.sources)
    root.exit_on_failure = True
    return root


__all__ = ["AmatersService", "Options", "build_service", "makeService"]

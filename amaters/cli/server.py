"""The ``amaters`` command: run and manage a server, and talk to one.

Server management: ``start``, ``stop``, ``status``, ``version``, ``validate-config``.  Client commands
(``get``, ``set``, ``range``, ...) live in :mod:`amaters.client_cli`.  Every failure prints one clear
line on stderr and exits non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from amaters import PROTOCOL_VERSION, __version__
from amaters.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, config_options, endpoint_url, err, load
from amaters.config import Config, ConfigError, load_config, to_dict

TWISTD = "from twisted.scripts.twistd import run; run()"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return False
    except OSError:
        pass
    return True


def _probe_ready(config: Config, timeout: float = 2.0) -> tuple[bool, str]:
    if not config.web.enabled:
        return False, "ops site disabled (web.enabled = false)"
    try:
        url = endpoint_url(config.web.listen) + "/readyz"
    except ValueError as e:
        return False, str(e)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"{url} answered {response.status}"
    except urllib.error.HTTPError as e:
        return False, f"{url} answered {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return False, f"{url} unreachable ({reason})"


# -- commands --------------------------------------------------------------------------------


def cmd_version(args: argparse.Namespace) -> int:
    print(f"amaters {__version__}")
    if args.verbose:
        import twisted

        print(f"protocol {'.'.join(map(str, PROTOCOL_VERSION))}")
        print(f"python {sys.version.split()[0]}")
        print(f"twisted {twisted.__version__}")
        try:
            import rocksdict

            print(f"rocksdict {getattr(rocksdict, '__version__', 'installed')}")
        except ImportError:
            print("rocksdict not installed")
    return EXIT_OK


def cmd_validate_config(args: argparse.Namespace) -> int:
    path = args.file or args.config
    try:
        config = load_config(path, args.set or [], os.environ)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(e.problems)} problem(s) found", file=sys.stderr)
        return EXIT_USAGE
    if args.show:
        print(json.dumps(to_dict(config), indent=2, sort_keys=True))
    else:
        print(f"{path or 'built-in defaults'}: valid")
    return EXIT_OK


def _twistd_args(args: argparse.Namespace, config: Config, foreground: bool) -> list[str]:
    argv = [sys.executable, "-c", TWISTD]
    if foreground:
        argv += ["--nodaemon", "--pidfile", str(config.pid_file)]
    else:
        argv += ["--pidfile", str(config.pid_file), "--logfile", str(config.log_file)]
    if config.logging.format == "json":
        # twistd's own first lines (before our logging service starts) in JSON too.
        argv += ["--logger", "amaters.ops.logging.twistd_json_observer"]
    argv.append("amaters")
    if args.config:
        argv += ["--config", str(Path(args.config).resolve())]
    for item in args.set or []:
        argv += ["--set", item]
    return argv


def cmd_start(args: argparse.Namespace) -> int:
    config = load(args)
    pid = _read_pid(config.pid_file)
    if pid is not None and _alive(pid):
        err(f"already running (pid {pid}, pid file {config.pid_file})")
        return EXIT_FAIL
    if pid is not None:
        config.pid_file.unlink(missing_ok=True)  # stale
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.pid_file.parent.mkdir(parents=True, exist_ok=True)
    argv = _twistd_args(args, config, args.foreground)
    if args.foreground:
        os.execv(sys.executable, argv)
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        err("failed to start: " + (" | ".join(message[-5:]) or f"twistd exit {result.returncode}"))
        return EXIT_FAIL
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        pid = _read_pid(config.pid_file)
        if pid is not None and not _alive(pid):
            err(f"server exited during start; see {config.log_file}")
            return EXIT_FAIL
        ready, _ = _probe_ready(config, timeout=1.0)
        if ready:
            print(f"amaters started (pid {pid}), log {config.log_file}")
            return EXIT_OK
        time.sleep(0.2)
    pid = _read_pid(config.pid_file)
    if pid is not None and _alive(pid):
        print(f"amaters started (pid {pid}) but not ready after {args.wait:g}s; see {config.log_file}")
        return EXIT_OK
    err(f"server did not start; see {config.log_file}")
    return EXIT_FAIL


def cmd_stop(args: argparse.Namespace) -> int:
    config = load(args)
    pid = _read_pid(config.pid_file)
    if pid is None or not _alive(pid):
        print("amaters is not running")
        return EXIT_OK
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            print(f"amaters stopped (pid {pid})")
            return EXIT_OK
        time.sleep(0.1)
    if args.force:
        os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
        config.pid_file.unlink(missing_ok=True)
        print(f"amaters killed (pid {pid}) after {args.timeout:g}s")
        return EXIT_OK
    err(f"pid {pid} still running after {args.timeout:g}s (use --force to kill it)")
    return EXIT_FAIL


def cmd_status(args: argparse.Namespace) -> int:
    config = load(args)
    pid = _read_pid(config.pid_file)
    running = pid is not None and _alive(pid)
    if running:
        ready, detail = _probe_ready(config)
    else:
        # No live pid file (e.g. started with twistd directly): the ops site still tells.
        ready, detail = _probe_ready(config, timeout=1.0)
        if ready:
            running, pid = True, None
            detail += f" (no live pid in {config.pid_file}: not started by `amaters start`)"
        else:
            detail = "not running"
    if args.format == "json":
        print(json.dumps({"running": running, "pid": pid, "ready": ready, "detail": detail}))
    elif running:
        shown = f"pid {pid}" if pid is not None else "pid unknown"
        print(f"amaters running ({shown}); {'ready' if ready else 'not ready'}: {detail}")
    else:
        print("amaters is not running")
    return EXIT_OK if running and ready else EXIT_FAIL


def cmd_reload(args: argparse.Namespace) -> int:
    config = load(args)
    pid = _read_pid(config.pid_file)
    if pid is None or not _alive(pid):
        err(f"not running (no live pid in {config.pid_file})")
        return EXIT_FAIL
    os.kill(pid, signal.SIGHUP)
    print(f"reload requested (SIGHUP to pid {pid}); the server logs what changed or why it refused")
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------


def add_commands(subparsers: Any) -> None:
    """Add ``version``, ``validate-config``, ``start``, ``stop``, ``reload`` and ``status``."""
    config_opts = config_options()

    p = subparsers.add_parser("version", help="print the version")
    p.add_argument("-v", "--verbose", action="store_true", help="also print component versions")
    p.set_defaults(func=cmd_version)

    p = subparsers.add_parser("validate-config", parents=[config_opts], help="check a configuration file")
    p.add_argument("file", nargs="?", help="TOML configuration file (default: --config or built-ins)")
    p.add_argument("--show", action="store_true", help="print the effective configuration (secrets redacted)")
    p.set_defaults(func=cmd_validate_config)

    p = subparsers.add_parser(
        "start", parents=[config_opts], help="start the server (daemonized unless --foreground)"
    )
    p.add_argument("--foreground", action="store_true", help="run in the foreground (logs to stdout)")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for readiness")
    p.set_defaults(func=cmd_start)

    p = subparsers.add_parser("stop", parents=[config_opts], help="stop the server (SIGTERM, then wait)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to exit")
    p.add_argument("--force", action="store_true", help="SIGKILL it after the timeout")
    p.set_defaults(func=cmd_stop)

    p = subparsers.add_parser("reload", parents=[config_opts], help="re-read the configuration (SIGHUP)")
    p.set_defaults(func=cmd_reload)

    p = subparsers.add_parser("status", parents=[config_opts], help="is the server running and ready?")
    p.add_argument("--format", choices=["human", "json"], default="human")
    p.set_defaults(func=cmd_status)

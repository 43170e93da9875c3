"""Server management commands: ``version``, ``validate-config``, ``start``, ``stop``, ``reload``,
``status``.

How these commands find the server:

- ``start`` launches ``twistd amaters`` daemonized (pid file and log file from the configuration),
  giving it a fresh instance id; it reports success only when ``/readyz`` on the ops site answers
  ready *with that id*, and a failure as soon as the daemon's pid is gone, with the last error line
  of the log.  It remembers what it started (pid file, log file, ops site, configuration) in a small
  state file for the working directory (under ``$XDG_STATE_HOME/amaters``, by default
  ``~/.local/state/amaters``).
- ``stop``, ``status`` and ``reload`` with ``--config`` or ``--set`` use that configuration.
  Without either they act on the server ``start`` last started from the same working directory
  while it runs, and otherwise use the built-in defaults (and ``AMATERS_*`` variables).
- A server started some other way (``twistd -n amaters``) has no pid file; ``/readyz`` reports its
  pid, which ``status`` shows and ``stop`` and ``reload`` signal when it is a local amaters process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import attrs

from amaters import PROTOCOL_VERSION, __version__
from amaters.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, config_options, endpoint_url, err, load
from amaters.config import Config, config_problems, read_config, to_dict
from amaters.ops.identity import INSTANCE_ENV
from amaters.ops.logging import TWISTD_LOG_FILE_ENV

TWISTD = "from twisted.scripts.twistd import run; run()"

#: How often ``start`` and ``stop`` look at the process and the probe while waiting.
POLL_SECONDS = 0.1


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


def _command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _runs_config(pid: int, config: str | None) -> bool:
    """Whether local process ``pid`` is an amaters server run with the configuration file ``config``
    (None: with no configuration file, from this working directory, as the built-in defaults are
    relative to it).

    Only such a process is signalled when it was found through ``/readyz`` (it has no pid file):
    an amaters server of someone else that happens to answer on the same port is left alone.
    """
    args = _command_line(pid)
    if "amaters" not in args:
        return False
    options = args[args.index("amaters") + 1 :]  # twistd's plugin options
    files = [Path(arg.split("=", 1)[-1]).resolve() for arg in options if arg.endswith(".toml")]
    if config is not None:
        return Path(config).resolve() in files
    try:
        same_directory = Path(f"/proc/{pid}/cwd").resolve() == Path.cwd().resolve()
    except OSError:
        return False
    return same_directory and not files and not any(arg.startswith(("--config", "-c")) for arg in options)


# -- the ops site ------------------------------------------------------------------------------


@attrs.frozen
class Probe:
    """What ``/readyz`` answered: HTTP status (None: no answer), the JSON body, and a description."""

    status: int | None
    body: dict[str, Any]
    detail: str

    @property
    def ready(self) -> bool:
        return self.status == 200

    @property
    def pid(self) -> int | None:
        pid = self.body.get("pid")
        return pid if isinstance(pid, int) else None

    @property
    def instance(self) -> str | None:
        instance = self.body.get("instance")
        return instance if isinstance(instance, str) else None


def _probe(url: str | None, timeout: float = 2.0) -> Probe:
    if url is None:
        return Probe(None, {}, "ops site disabled (web.enabled = false)")
    url = url + "/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return Probe(None, {}, f"{url} unreachable ({getattr(e, 'reason', e)})")
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return Probe(None, {}, f"{url} answered {status}, not an amaters server")
    reason = body.get("reason")
    return Probe(status, body, f"{url} answered {status}" + (f" ({reason})" if reason else ""))


def _ops_url(config: Config) -> str | None:
    if not config.web.enabled:
        return None
    try:
        return endpoint_url(config.web.listen)
    except ValueError:
        return None


# -- which server ------------------------------------------------------------------------------


@attrs.frozen
class Target:
    """Where a server's pid file, log file and ops site are, and how it was configured."""

    pid_file: Path
    log_file: Path
    url: str | None
    config: str | None = None
    sets: tuple[str, ...] = ()
    #: How it was found, for messages ("" when from this command's own options).
    via: str = ""

    @classmethod
    def of(cls, config: Config, args: argparse.Namespace) -> Target:
        return cls(
            config.pid_file.resolve(),
            config.log_file.resolve(),
            _ops_url(config),
            str(Path(args.config).resolve()) if getattr(args, "config", None) else None,
            tuple(getattr(args, "set", None) or ()),
        )

    def describe(self) -> str:
        """How to name this configuration to the operator."""
        parts = [f"--config {self.config}"] if self.config else []
        parts += [f"--set {item}" for item in self.sets]
        return " ".join(parts) or "the built-in defaults"


def _state_file(cwd: Path | None = None) -> Path:
    """Where ``start`` records the server it started from ``cwd`` (one file per directory)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    directory = str((cwd or Path.cwd()).resolve())
    return Path(base) / "amaters" / f"started-{hashlib.sha256(directory.encode()).hexdigest()[:16]}.json"


def _remember(target: Target, pid: int, instance: str) -> None:
    record = {
        "cwd": str(Path.cwd().resolve()),
        "pid_file": str(target.pid_file),
        "log_file": str(target.log_file),
        "url": target.url,
        "config": target.config,
        "sets": list(target.sets),
        "pid": pid,
        "instance": instance,
    }
    path = _state_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        err(f"warning: cannot record the started server in {path}: {e.strerror or e}")


def _remembered() -> Target | None:
    try:
        record = json.loads(_state_file().read_text())
        return Target(
            Path(record["pid_file"]),
            Path(record["log_file"]),
            record.get("url"),
            record.get("config"),
            tuple(record.get("sets") or ()),
            via="started here by `amaters start`",
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _target(args: argparse.Namespace) -> Target:
    """The server this command is about (see the module docstring)."""
    own = Target.of(load(args), args)
    if getattr(args, "config", None) or getattr(args, "set", None):
        return own
    # What `start` ran from here knows the server's own settings (its ops site, say), even when
    # its pid file is where the defaults put it.
    remembered = _remembered()
    if remembered is not None:
        pid = _read_pid(remembered.pid_file)
        if pid is not None and _alive(pid):
            return remembered
    return own


def _find_pid(target: Target) -> tuple[int | None, Probe | None, str]:
    """The running server's pid to signal (from the pid file, else from ``/readyz`` when that
    process runs with the same ``--config``), the probe made (if any), and where the pid came from."""
    pid = _read_pid(target.pid_file)
    if pid is not None and _alive(pid):
        return pid, None, f"pid file {target.pid_file}"
    probe = _probe(target.url, timeout=1.0)
    if probe.pid is not None and _alive(probe.pid) and _runs_config(probe.pid, target.config):
        return probe.pid, probe, f"{target.url}/readyz (no live pid in {target.pid_file})"
    return None, probe, ""


def _not_running(target: Target, probe: Probe | None) -> str:
    """Why no server was found (or why the one found is not signalled), and what to try."""
    where = f"no live pid in {target.pid_file}"
    if probe is not None and probe.pid is not None and _alive(probe.pid):
        return (
            f"a server (pid {probe.pid}) answers on {target.url} but has no pid file here ({where}) and"
            f" does not run with {target.describe()}: pass the --config it runs with, or stop it with"
            f" `kill {probe.pid}`"
        )
    if probe is not None:
        if probe.status is not None:
            where += f"; {probe.detail}"
        elif target.url is not None:
            where += f"; nothing answers on {target.url}"
    hint = "" if target.config else "; if it was started with --config, pass the same --config"
    return f"amaters is not running ({where}{hint})"


def _last_error(log_file: Path, offset: int) -> str | None:
    """The last error line the log got after ``offset`` (text or JSON lines), else its last line."""
    try:
        with log_file.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    last = found = None
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        last = line
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("level") in ("error", "critical"):
                found = str(event.get("message", line))
        elif "#error]" in line or "#critical]" in line:
            found = line.split("] ", 1)[-1]
    return found or last


# -- commands --------------------------------------------------------------------------------


def cmd_version(args: argparse.Namespace) -> int:
    print(f"amaters {__version__}")
    if args.verbose:
        import twisted
        from amaters.compiled import MODULES, build_name, compiled_modules

        print(
            f"build {build_name()} ({len(compiled_modules())} of {len(MODULES)} request-path modules compiled)"
        )
        print(f"protocol {'.'.join(map(str, PROTOCOL_VERSION))}")
        print(f"python {sys.version.split()[0]}")
        print(f"twisted {twisted.__version__}")
        try:
            import rocksdict

            print(f"rocksdict {getattr(rocksdict, '__version__', 'installed')}")
        except ImportError:
            print("rocksdict not installed")
    return EXIT_OK


def _tls_problems(config: Config) -> list[str]:
    """Whether the configured certificate, key, client CA and CRL load as the server will load them."""
    tls = config.tls
    if not (tls.enabled and tls.cert and tls.key and Path(tls.cert).is_file() and Path(tls.key).is_file()):
        return []
    from amaters.tls.context import server_tls_options

    # Client-certificate settings without a usable CA are reported by the checks between settings.
    client_auth = tls.client_auth if tls.ca and Path(tls.ca).is_file() else "none"
    try:
        options = server_tls_options(
            tls.cert,
            tls.key,
            client_ca=tls.ca or None,
            client_auth=client_auth,
            crl=tls.crl if tls.crl and Path(tls.crl).is_file() else None,
        )
        options.getContext()
    except OSError as e:
        return [f"tls: cannot read {e.filename}: {e.strerror or e}"]
    except Exception as e:
        return [f"tls.cert/tls.key: cannot be used together: {_tls_reason(e)}"]
    return []


def _tls_reason(e: Exception) -> str:
    from OpenSSL import SSL, crypto

    if isinstance(e, (SSL.Error, crypto.Error)) and e.args and isinstance(e.args[0], list):
        parts = [str(item[2]) for item in e.args[0] if isinstance(item, tuple) and len(item) >= 3]
        if parts:
            return "; ".join(parts)
    return str(e) or type(e).__name__


def validate(path: str | None, sets: list[str]) -> tuple[Config, list[str]]:
    """Every problem of a configuration at once: reading the sources, the checks between settings,
    the TLS files and the authentication material."""
    config, problems = read_config(path, sets, os.environ)
    bad = {problem.split(":", 1)[0] for problem in problems}
    from amaters.compose import SERVER_CHECKS

    for problem in config_problems(config, SERVER_CHECKS) + _tls_problems(config):
        # A setting that could not be read kept its default: checks about it would mislead.
        names = problem.split(":", 1)[0].split("/")
        if problem not in problems and not any(name in bad for name in names):
            problems.append(problem)
    return config, problems


def cmd_validate_config(args: argparse.Namespace) -> int:
    path = args.file or args.config
    config, problems = validate(path, args.set or [])
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
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


def _start_failed(log_file: Path, offset: int, what: str) -> int:
    line = _last_error(log_file, offset)
    err(f"failed to start: {what}" + (f": {line}" if line else "") + f" (log: {log_file})")
    return EXIT_FAIL


def cmd_start(args: argparse.Namespace) -> int:
    config = load(args)
    target = Target.of(config, args)
    pid = _read_pid(config.pid_file)
    if pid is not None and _alive(pid):
        err(f"already running (pid {pid}, pid file {config.pid_file})")
        return EXIT_FAIL
    if pid is not None:
        config.pid_file.unlink(missing_ok=True)  # stale
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.pid_file.parent.mkdir(parents=True, exist_ok=True)
    config.log_file.parent.mkdir(parents=True, exist_ok=True)
    instance = uuid.uuid4().hex
    env = dict(os.environ)
    env[INSTANCE_ENV] = instance
    argv = _twistd_args(args, config, args.foreground)
    if args.foreground:
        env.pop(TWISTD_LOG_FILE_ENV, None)
        os.execve(sys.executable, argv, env)
    if config.logging.format == "json":
        env[TWISTD_LOG_FILE_ENV] = str(config.log_file.resolve())
    try:
        offset = config.log_file.stat().st_size
    except OSError:
        offset = 0
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        err("failed to start: " + (" | ".join(message[-5:]) or f"twistd exit {result.returncode}"))
        return EXIT_FAIL
    # twistd wrote the daemon's pid before its first process exited; twistd removes it on exit.
    pid = _read_pid(config.pid_file)
    if pid is None or not _alive(pid):
        return _start_failed(config.log_file, offset, "the server exited")
    _remember(target, pid, instance)
    if target.url is None:
        print(
            f"amaters started (pid {pid}), log {config.log_file}; readiness not checked (web.enabled = false)"
        )
        return EXIT_OK
    deadline = time.monotonic() + args.wait
    probe = None
    while time.monotonic() < deadline:
        if not _alive(pid):
            return _start_failed(config.log_file, offset, f"the server (pid {pid}) exited")
        probe = _probe(target.url, timeout=1.0)
        if probe.ready and probe.instance == instance:
            print(f"amaters started (pid {pid}), log {config.log_file}")
            return EXIT_OK
        time.sleep(POLL_SECONDS)
    if probe is not None and probe.instance not in (None, instance):
        detail = f"{target.url} is answered by another server (pid {probe.pid})"
    else:
        detail = probe.detail if probe is not None else "no answer"
    err(f"pid {pid} is running but not ready after {args.wait:g}s: {detail}; see {config.log_file}")
    return EXIT_FAIL


def cmd_stop(args: argparse.Namespace) -> int:
    target = _target(args)
    pid, probe, source = _find_pid(target)
    if pid is None:
        if probe is not None and probe.pid is not None and _alive(probe.pid):
            err(_not_running(target, probe))
            return EXIT_FAIL
        print(_not_running(target, probe))
        return EXIT_OK
    if target.via:
        print(f"stopping the server {target.via} ({target.describe()})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            print(f"amaters stopped (pid {pid})")
            return EXIT_OK
        time.sleep(POLL_SECONDS)
    if args.force:
        os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(POLL_SECONDS)
        target.pid_file.unlink(missing_ok=True)
        print(f"amaters killed (pid {pid}) after {args.timeout:g}s")
        return EXIT_OK
    err(f"pid {pid} ({source}) still running after {args.timeout:g}s (use --force to kill it)")
    return EXIT_FAIL


def cmd_status(args: argparse.Namespace) -> int:
    target = _target(args)
    pid = _read_pid(target.pid_file)
    probe = _probe(target.url, timeout=2.0)
    running = pid is not None and _alive(pid)
    if running:
        ready = probe.ready
        detail = probe.detail
        if probe.pid is not None and probe.pid != pid:
            ready = False
            detail = f"{target.url} is answered by another server (pid {probe.pid}), not pid {pid}"
    elif probe.pid is not None and _alive(probe.pid):
        # No live pid file (e.g. started with twistd directly): the ops site tells.
        running, pid, ready = True, probe.pid, probe.ready
        detail = probe.detail + f" (no live pid in {target.pid_file}: not started by `amaters start`)"
    else:
        pid, ready, detail = None, False, _not_running(target, probe)
    if target.via:
        detail += f"; the server {target.via} ({target.describe()})"
    if args.format == "json":
        print(json.dumps({"running": running, "pid": pid, "ready": ready, "detail": detail}))
    elif running:
        print(f"amaters running (pid {pid}); {'ready' if ready else 'not ready'}: {detail}")
    else:
        print(detail)
    return EXIT_OK if running and ready else EXIT_FAIL


def cmd_reload(args: argparse.Namespace) -> int:
    target = _target(args)
    pid, probe, source = _find_pid(target)
    if pid is None:
        err(_not_running(target, probe))
        return EXIT_FAIL
    os.kill(pid, signal.SIGHUP)
    print(
        f"reload requested (SIGHUP to pid {pid}, from {source}); the server logs what changed or why it refused"
    )
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

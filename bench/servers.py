"""Server processes the benchmarks drive: amaters under ``twistd -n``, and the reference server.

Every process is started on 127.0.0.1 on a port below 32768 and must be stopped by its owner
(``with`` blocks do it).  Waiting loops sleep briefly and are bounded by their timeouts.

Profiling: ``AMATERS_BENCH_PROFILE=cprofile`` runs the amaters server under cProfile (the profile is
written to ``<workdir>/server.prof`` when the server stops); ``AMATERS_BENCH_PROFILE=py-spy`` records
a py-spy flame graph (``<workdir>/server-py-spy.svg``) of the whole server life.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

TWISTD = "from twisted.scripts.twistd import run; run()"
#: The directory holding the ``bench`` package (the repository root when run from a checkout).
BENCH_ROOT = str(Path(__file__).resolve().parent.parent)
PROFILE_ENV = "AMATERS_BENCH_PROFILE"
_used_ports: set[int] = set()


def bench_module_argv(module: str, *args: str) -> list[str]:
    """The argv that runs ``python -m <module> <args>`` for a ``bench`` module in a child process.

    The benchmark's servers run in their own work directories, and ``bench`` is not an installed
    package: ``python -m bench.x`` from there finds it only when the caller's working directory or
    ``PYTHONPATH`` happens to hold it.  The child appends :data:`BENCH_ROOT` to its import path
    instead, after the installed packages, so an installed amaters is never shadowed by the
    checkout's (with ``PYTHONPATH`` set, as in development, that still comes first).
    """
    bootstrap = (
        f"import runpy, sys; sys.path.append({BENCH_ROOT!r}); "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", bootstrap, *args]


def free_port() -> int:
    """A TCP port on 127.0.0.1 below 32768 that nothing listens on now (and not handed out before)."""
    for _ in range(500):
        port = random.randint(20000, 32000)
        if port in _used_ports:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _used_ports.add(port)
        return port
    raise RuntimeError("no free port found below 32768")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of a GET (HTTP errors are answers, not exceptions)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once 127.0.0.1:port accepts a TCP connection; raise if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on port {port} after {timeout:g} s")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_toml(settings: Mapping[str, Any]) -> str:
    """A TOML document from dotted keys (``{"server.listen": "..."}``); nested sections allowed."""
    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in settings.items():
        section, _, key = dotted.rpartition(".")
        sections.setdefault(section, {})[key] = value
    lines: list[str] = []
    for section in sorted(sections):
        lines.append(f"[{section}]")
        for key, value in sections[section].items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


class _Process:
    """Common parts: a subprocess with a log file, its psutil handle, stop and kill."""

    name = "process"
    process: subprocess.Popen[bytes] | None = None
    log_path: Path

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def psutil(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def rss_bytes(self) -> int:
        return int(self.psutil().memory_info().rss)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _spawn(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=dict(env or os.environ)
            )

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait (then SIGKILL if it does not exit in time); the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def kill9(self) -> None:
        """SIGKILL now and reap."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class AmatersServer(_Process):
    """``twistd -n amaters --config FILE`` with its own data dir, ports, log and settings.

    ``settings`` are dotted config keys (``{"storage.backend": "memory"}``) written into the TOML
    file.  ``start_seconds`` is how long the last :meth:`start` took until ``/readyz`` said 200.
    """

    name = "amaters"

    def __init__(
        self,
        workdir: Path,
        settings: Mapping[str, Any] | None = None,
        label: str = "amaters",
        pythonpath: Path | None = None,
    ) -> None:
        #: A tree put first on the server's import path (``bench ab``); None: the installed amaters.
        self.pythonpath = pythonpath
        # Absolute: the server runs in its own working directory.
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.label = label
        self.port = free_port()
        self.web_port = free_port()
        self.grpc_port = free_port()
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "server.log"
        self.config_path = self.workdir / "server.toml"
        base: dict[str, Any] = {
            "server.listen": f"tcp:{self.port}:interface=127.0.0.1",
            "server.data_dir": str(self.data_dir),
            "server.shutdown_timeout": 20,
            "web.listen": f"tcp:{self.web_port}:interface=127.0.0.1",
            "grpc.listen": f"tcp:{self.grpc_port}:interface=127.0.0.1",
            "logging.level": "warn",
        }
        base.update(settings or {})
        self.settings = base
        self.config_path.write_text(render_toml(base))
        self.start_seconds: float | None = None
        self._profiler: subprocess.Popen[bytes] | None = None

    @property
    def tls(self) -> bool:
        return bool(self.settings.get("tls.enabled", True))

    @property
    def ca_cert(self) -> str | None:
        return str(self.data_dir / "tls" / "ca.pem") if self.tls else None

    def argv(self) -> list[str]:
        twistd_args = ["-n", "--pidfile=", "amaters", "--config", str(self.config_path)]
        if os.environ.get(PROFILE_ENV, "") == "cprofile":
            return bench_module_argv(
                "bench._profiled_twistd", str(self.workdir / "server.prof"), *twistd_args
            )
        return [sys.executable, "-c", TWISTD, *twistd_args]

    def start(self, timeout: float = 60.0) -> AmatersServer:
        """Start and wait until ``/readyz`` answers 200; sets ``start_seconds``."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("AMATERS_")}
        if self.pythonpath is not None:
            environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.pythonpath), environ.get("PYTHONPATH", "")) if p
            )
        started = time.perf_counter()
        self._spawn(self.argv(), self.workdir, environ)
        self.wait_ready(timeout)
        self.start_seconds = time.perf_counter() - started
        if os.environ.get(PROFILE_ENV, "") == "py-spy" and shutil.which("py-spy"):
            out = self.workdir / f"server-py-spy-{self.pid}.svg"
            self._profiler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(self.pid), "--rate", "200", "--output", str(out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        return self

    def readyz(self) -> int | None:
        try:
            return http_get(f"http://127.0.0.1:{self.web_port}/readyz", timeout=1.0)[0]
        except OSError:
            return None

    def wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with {self.process.returncode}:\n{self.log()[-4000:]}"
                )
            if self.readyz() == 200:
                return
            time.sleep(0.01)
        raise RuntimeError(f"{self.label} not ready after {timeout:g} s:\n{self.log()[-4000:]}")

    def metrics(self) -> str | None:
        """The Prometheus text of ``/metrics``, or None when the server does not serve it."""
        try:
            status, body = http_get(f"http://127.0.0.1:{self.web_port}/metrics", timeout=5.0)
        except OSError:
            return None
        return body.decode(errors="replace") if status == 200 else None

    def _stop_profiler(self) -> None:
        profiler, self._profiler = self._profiler, None
        if profiler is not None and profiler.poll() is None:
            profiler.send_signal(signal.SIGINT)
            try:
                profiler.wait(30)
            except subprocess.TimeoutExpired:
                profiler.kill()
                profiler.wait(5)

    def stop(self, timeout: float = 30.0) -> int | None:
        self._stop_profiler()
        return super().stop(timeout)

    def kill9(self) -> None:
        self._stop_profiler()
        super().kill9()


class ReferenceServer(_Process):
    """:mod:`bench.reference_server`: the minimal Twisted key-value server (see that module)."""

    name = "reference"

    def __init__(self, workdir: Path, tls: bool = True, sync: str | None = None) -> None:
        """``sync`` None keeps the keys in a dict; ``"none"`` or ``"always"`` in RocksDB, with
        the WAL synced before a write's answer for ``"always"``."""
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_dir = self.workdir / "tls"
        self.log_path = self.workdir / "reference.log"
        self.tls = tls
        self.sync = sync
        self.start_seconds: float | None = None

    @property
    def ca_cert(self) -> str | None:
        return str(self.tls_dir / "ca.pem") if self.tls else None

    def start(self, timeout: float = 60.0) -> ReferenceServer:
        argv = bench_module_argv("bench.reference_server", "--port", str(self.port))
        if self.tls:
            argv += ["--tls-dir", str(self.tls_dir)]
        if self.sync is not None:
            argv += ["--rocksdb", str(self.workdir / "rocksdb"), "--sync", self.sync]
        started = time.perf_counter()
        self._spawn(argv, self.workdir)
        assert self.process is not None
        wait_for_port(self.port, self.process, timeout)
        self.start_seconds = time.perf_counter() - started
        return self


class CPUMeter:
    """CPU seconds (user + system, every thread) of a set of processes between two samples."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._processes = []
        for pid in pids:
            try:
                self._processes.append(psutil.Process(pid))
            except psutil.Error:
                pass
        self._start = self._total()
        self._started = time.perf_counter()

    def _total(self) -> float:
        total = 0.0
        for process in self._processes:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def percent(self) -> float:
        """CPU used since construction, in percent of one core."""
        elapsed = time.perf_counter() - self._started
        return 100.0 * (self._total() - self._start) / elapsed if elapsed > 0 else 0.0


class SyscallCounter:
    """Counts a process's fsync/fdatasync system calls with ``perf stat`` tracepoints.

    Independent of what the server reports about itself; background flushes count too, so the
    writes-per-fsync derived from it is a lower bound.  ``available`` is False without perf (or
    without tracepoint access); then :meth:`stop` returns None.
    """

    EVENTS = ("syscalls:sys_enter_fsync", "syscalls:sys_enter_fdatasync")

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self._process: subprocess.Popen[bytes] | None = None
        self.available = shutil.which("perf") is not None

    def start(self) -> None:
        if not self.available:
            return
        self._process = subprocess.Popen(
            [
                "perf",
                "stat",
                "-x",
                ",",
                "-o",
                str(self.out),
                "-e",
                ",".join(self.EVENTS),
                "-p",
                str(self.pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # attach before the load starts
        if self._process.poll() is not None:
            self.available = False
            self._process = None

    def stop(self) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            return None
        total = 0
        found = False
        for line in self.out.read_text(errors="replace").splitlines():
            fields = line.split(",")
            if len(fields) >= 3 and fields[2] in self.EVENTS:
                try:
                    total += int(fields[0])
                    found = True
                except ValueError:
                    return None  # "<not supported>" or "<not counted>"
        return total if found else None


def parse_prometheus(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` for every sample line of a Prometheus text exposition."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.rpartition(" ")
        if not name:
            continue
        try:
            samples[name.strip()] = float(rest)
        except ValueError:
            continue
    return samples


def build_info(text: str) -> dict[str, str]:
    """The labels of ``amaters_build_info`` in a metrics exposition (``version``, ``build``), in
    whatever order they are written; empty when it is not there."""
    found = re.search(r"^amaters_build_info\{([^}]*)\}", text, re.MULTILINE)
    return dict(re.findall(r'(\w+)="([^"]*)"', found.group(1))) if found else {}


def metric_sum(samples: Mapping[str, float], name: str) -> float | None:
    """The sum of every sample of metric ``name`` (over its labels), or None when absent."""
    found = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    return sum(found) if found else None

"""Run a real amaters server as a subprocess (``twistd -n amaters``) for integration tests.

Ports are picked free on 127.0.0.1 below 32768 (the ephemeral range collides with clients).
Waiting helpers block the calling thread with short sleeps; they are bounded by their timeouts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ports import free_port
from prometheus_client.parser import text_string_to_metric_families

TWISTD = "from twisted.scripts.twistd import run; run()"


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the server's /metrics, keyed by (name, sorted labels)."""
    code, body = http_get(f"http://127.0.0.1:{server.web_port}/metrics")
    assert code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """One sample of :func:`scrape`'s (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class ServerProcess:
    """One ``twistd -n amaters`` subprocess with its own data dir, ports and log file."""

    def __init__(
        self,
        directory: Path,
        settings: Sequence[str] = (),
        config_text: str | None = None,
        tac: bool = False,
    ) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.web_port = free_port()
        while self.web_port == self.port:
            self.web_port = free_port()
        self.grpc_port = free_port()
        while self.grpc_port in (self.port, self.web_port):
            self.grpc_port = free_port()
        self.data_dir = directory / "data"
        self.log_path = directory / "server.log"
        self.config_path = directory / "server.toml"
        base = (
            "[server]\n"
            f'listen = "tcp:{self.port}:interface=127.0.0.1"\n'
            f'data_dir = "{self.data_dir}"\n'
            "shutdown_timeout = 10\n"
            "[web]\n"
            f'listen = "tcp:{self.web_port}:interface=127.0.0.1"\n'
            "[grpc]\n"
            f'listen = "tcp:{self.grpc_port}:interface=127.0.0.1"\n'
        )
        self.config_path.write_text(base + (config_text or ""))
        self.settings = list(settings)
        self.tac = tac
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ca_cert(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    def argv(self) -> list[str]:
        if self.tac:
            tac = Path(__file__).resolve().parents[2] / "amaters.tac"
            return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "-y", str(tac)]
        argv = [
            sys.executable,
            "-c",
            TWISTD,
            "-n",
            "--pidfile=",
            "amaters",
            "--config",
            str(self.config_path),
        ]
        for item in self.settings:
            argv += ["--set", item]
        return argv

    def start(
        self, env: dict[str, str] | None = None, open_files: tuple[int, int] | None = None
    ) -> ServerProcess:
        """Start the server; ``open_files`` sets its (soft, hard) RLIMIT_NOFILE first."""
        environ = dict(os.environ)
        environ.pop("AMATERS_CONFIG", None)
        if self.tac:
            environ["AMATERS_CONFIG"] = str(self.config_path)
        environ.update(env or {})
        log = self.log_path.open("ab")
        preexec = None
        if open_files is not None:
            import resource

            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

        self.process = subprocess.Popen(
            self.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            env=environ,
            preexec_fn=preexec,
        )
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        """Until ``text`` is in the log (a blocking wait: the server is another process)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in the log:\n{self.log()[-3000:]}")

    def readyz(self) -> int | None:
        try:
            return http_get(f"http://127.0.0.1:{self.web_port}/readyz", timeout=1.0)[0]
        except OSError:
            return None

    def wait_ready(self, timeout: float = 30.0) -> ServerProcess:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            if self.readyz() == 200:
                return self
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"server did not exit within {timeout}s:\n{self.log()}") from None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    @contextmanager
    def running(self) -> Iterator[ServerProcess]:
        """Start and wait until ready; on leaving, stop (SIGTERM) and clean up (a fixture's body)."""
        self.start().wait_ready()
        try:
            yield self
        finally:
            self.stop()
            self.cleanup()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

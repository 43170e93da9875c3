"""The README's tour, run as written: its shell blocks and its Python snippet, in order, against a
real server started by the tour itself (`amaters start --config examples/server.toml`).

The only changes are the ports: the tour's 7878 and 7879 become free ports below 32768 (in the
copy of examples/server.toml, in the blocks' text, and through ``AMATERS_SERVER`` for the client
commands' default address), so the test never collides with anything else on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def tour_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README's "A short tour" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A short tour") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```(sh|python)\n(.*?)```", section, flags=re.S)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    pid_file = tmp_path / "amaters-data" / "amaters.pid"
    if pid_file.exists():  # the tour failed before its stop: do not leave the server running
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_the_readme_tour_runs_as_written(workdir: Path) -> None:
    blocks = tour_blocks()
    assert [language for language, _ in blocks] == ["sh", "python", "sh"]
    port, web_port = free_port(), free_port()
    while web_port == port:
        web_port = free_port()

    def ports(text: str) -> str:
        return text.replace("7878", str(port)).replace("7879", str(web_port))

    (workdir / "examples").mkdir()
    example = (ROOT / "examples" / "server.toml").read_text()
    assert "7878" in example and "7879" in example
    (workdir / "examples" / "server.toml").write_text(ports(example))

    # `amaters` and `python3` on PATH are this interpreter, with this source tree importable.
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    for name, command in (
        ("amaters", f'"{sys.executable}" -m amaters.cli'),
        ("python3", f'"{sys.executable}"'),
    ):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMATERS_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["XDG_STATE_HOME"] = str(workdir / "state")
    env["AMATERS_SERVER"] = f"127.0.0.1:{port}"
    if shutil.which("curl", path=env["PATH"]) is None:
        pytest.skip("curl is not installed")

    def sh(code: str) -> str:
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", ports(code)],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=workdir,
            env=env,
        )
        assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}"
        return ran.stdout

    (_, first), (_, snippet), (_, last) = blocks
    out = sh(first)
    assert "examples/server.toml: valid" in out
    assert "amaters started (pid " in out
    assert "amaters running (pid " in out and "ready" in out
    assert "ciphertext bytes" in out and "alice" in out
    assert "only I can read this" in out
    assert '"status":"healthy"' in out.replace(" ", "")
    assert (workdir / "my.key").exists()

    (workdir / "tour.py").write_text(ports(snippet))
    ran = subprocess.run(
        ["python3", "tour.py"], capture_output=True, text=True, timeout=60, cwd=workdir, env=env
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "b'...ciphertext...'"

    out = sh(last)
    assert "amaters stopped (pid " in out
    assert not (workdir / "amaters-data" / "amaters.pid").exists()

"""The amaters command's server-management commands (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from amaters import __version__
from amaters.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"amaters {__version__}"
    assert main(["version", "-v"]) == 0
    out = capsys.readouterr().out
    assert "protocol 1.0.0" in out and "twisted" in out


def test_validate_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[logging]\nlevel = "debug"\n')
    assert main(["validate-config", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_config_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid file exits 2 and lists each problem on stderr."""
    path = tmp_path / "a.toml"
    path.write_text('[logging]\nlevel = "loud"\n[server]\nlisen = "x"\n')
    assert main(["validate-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "logging.level: 'loud' is not allowed" in err
    assert "server.lisen: unknown key (did you mean 'listen'?)" in err
    assert "2 problem(s) found" in err


def test_validate_config_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate-config", "--show", "--set", "logging.format=json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["logging"]["format"] == "json"


def test_status_when_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1: nothing listens there, so the readiness probe is refused at once.
    args = ["--set", f"server.data_dir={tmp_path}", "--set", "web.listen=tcp:1:interface=127.0.0.1"]
    assert main(["status", *args, "--format", "json"]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert {k: shown[k] for k in ("running", "pid", "ready")} == {
        "running": False,
        "pid": None,
        "ready": False,
    }
    assert shown["detail"].startswith("amaters is not running (no live pid in ")
    assert "nothing answers on http://127.0.0.1:1" in shown["detail"]


def test_stop_when_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--set", f"server.data_dir={tmp_path}", "--set", "web.listen=tcp:1:interface=127.0.0.1"]
    assert main(["stop", *args]) == 0
    assert "not running" in capsys.readouterr().out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_bad_config_on_start_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start", "--set", "storage.sync=sometimes", "--set", f"server.data_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "storage.sync" in err and "Traceback" not in err


def test_command_groups_are_modules_with_add_commands() -> None:
    """Every group in amaters.cli.GROUPS adds its commands through add_commands(subparsers)."""
    import importlib

    from amaters.cli import GROUPS, build_parser

    for name in GROUPS:
        assert callable(importlib.import_module(name).add_commands), name
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in (
        "start",
        "stop",
        "status",
        "get",
        "set",
        "admin",
        "snapshot",
        "migrate",
        "auth",
        "keygen",
    ):
        assert command in commands


def test_no_module_imports_the_cli_package() -> None:
    """Only entry points import amaters.cli: nothing under amaters/ outside the package itself."""
    import ast

    root = Path(__file__).resolve().parents[2] / "amaters"
    offenders = []
    for path in root.rglob("*.py"):
        if path.is_relative_to(root / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if any(n == "amaters.cli" or n.startswith("amaters.cli.") for n in names):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_keygen_output_is_ignored_by_git(tmp_path: Path) -> None:
    """Key files written by `amaters keygen` (default amaters.key, or any NAME.key) are in .gitignore."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("amaters.key", "my.key", "keys/backup.key"):
        result = subprocess.run(
            ["git", "-C", str(root), "check-ignore", "-q", "--no-index", name],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, f"{name} is not ignored"


def test_fhe_commands_get_the_fhe_deadline_unless_timeout_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fhe upload, filter and update wait for homomorphic work or a key set's storage (8 s for
    64 MB here, more on a slower disk): without --timeout their deadline is the client library's
    FHE deadline, not the 10 s of a key-value command; --timeout still sets it."""
    from amaters.cli import client as client_cli
    from amaters.cli import fhe as fhe_cli

    keys = str(tmp_path / "my.fhe")
    assert (
        main(["fhe", "keygen", "--schema", "age:8", "--out", keys, "--evaluator", "cleartext-insecure"]) == 0
    )
    deadlines: list[float] = []

    def run(args: Any, body: Any, default_timeout: float = client_cli.COMMAND_TIMEOUT) -> int:
        deadlines.append(args.timeout if args.timeout is not None else default_timeout)
        return 0

    monkeypatch.setattr(fhe_cli, "_run", run)
    monkeypatch.setattr(client_cli, "_run", run)
    fhe = ["--fhe-keys", keys]
    assert main([*fhe, "fhe", "upload"]) == 0
    assert main([*fhe, "filter", "people", "age > 3"]) == 0
    assert main([*fhe, "update", "people", "age > 3", "age+=1"]) == 0
    assert deadlines == [client_cli.FHE_COMMAND_TIMEOUT] * 3
    assert client_cli.FHE_COMMAND_TIMEOUT >= 600  # at least the server's fhe.query_timeout default
    deadlines.clear()
    assert main([*fhe, "set", "people", "alice", "age=42"]) == 0
    assert main(["get", "people", "alice"]) == 0
    assert main(["--timeout", "3", *fhe, "fhe", "upload"]) == 0
    assert deadlines == [client_cli.COMMAND_TIMEOUT, client_cli.COMMAND_TIMEOUT, 3.0]

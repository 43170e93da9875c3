"""``amaters auth new-key`` and ``amaters auth hash-key``."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

import pytest

from amaters.auth.apikeys import hash_api_key, parse_api_keys
from amaters.cli import main

PEPPER = "pepper-0123456789abcdef"


@pytest.fixture()
def pepper_file(tmp_path: Path) -> str:
    path = tmp_path / "pepper"
    path.write_text(PEPPER + "\n")
    return str(path)


def test_new_key_prints_the_key_and_a_keys_file_entry(
    pepper_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """new-key prints the key once and a TOML entry whose hash is the key's peppered HMAC."""
    status = main(
        [
            "auth",
            "new-key",
            "--pepper-file",
            pepper_file,
            "--name",
            "billing",
            "--role",
            "user,reader",
            "--days",
            "30",
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    key = out.splitlines()[1].strip()
    entry_text = out[out.index("[[keys]]") :]
    assert key not in entry_text
    entries = parse_api_keys(tomllib.loads(entry_text))
    (entry,) = entries.values()
    assert key.startswith(entry.id + ".")
    assert entry.key_hash == hash_api_key(PEPPER.encode(), key)
    assert (entry.name, entry.roles) == ("billing", ("user", "reader"))
    assert entry.expires_at is not None


def test_pasting_the_whole_output_into_the_keys_file_is_refused(
    pepper_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The key line is not valid TOML, so a keys file holding the key in clear text fails to load."""
    main(["auth", "new-key", "--pepper-file", pepper_file])
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(capsys.readouterr().out)


def test_new_key_json_output(pepper_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--format json gives {"key", "entry"} for scripts; --id and --expires are honoured."""
    status = main(
        [
            "auth",
            "new-key",
            "--pepper-file",
            pepper_file,
            "--format",
            "json",
            "--id",
            "ci",
            "--expires",
            "2030-01-01T00:00:00Z",
        ]
    )
    assert status == 0
    data = json.loads(capsys.readouterr().out)
    assert data["key"].startswith("ci.")
    (entry,) = parse_api_keys({"keys": [data["entry"]]}).values()
    assert entry.expires_at == 1893456000.0 and entry.roles == ()


def test_hash_key_reads_the_key_from_standard_input(
    pepper_file: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """hash-key prints HMAC-SHA256(pepper, key) for a key piped on standard input."""
    monkeypatch.setattr("sys.stdin", io.StringIO("my-existing-key\n"))
    assert main(["auth", "hash-key", "--pepper-file", pepper_file]) == 0
    assert capsys.readouterr().out.strip() == hash_api_key(PEPPER.encode(), "my-existing-key")


def test_pepper_from_the_configuration(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --pepper-file the pepper comes from the configuration (here --set)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("k.secret\n"))
    assert main(["auth", "hash-key", "--set", f"auth.api_key_pepper={PEPPER}"]) == 0
    assert capsys.readouterr().out.strip() == hash_api_key(PEPPER.encode(), "k.secret")


def test_problems_are_one_line_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No pepper, a short pepper, a bad expiry or no key: one line on stderr, exit 2, nothing leaked."""
    monkeypatch.delenv("AMATERS_AUTH__API_KEY_PEPPER", raising=False)
    assert main(["auth", "new-key"]) == 2
    assert "no pepper" in capsys.readouterr().err
    short = tmp_path / "short"
    short.write_text("tiny-pepper")
    assert main(["auth", "new-key", "--pepper-file", str(short)]) == 2
    err = capsys.readouterr().err
    assert "16 bytes" in err and "tiny-pepper" not in err
    good = tmp_path / "good"
    good.write_text(PEPPER)
    assert main(["auth", "new-key", "--pepper-file", str(good), "--expires", "2030-01-01"]) == 2
    assert "UTC offset" in capsys.readouterr().err
    assert main(["auth", "new-key", "--pepper-file", str(good), "--id", "bad.id"]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["auth", "hash-key", "--pepper-file", str(good)]) == 2
    assert "no key" in capsys.readouterr().err


def test_first_key_before_the_keys_file_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --config, only the pepper settings are read: the keys file it names may not exist yet,
    and a relative pepper file is found next to the configuration file."""
    (tmp_path / "pepper").write_text(PEPPER + "\n")
    config = tmp_path / "server.toml"
    config.write_text('[auth]\nenabled = true\napi_keys_file = "keys.toml"\napi_key_pepper_file = "pepper"\n')
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.delenv("AMATERS_AUTH__API_KEY_PEPPER", raising=False)
    assert main(["auth", "new-key", "--config", str(config), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["entry"]["key_hash"] == hash_api_key(PEPPER.encode(), data["key"])

"""Configuration: merge order, validation that lists every problem, and override parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amaters.config import (
    ConfigError,
    default_config,
    env_overrides,
    is_loopback_endpoint,
    iter_settings,
    load_config,
    parse_override,
    reloadable_differences,
    to_dict,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults() -> None:
    """With no sources the documented defaults apply."""
    config = default_config()
    assert config.server.listen == "tcp:7878:interface=127.0.0.1"
    assert config.web.listen == "tcp:7879:interface=127.0.0.1"
    assert config.server.shutdown_timeout == 30.0
    assert config.tls.enabled is True
    assert config.tls.client_auth == "none"
    assert config.logging.format == "text"
    assert Path(config.server.data_dir) == (Path.cwd() / "amaters-data").resolve()


def test_merge_order(tmp_path: Path) -> None:
    """File beats defaults, environment beats file, --set beats environment."""
    path = write(
        tmp_path / "a.toml",
        '[server]\nshutdown_timeout = 5\n[logging]\nlevel = "debug"\nformat = "json"\n',
    )
    env = {"AMATERS_LOGGING__LEVEL": "warn", "AMATERS_SERVER__SHUTDOWN_TIMEOUT": "7"}
    config = load_config(path, ["server.shutdown_timeout=9"], env)
    assert config.server.shutdown_timeout == 9.0  # --set
    assert config.logging.level == "warn"  # env over file
    assert config.logging.format == "json"  # file over default
    assert config.source == str(path.resolve())


def test_nested_env_section() -> None:
    """Nested sections are joined with double underscores in environment names."""
    config = load_config(
        None, [], {"AMATERS_WEB__CORS__ALLOWED_ORIGINS": "https://a.example,https://b.example"}
    )
    assert config.web.cors.allowed_origins == ["https://a.example", "https://b.example"]


def test_env_without_section_is_not_a_key() -> None:
    """AMATERS_CONFIG names the .tac's config file; it is not read as a setting."""
    assert env_overrides({"AMATERS_CONFIG": "/x.toml", "HOME": "/root"}) == []


def test_every_problem_reported(tmp_path: Path) -> None:
    """Validation lists every problem at once, each naming key, bad value and what is allowed."""
    path = write(
        tmp_path / "bad.toml",
        '[server]\nlisten = "nonsense:1"\nshutdown_timout = 3\n[storage]\nsync = "sometimes"\n'
        "[limits]\nmax_key_bytes = -1\n[nosuch]\nx = 1\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, ["tls.enabled=maybe"], {})
    text = "\n".join(info.value.problems)
    assert "server.listen: 'nonsense:1' is not allowed" in text
    assert "server.shutdown_timout: unknown key (did you mean 'shutdown_timeout'?)" in text
    assert "storage.sync: 'sometimes' is not allowed; expected one of 'always', 'interval', 'none'" in text
    assert "limits.max_key_bytes: -1 is not allowed; expected at least 1" in text
    assert "nosuch: unknown key" in text
    assert "tls.enabled: 'maybe' is not allowed; expected true or false" in text
    assert len(info.value.problems) == 6


def test_toml_types_are_strict(tmp_path: Path) -> None:
    """In TOML a number must be a number: strings are only converted when they come from env or --set."""
    path = write(tmp_path / "a.toml", '[server]\nshutdown_timeout = "10"\n')
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(path, [], {})


def test_bad_toml(tmp_path: Path) -> None:
    """A file that is not TOML is one clear problem, not a traceback."""
    path = write(tmp_path / "a.toml", "[server\nlisten=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, [], {})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml", [], {})


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    """Relative paths in the file are relative to the file's folder, not the working directory."""
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc" / "a.toml", '[server]\ndata_dir = "../data"\n')
    config = load_config(path, [], {})
    assert config.server.data_dir == str((tmp_path / "data").resolve())


def test_protected_mode() -> None:
    """A listener reachable from other hosts with auth off refuses to start unless allowed."""
    with pytest.raises(ConfigError, match="protected mode"):
        load_config(None, ["server.listen=tcp:7878:interface=0.0.0.0"], {})
    with pytest.raises(ConfigError, match="protected mode"):
        load_config(None, ["server.listen=tcp:7878"], {})
    config = load_config(None, ["server.listen=tcp:7878", "auth.allow_unauthenticated_remote=true"], {})
    assert config.auth.allow_unauthenticated_remote


def test_tls_cert_and_key_together(tmp_path: Path) -> None:
    cert = write(tmp_path / "c.pem", "x")
    with pytest.raises(ConfigError, match="both must be set"):
        load_config(None, [f"tls.cert={cert}"], {})


def test_secrets_redacted_in_dict() -> None:
    """to_dict never shows a secret's value."""
    config = default_config()
    shown = to_dict(config)
    assert shown["server"]["listen"] == config.server.listen
    for dotted, attribute in iter_settings():
        if attribute.metadata.get("secret"):
            section, _, key = dotted.rpartition(".")
            node = shown
            for part in section.split("."):
                node = node[part]
            assert node[key] in ("", "<redacted>", [], {})


def test_reloadable_differences() -> None:
    old = default_config()
    new = load_config(None, ["logging.level=debug", "server.listen=tcp:7000:interface=127.0.0.1"], {})
    reloadable, restart = reloadable_differences(old, new)
    assert reloadable == ["logging.level"]
    assert restart == ["server.listen"]


def test_every_setting_documented() -> None:
    """Each key carries documentation (the configuration reference is generated from it)."""
    for dotted, attribute in iter_settings():
        assert attribute.metadata.get("doc"), dotted


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp:7878:interface=127.0.0.1", True),
        ("tcp:7878:interface=\\:\\:1", True),
        ("unix:/tmp/s", True),
        ("tcp:7878", False),
        ("tcp:7878:interface=0.0.0.0", False),
        ("tcp:7878:interface=10.0.0.1", False),
    ],
)
def test_is_loopback_endpoint(endpoint: str, loopback: bool) -> None:
    assert is_loopback_endpoint(endpoint) is loopback


_names = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)


@given(section=_names, key=_names, value=st.text(max_size=30))
def test_parse_override_roundtrip(section: str, key: str, value: str) -> None:
    """Any section.key=value splits at the first '=', keeping '=' and spaces in the value."""
    assert parse_override(f"{section}.{key}={value}") == (f"{section}.{key}", value)


@given(text=st.text(max_size=30).filter(lambda t: "=" not in t))
def test_parse_override_without_equals_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected section\.key=value"):
        parse_override(text)


@given(value=st.integers(min_value=1, max_value=2**31 - 1))
def test_integer_overrides_parse(value: int) -> None:
    """--set integers become ints, with range checks applied."""
    config = load_config(None, [f"limits.max_key_bytes={value}"], {})
    assert config.limits.max_key_bytes == value


@given(flag=st.sampled_from(["true", "TRUE", "1", "yes", "on", "false", "0", "no", "off", "Off"]))
def test_bool_overrides_parse(flag: str) -> None:
    config = load_config(None, [f"tls.enabled={flag}"], {})
    assert config.tls.enabled is (flag.lower() in ("true", "1", "yes", "on"))

"""``python -m bench --config KEY=VALUE``: settings every amaters server of a run takes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import scenarios


def test_values_are_read_as_toml_and_bare_words_as_text() -> None:
    assert scenarios._config_item("storage.group_commit_delay_us=250") == (
        "storage.group_commit_delay_us",
        250,
    )
    assert scenarios._config_item("cache.enabled=false") == ("cache.enabled", False)
    assert scenarios._config_item('logging.level="info"') == ("logging.level", "info")
    assert scenarios._config_item("logging.level=info") == ("logging.level", "info")


@pytest.mark.parametrize("text", ["no-equals-sign", "=250", " =1"])
def test_a_malformed_item_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        scenarios._config_item(text)


def test_the_run_settings_go_over_each_blocks_own(tmp_path: Path) -> None:
    settings = scenarios.Settings.build(False, tmp_path / "out", tmp_path / "work", 2, ("durable",))
    settings.server_config = {"storage.group_commit_delay_us": 250, "storage.sync": "none"}
    assert settings.amaters({"storage.sync": "always", "tls.enabled": False}) == {
        "storage.sync": "none",
        "tls.enabled": False,
        "storage.group_commit_delay_us": 250,
    }


def test_a_bad_item_on_the_command_line_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        scenarios.main(["--only", "durable", "--config", "storage.sync"])
    assert exited.value.code == 2
    assert "expected KEY=VALUE, got 'storage.sync'" in capsys.readouterr().err


def test_an_undotted_key_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"the key must be section\.key"):
        scenarios._config_item("sync=always")


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            "storage.group_comit_delay_us=250",
            "storage.group_comit_delay_us: unknown key (did you mean 'group_commit_delay_us'?)",
        ),
        ("storage.group_commit_delay_us=-1", "storage.group_commit_delay_us: -1 is not allowed"),
        ("tls.enabled=maybe", "tls.enabled: 'maybe' is not allowed"),
    ],
)
def test_a_setting_the_server_would_refuse_stops_the_run_before_it_starts(
    item: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server's own config reading judges the items: a typo'd key or a value out of range ends
    the run at once, with the config's wording, rather than as a server that exits before listening
    minutes into the run.  Nothing is written: no results directory, no work directory."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        scenarios.main(
            ["--only", "durable", "--out", str(out), "--work-dir", str(tmp_path), "--config", item]
        )
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.splitlines()[-1].startswith("python -m bench: error: --config: "), err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_settings_the_server_takes_pass_the_check() -> None:
    assert scenarios._config_problems({"storage.group_commit_delay_us": 250, "storage.sync": "none"}) == []

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

"""``python -m bench syncfloor``: the barest server's synced write, measured for real."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from bench import syncfloor


@pytest.fixture
def fdatasyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every ``os.fdatasync`` this process makes (the server's; the client makes none)."""
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


@pytest.mark.parametrize("layout", syncfloor.LAYOUTS)
@pytest.mark.parametrize("mode", syncfloor.MODES)
def test_each_mode_answers_every_write_and_syncs_as_named(
    tmp_path: Path, fdatasyncs: list[int], mode: str, layout: str
) -> None:
    floor = syncfloor.measure(tmp_path, mode, layout, writes=150, seconds=20)
    assert floor.writes == 150
    assert floor.cpu_us_per_write > 0
    assert floor.wall_us_per_write >= floor.cpu_us_per_write / 2  # two threads at most
    assert len(fdatasyncs) == (0 if mode == "none" else 150)
    assert list(tmp_path.iterdir()) == []  # the scratch log is removed


def test_floors_report_each_extra_over_none(tmp_path: Path) -> None:
    found = syncfloor.floors(tmp_path, ("append",), writes=100, seconds=20)
    entry: dict[str, Any] = found["append"]
    none = entry["none"]["cpu_us_per_write"]
    assert entry["thread_extra_us"] == round(entry["thread"]["cpu_us_per_write"] - none, 1)
    assert entry["inline_extra_us"] == round(entry["inline"]["cpu_us_per_write"] - none, 1)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert syncfloor.main(["--dir", str(tmp_path), "--writes", "50", "--layout", "overwrite"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["overwrite", "none"],
        ["overwrite", "inline"],
        ["overwrite", "thread"],
    ]
    assert "over none" in lines[2]
    with pytest.raises(SystemExit) as raised:
        syncfloor.main(["--writes", "0"])
    assert raised.value.code == 2
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    assert syncfloor.main(["--dir", str(not_a_directory), "--writes", "5"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("python -m bench syncfloor: [Errno 17] File exists")
    with pytest.raises(ValueError, match="mode must be one of"):
        syncfloor.measure(tmp_path, "sometimes", "append")


def test_the_durable_row_shows_the_floors() -> None:
    from bench import report

    row = {
        "name": "durable-set-C1",
        "ops_per_s": 1800.0,
        "cpu_us_per_op_over_nondurable": 218.0,
        "reference_cpu_us_per_op_over_nondurable": 164.0,
        "bare_sync_floor_us": {"append": 96.4, "overwrite": 73.5},
    }
    table = report.table([row])
    assert "+218 µs CPU/op vs sync=none (reference server +164)" in table
    assert "barest Python server +96 (log written over +74)" in table

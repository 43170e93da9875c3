"""The troubleshooting guide documents every error code the server can send."""

from __future__ import annotations

from pathlib import Path

from amaters.errors import ErrorCode

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_error_code_documented() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    for code in ErrorCode:
        assert f"| {int(code)} | `{code.name}` |" in text, code.name


def test_backups_doc_says_snapshot_create_works_on_a_running_server() -> None:
    """`amaters snapshot create` goes through a running server's admin API; the guide says so and
    does not claim the command refuses (tests/integration/test_snapshot_server.py runs it)."""
    text = (DOCS / "backups.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| `amaters snapshot create")]
    assert "running server" in row and "stopped" in row
    section = text[text.index("## Taking snapshots") : text.index("Scheduled snapshots")]
    assert "refuses" not in section
    assert "POST /admin/snapshots" in section

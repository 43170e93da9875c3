"""The troubleshooting guide documents every error code the server can send."""

from __future__ import annotations

from pathlib import Path

from amaters.errors import ErrorCode

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_error_code_documented() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    for code in ErrorCode:
        assert f"| {int(code)} | `{code.name}` |" in text, code.name

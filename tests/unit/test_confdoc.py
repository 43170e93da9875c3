"""docs/configuration.md is generated from the config model and must be regenerated when it changes."""

from __future__ import annotations

from pathlib import Path

from amaters.config import iter_settings
from amaters.ops.confdoc import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_reference_lists_every_key() -> None:
    text = render()
    for dotted, _ in iter_settings():
        assert f"`{dotted}`" in text


def test_reference_is_up_to_date() -> None:
    """Regenerate with: python -m amaters.ops.confdoc > docs/configuration.md"""
    assert DOC.read_text() == render(), "docs/configuration.md is stale; regenerate it"

"""Integration tests import their helpers (``harness``) from this folder; the ``servers`` fixture."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    """A list a test appends its ``harness.ServerProcess`` es to; each still running at the end is
    killed (a test that checks a clean stop stops its server itself)."""
    started: list[Any] = []
    yield started
    for server in started:
        server.cleanup()

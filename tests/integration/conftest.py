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


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """moto's S3 server on a free loopback port for this module (``s3_helpers``); skips the test
    when moto's server is not installed."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:  # pragma: no cover - the test extras install both
        pytest.skip('moto[server] is not installed (pip install "moto[server]")')
    from s3_helpers import running_s3_server

    with running_s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server

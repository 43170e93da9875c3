"""Shared fixtures: the clean-reactor check every test runs under, and temporary data dirs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Shared test helpers (tests/storage_helpers.py) are imported by name.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Set when the tests run against a compiled build (tests/integration/test_compiled_build.py).
COMPILED_RUN = os.environ.get("AMATERS_TEST_COMPILED") == "1"


def pytest_configure(config: pytest.Config) -> None:
    if not COMPILED_RUN:
        return
    from amaters.compiled import MODULES, compiled_modules

    interpreted = sorted(set(MODULES) - set(compiled_modules()))
    if interpreted:
        raise pytest.UsageError(f"AMATERS_TEST_COMPILED=1 but these modules are not compiled: {interpreted}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not COMPILED_RUN:
        return
    skip = pytest.mark.skip(reason="traces or patches the interpreted build's internals")
    for item in items:
        if item.get_closest_marker("interpreted_only"):
            item.add_marker(skip)


def _reactor_leftovers() -> list[str]:
    from twisted.internet import reactor

    found: list[str] = []
    for call in reactor.getDelayedCalls():  # type: ignore[attr-defined]
        if call.active():
            found.append(f"pending call {call}")
    for selectable in reactor.getReaders() + reactor.getWriters():  # type: ignore[attr-defined]
        # The reactor's own waker and pytest-twisted's greenlet plumbing are not leaks.
        name = type(selectable).__name__
        if name in ("_UnixWaker", "_SocketWaker", "_SIGCHLDWaker", "Waker"):
            continue
        found.append(f"open {name} {selectable}")
    return found


@pytest.fixture(autouse=True)
def clean_reactor(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves listening ports, connections or timers behind on the global reactor.

    pytest-twisted, unlike trial, does not notice them; a leak would otherwise surface as a
    confusing failure in some later test.
    """
    before = set(_reactor_leftovers())
    yield
    if request.node.get_closest_marker("allow_dirty_reactor"):
        return
    leftovers = [item for item in _reactor_leftovers() if item not in before]
    if leftovers:
        from twisted.internet import reactor

        # Clean up so the next test starts fresh, then fail this one.
        for call in reactor.getDelayedCalls():  # type: ignore[attr-defined]
            if call.active():
                call.cancel()
        for selectable in reactor.removeAll():  # type: ignore[attr-defined]
            try:
                selectable.connectionLost(None)
            except Exception:
                pass
        pytest.fail("test left the reactor dirty:\n  " + "\n  ".join(leftovers))

"""Test support for the UPDATE race tests, never part of a server's code.

A server process started with this directory first on ``PYTHONPATH`` and ``AMATERS_TEST_UPDATE_GATE``
set to a directory imports this module at start-up (Python imports ``sitecustomize`` by itself).
It wraps the FHE engine's job runner: while the file ``hold`` exists in that directory, every UPDATE
evaluation job touches ``entered`` there and waits (at most two minutes), so a test can land writes
on rows an UPDATE has read and not yet written back, deterministically, without timing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_gate = os.environ.get("AMATERS_TEST_UPDATE_GATE")

if _gate:
    from amaters.fhe import engine

    _run_job = engine.run_job
    _directory = Path(_gate)

    def _gated(job: Any) -> Any:
        if job.action == "update":
            (_directory / "entered").touch()
            give_up = time.monotonic() + 120
            while (_directory / "hold").exists() and time.monotonic() < give_up:
                time.sleep(0.01)
        return _run_job(job)

    engine.run_job = _gated

"""Who this server process is, as the ops site reports it in ``/readyz`` and ``/health``.

``amaters start`` gives the server it launches a fresh instance id in the ``AMATERS_INSTANCE_ID``
environment variable and waits for ``/readyz`` to answer with that id, so it never mistakes another
server on the same port for its own.  A server started any other way makes up its own id.
"""

from __future__ import annotations

import os
import uuid

#: The environment variable ``amaters start`` sets for the server it launches.
INSTANCE_ENV = "AMATERS_INSTANCE_ID"


def _instance_id() -> str:
    given = os.environ.get(INSTANCE_ENV, "").strip()
    return given if given.isalnum() and len(given) <= 64 else uuid.uuid4().hex


#: This process's instance id (fixed for its lifetime).
INSTANCE_ID = _instance_id()


def identity() -> dict[str, object]:
    """``{"pid": ..., "instance": ...}`` for the probes' JSON bodies."""
    return {"pid": os.getpid(), "instance": INSTANCE_ID}

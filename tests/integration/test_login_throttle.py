"""Login throttling per network and per credential against the real server over TLS.

Loopback addresses stand for other hosts: 127.0.0.x share one /24, 127.0.1.x are another network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from inprocess import start_auth_server as start_server

from amaters.errors import ErrorCode

pytestmark = pytest.mark.integration


@pytest_twisted.ensureDeferred
async def test_rotating_addresses_are_throttled_and_known_principals_still_log_in(tmp_path: Path) -> None:
    """With auth.max_failures_per_minute = 3: failures from three addresses of one /24 throttle the
    whole /24 (a fourth address is refused without its key being checked), a first-time login from
    it is refused too (the documented trade-off), a key that logged in before still logs in from it,
    and another /24 is not affected."""
    server = await start_server(tmp_path, "auth.max_failures_per_minute=3")
    try:
        known = await server.client(api_key=server.api_key, bind_address="127.0.0.50")
        await known.close()
        for n in range(3):
            error = await server.refused(api_key=f"intruder.guess-{n}", bind_address=f"127.0.0.{2 + n}")
            assert error.code == ErrorCode.AUTH_FAILED and not error.retryable
        error = await server.refused(api_key="intruder2.guess", bind_address="127.0.0.9")
        assert error.code == ErrorCode.AUTH_FAILED and error.retryable and error.retry_after_ms
        newcomer = server.token("newcomer", ["reader"])
        error = await server.refused(token=newcomer, bind_address="127.0.0.10")
        assert error.retryable
        again = await server.client(api_key=server.api_key, bind_address="127.0.0.11")
        assert again.handshake.principal == "service"
        elsewhere = await server.client(token=newcomer, bind_address="127.0.1.1")
        assert elsewhere.handshake.principal == "newcomer"
    finally:
        await server.close()


@pytest_twisted.ensureDeferred
async def test_guesses_at_one_key_from_many_networks_throttle_that_key(tmp_path: Path) -> None:
    """Three wrong secrets for key id 'svc' from three networks: the key is refused from a fourth
    network (even with its right secret) while other credentials log in there."""
    server = await start_server(tmp_path, "auth.max_failures_per_minute=3")
    try:
        key_id = server.api_key.split(".", 1)[0]
        for n in range(3):
            error = await server.refused(api_key=f"{key_id}.wrong-{n}", bind_address=f"127.0.{10 + n}.1")
            assert not error.retryable
        error = await server.refused(api_key=server.api_key, bind_address="127.0.20.1")
        assert error.retryable
        other = await server.client(token=server.token("alice", ["reader"]), bind_address="127.0.20.1")
        assert other.handshake.principal == "alice"
    finally:
        await server.close()

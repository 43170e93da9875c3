"""``storage.group_commit_delay_us`` on a real server: concurrent writers share fuller fsyncs, and
SIGHUP changes the delay while the server runs."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import pytest_twisted
from harness import ServerProcess, scrape, value
from twisted.internet import defer, reactor

from amaters.client import AmatersClient, connect

pytestmark = pytest.mark.integration

WRITERS = 8
WRITES_EACH = 20


def group_commits(server: ServerProcess) -> tuple[float, float]:
    """(syncs, writes they acknowledged) so far, from the server's group-size histogram."""
    samples = scrape(server)
    return (
        value(samples, "amaters_storage_group_commit_size_count"),
        value(samples, "amaters_storage_group_commit_size_sum"),
    )


async def write_together(clients: list[AmatersClient], prefix: str) -> None:
    """Every client writes WRITES_EACH values, one after the other; the clients at the same time."""

    async def one(client: AmatersClient, n: int) -> None:
        for i in range(WRITES_EACH):
            await client.set("gc", f"{prefix}-{n}-{i}".encode(), b"v" * 100)

    await defer.gatherResults([defer.ensureDeferred(one(c, n)) for n, c in enumerate(clients)])


@pytest_twisted.ensureDeferred
async def test_concurrent_writers_share_held_back_fsyncs_and_sighup_changes_the_delay(tmp_path: Path) -> None:
    """With a 50 ms delay, eight clients writing one value at a time each are acknowledged by
    fsyncs of eight writes (without it, 3-5 here; 7.0 with only a sync from idle held back); the delay is reloadable."""
    server = ServerProcess(tmp_path / "srv", config_text="[storage]\ngroup_commit_delay_us = 50000\n")
    clients: list[AmatersClient] = []
    try:
        server.start().wait_ready()
        for _ in range(WRITERS):
            clients.append(
                await connect(reactor, "127.0.0.1", server.port, ca_cert=str(server.ca_cert), timeout=30)
            )
        await clients[0].set("gc", b"first", b"creates the collection")
        syncs_before, writes_before = group_commits(server)
        await write_together(clients, "held")
        syncs, writes = group_commits(server)
        syncs, writes = syncs - syncs_before, writes - writes_before
        assert writes == WRITERS * WRITES_EACH
        assert writes / syncs >= 7.5, f"{writes:.0f} writes in {syncs:.0f} fsyncs"
        for n, client in enumerate(clients):
            assert await client.get("gc", f"held-{n}-{WRITES_EACH - 1}".encode()) == b"v" * 100

        server.config_path.write_text(
            server.config_path.read_text().replace(
                "group_commit_delay_us = 50000", "group_commit_delay_us = 0"
            )
        )
        server.signal(signal.SIGHUP)
        server.wait_for_log("Group commit delay now 0 µs")
        assert "storage.group_commit_delay_us" in server.log().split("Reloaded configuration")[-1]
        await write_together(clients, "at-once")
        assert group_commits(server)[1] - writes_before == 2 * WRITERS * WRITES_EACH
    finally:
        await defer.gatherResults([client.close() for client in clients])
        server.cleanup()

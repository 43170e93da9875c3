"""The tests' free-port helper."""

from __future__ import annotations

from ports import free_port


def test_no_port_is_handed_out_twice() -> None:
    """Ports asked for before anything listens on them are all different (an etcd cluster asks for
    six at once; 300 random draws from 12,000 ports repeat one with a probability of 98 %)."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= port < 32768 for port in ports)

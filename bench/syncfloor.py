"""What a synced write costs the barest Python server on this machine: the floor under the lone
durable write's goal.

A server with no framework (one ``select.epoll`` loop, in this process) answers one client (a
second process, one 100-byte record at a time, each sent after the previous answer) and writes each
record to a scratch log before answering it:

- ``none``: answered at once (the baseline);
- ``inline``: answered after an ``fdatasync`` on the loop's own thread.  No server may do this (it
  stops every other connection for the length of the fsync); it prices the fsync alone;
- ``thread``: answered after an ``fdatasync`` run by a second thread, which wakes the loop through
  a pipe: the least a server that keeps its event loop free pays for a synced write.

The log is either written over (``overwrite``: blocks written and synced beforehand, as a recycled
RocksDB WAL is) or appended to (``append``: the file grows, as a new database's first WAL does, so
each ``fdatasync`` also journals the new size).  CPU is the server process's, every thread counted
(``time.process_time``), over a bounded count of writes and a time limit.

``python -m bench syncfloor [--dir DIR] [--writes 3000]`` prints each mode's CPU per write and its
extra over ``none``; the durable block records the ``thread`` extra beside the reference server's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import select
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODES = ("none", "inline", "thread")
LAYOUTS = ("overwrite", "append")
RECORD = 100


@dataclass
class Floor:
    mode: str
    layout: str
    writes: int
    cpu_us_per_write: float
    wall_us_per_write: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _client(port: int, writes: int, deadline: float) -> None:
    """Send ``writes`` records one at a time, each after the previous answer, until the deadline."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        record = b"r" * RECORD
        for _ in range(writes):
            if time.monotonic() >= deadline:
                break
            s.sendall(record)
            if not s.recv(16):
                break


def measure(
    directory: str | Path, mode: str, layout: str, writes: int = 3000, seconds: float = 10.0
) -> Floor:
    """Serve one sequential client for ``writes`` records (at most ``seconds``) in ``mode``."""
    if mode not in MODES or layout not in LAYOUTS:
        raise ValueError(f"mode must be one of {MODES} and layout one of {LAYOUTS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="syncfloor-", dir=directory)
    listener = socket.socket()
    epoll = select.epoll()
    jobs: queue.SimpleQueue[bool] = queue.SimpleQueue()
    wake_read, wake_write = os.pipe()
    worker: threading.Thread | None = None
    client: Any = None
    try:
        if layout == "overwrite":
            os.write(fd, b"\0" * (writes * RECORD + 4096))
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        deadline = time.monotonic() + seconds
        # Before this call starts its own thread: the (forked) client runs ``_client`` alone.
        client = multiprocessing.Process(
            target=_client, args=(listener.getsockname()[1], writes, deadline), daemon=True
        )
        client.start()
        listener.settimeout(max(1.0, seconds))
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
        epoll.register(conn.fileno(), select.EPOLLIN)
        if mode == "thread":

            def sync_each() -> None:
                while jobs.get():
                    os.fdatasync(fd)
                    os.write(wake_write, b"x")

            worker = threading.Thread(target=sync_each, name="syncfloor-sync", daemon=True)
            worker.start()
            epoll.register(wake_read, select.EPOLLIN)
        answered = 0
        started_cpu, started = time.process_time(), time.perf_counter()
        open_ = True
        while open_ and answered < writes:
            for fileno, _ in epoll.poll(max(0.0, deadline - time.monotonic()) + 1.0):
                if fileno == wake_read:
                    os.read(wake_read, 64)
                    conn.send(b"k")
                    answered += 1
                    continue
                data = conn.recv(4096)
                if not data:
                    open_ = False
                    break
                os.write(fd, data)
                if mode == "thread":
                    jobs.put(True)
                    continue
                if mode == "inline":
                    os.fdatasync(fd)
                conn.send(b"k")
                answered += 1
            if time.monotonic() > deadline + 1.0:
                break
        cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
        conn.close()
    finally:
        if worker is not None:
            jobs.put(False)
            worker.join(5)
        if client is not None:
            client.join(5)
        epoll.close()
        listener.close()
        for end in (wake_read, wake_write, fd):
            os.close(end)
        os.unlink(name)
    if answered == 0:
        raise RuntimeError(f"syncfloor {mode}/{layout}: the client sent nothing")
    return Floor(
        mode=mode,
        layout=layout,
        writes=answered,
        cpu_us_per_write=round(cpu / answered * 1e6, 1),
        wall_us_per_write=round(wall / answered * 1e6, 1),
    )


def floors(
    directory: str | Path,
    layouts: tuple[str, ...] = LAYOUTS,
    writes: int = 3000,
    seconds: float = 10.0,
) -> dict[str, Any]:
    """Every mode in every layout: ``{layout: {mode: Floor dict, "thread_extra_us": ..., ...}}``."""
    found: dict[str, Any] = {}
    for layout in layouts:
        by_mode = {mode: measure(directory, mode, layout, writes, seconds) for mode in MODES}
        base = by_mode["none"].cpu_us_per_write
        entry: dict[str, Any] = {mode: floor.to_dict() for mode, floor in by_mode.items()}
        entry["inline_extra_us"] = round(by_mode["inline"].cpu_us_per_write - base, 1)
        entry["thread_extra_us"] = round(by_mode["thread"].cpu_us_per_write - base, 1)
        found[layout] = entry
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench syncfloor",
        description="Server CPU per synced write in the barest Python server (no framework).",
    )
    parser.add_argument("--dir", default=".", help="where the scratch log goes (the data disk)")
    parser.add_argument("--writes", type=int, default=3000, help="writes per mode (bounded count)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time limit per mode")
    parser.add_argument("--layout", choices=LAYOUTS, action="append", help="default: both")
    args = parser.parse_args(argv)
    if args.writes < 1:
        parser.error("--writes must be at least 1")
    try:
        found = floors(args.dir, tuple(args.layout or LAYOUTS), args.writes, args.seconds)
    except (OSError, RuntimeError) as e:
        print(f"python -m bench syncfloor: {e}", file=sys.stderr)
        return 2
    for layout, entry in found.items():
        for mode in MODES:
            floor = entry[mode]
            extra = "" if mode == "none" else f" (+{entry[f'{mode}_extra_us']} over none)"
            print(
                f"{layout:9s} {mode:6s} {floor['cpu_us_per_write']:7.1f} µs CPU per write{extra},"
                f" {floor['wall_us_per_write']:.0f} µs a round trip, {floor['writes']} writes"
            )
    return 0

"""The load generator: amaters' Twisted client, driven from several processes.

A run has ``connections`` connections, each keeping ``pipeline`` requests in flight (a new request
goes out as soon as one is answered), over keys ``k000000000 .. k<keyspace-1>`` with values of
``value_size`` random bytes and an op mix of ``get``, ``set``, ``delete``, ``range`` and ``batch``.
It is bounded by ``duration`` seconds *and* ``max_ops`` measured operations, whichever comes first;
the first ``warmup`` seconds are not measured.

The connections are spread over ``workers`` generator processes (``multiprocessing`` spawn, each
with its own reactor), so one Python process is not the ceiling.  The parent process has no
reactor: it starts the workers together, prints a progress line every second to stderr, and
measures CPU (user + system, all threads) of the server and of the generators over the measured
window, so the output can say which side was the bottleneck.

Latency is per request, from just before the client serializes it to the callback with the answer.
Requests carry no per-request timer (``request_timeout`` None): the whole run is bounded instead.
"""

from __future__ import annotations

import array
import multiprocessing as mp
import os
import queue as queue_module
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psutil

from bench.servers import CPUMeter

#: Worker phases, published in a shared array.
_CONNECTING, _READY, _MEASURING, _MEASURED, _DONE = 0, 1, 2, 3, 4

#: Seconds a run may take beyond its planned length before workers give up.
_GRACE = 30.0

OP_KINDS = ("get", "set", "delete", "range", "batch")


def key_for(index: int) -> bytes:
    """The benchmark key with number ``index`` (fixed width, so key order is number order)."""
    return b"k%09d" % index


@dataclass(frozen=True)
class Target:
    """Where and how to connect."""

    host: str = "127.0.0.1"
    port: int = 7878
    ca_cert: str | None = None
    plaintext: bool = False
    token: str | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class LoadSpec:
    """What load to apply.  ``mix`` is ``((kind, weight), ...)`` over :data:`OP_KINDS`."""

    connections: int = 50
    pipeline: int = 1
    value_size: int = 100
    keyspace: int = 10_000
    mix: tuple[tuple[str, float], ...] = (("get", 1.0),)
    duration: float = 5.0
    warmup: float = 1.0
    max_ops: int | None = None
    collection: str = "bench"
    range_limit: int = 100
    batch_size: int = 10
    seed: int = 1
    request_timeout: float | None = None

    def describe(self) -> str:
        mix = "+".join(f"{k}:{w:g}" for k, w in self.mix)
        return (
            f"C={self.connections} P={self.pipeline} V={self.value_size}B K={self.keyspace} mix={mix}"
            f" duration={self.duration:g}s warmup={self.warmup:g}s"
            + (f" max_ops={self.max_ops}" if self.max_ops else "")
        )


@dataclass
class LoadResult:
    """One run's measurements (aggregated over the generator processes)."""

    label: str
    spec: dict[str, Any]
    ops: int = 0
    #: Every operation answered, warm-up and drain included (``ops`` counts only the window).
    completed_total: int = 0
    elapsed_s: float = 0.0
    ops_per_s: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    mean_ms: float | None = None
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    ops_by_kind: dict[str, int] = field(default_factory=dict)
    items: int = 0
    value_bytes: int = 0
    server_cpu_pct: float | None = None
    server_rss_mb_start: float | None = None
    server_rss_mb_end: float | None = None
    server_rss_mb_max: float | None = None
    generator_processes: int = 0
    generator_cpu_pct: float | None = None
    machine_cpu_pct: float | None = None
    bottleneck: str = ""
    #: Every latency of the window, in seconds (kept for :func:`combine`; not in ``to_dict``).
    latencies: array.array[float] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        found = asdict(replace(self, latencies=None))
        del found["latencies"]
        return found


def combine(results: Sequence[LoadResult], label: str) -> LoadResult:
    """One result for several windows of the same load on the same server, as if they were one
    window as long as all of them: operations over the summed windows, percentiles over every
    latency, CPU percentages weighted by each window's length (so CPU per operation is the summed
    CPU over the summed operations), RSS from the first window's start to the last one's end."""
    if not results:
        raise ValueError("no results to combine")
    first = results[0]
    combined = LoadResult(label=label, spec=dict(first.spec), generator_processes=first.generator_processes)
    latencies: array.array[float] = array.array("d")
    for result in results:
        combined.ops += result.ops
        combined.completed_total += result.completed_total
        combined.errors += result.errors
        _add_error_samples(combined, result.error_samples)
        for kind, count in result.ops_by_kind.items():
            combined.ops_by_kind[kind] = combined.ops_by_kind.get(kind, 0) + count
        combined.items += result.items
        combined.value_bytes += result.value_bytes
        if result.latencies is not None:
            latencies.extend(result.latencies)
    elapsed = sum(result.elapsed_s for result in results)
    combined.elapsed_s = round(elapsed, 4)
    if elapsed > 0 and combined.ops:
        combined.ops_per_s = round(combined.ops / elapsed, 1)
    _set_percentiles(combined, latencies)

    def weighted(values: list[float | None]) -> float | None:
        if elapsed <= 0 or any(value is None for value in values):
            return None
        return round(
            sum(v * r.elapsed_s for v, r in zip(values, results, strict=True) if v is not None) / elapsed, 1
        )

    combined.server_cpu_pct = weighted([r.server_cpu_pct for r in results])
    combined.generator_cpu_pct = weighted([r.generator_cpu_pct for r in results])
    combined.machine_cpu_pct = weighted([r.machine_cpu_pct for r in results])
    combined.server_rss_mb_start = first.server_rss_mb_start
    combined.server_rss_mb_end = results[-1].server_rss_mb_end
    peaks = [r.server_rss_mb_max for r in results if r.server_rss_mb_max is not None]
    combined.server_rss_mb_max = max(peaks) if peaks else None
    combined.bottleneck = judge_bottleneck(
        combined.server_cpu_pct, combined.generator_cpu_pct, combined.machine_cpu_pct
    )
    return combined


# -- percentiles ------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (``fraction`` in [0, 1])."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def judge_bottleneck(server_cpu: float | None, generator_cpu: float | None, machine_cpu: float | None) -> str:
    """A one-line verdict on which side limited the run, from CPU measured over the window."""
    if server_cpu is None or generator_cpu is None:
        return "unknown (CPU not measured)"
    cores = psutil.cpu_count() or 1
    if server_cpu >= 90.0:
        return f"server-bound: server at {server_cpu:.0f}% of a core, generators {generator_cpu:.0f}%"
    if generator_cpu >= server_cpu:
        return (
            f"generator-heavy: generators used {generator_cpu:.0f}% vs server {server_cpu:.0f}%"
            " (the ratio may understate the server)"
        )
    if machine_cpu is not None and machine_cpu >= 90.0 * cores:
        return (
            f"machine CPU-saturated ({machine_cpu:.0f}% of {cores * 100}%, other processes included);"
            f" server {server_cpu:.0f}%"
        )
    return f"not CPU-bound (server {server_cpu:.0f}%, generators {generator_cpu:.0f}%): latency-bound"


# -- the worker process -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    mode: str  # "load" | "fill" | "scan"
    index: int
    target: Target
    spec: LoadSpec
    connections: int
    max_ops: int | None = None
    key_range: tuple[int, int] = (0, 0)
    hard_limit: float = 600.0


class _Driver:
    """Keeps ``pipeline`` requests in flight per connection and records completions in the window."""

    def __init__(self, reactor: Any, clients: list[Any], job: _Job, progress: Any) -> None:
        from twisted.internet import defer

        from amaters.client import BatchOp

        self.reactor = reactor
        self.clients = clients
        self.job = job
        self.spec = spec = job.spec
        self.progress = progress
        self.index = job.index
        rnd = random.Random(spec.seed * 1000 + job.index)
        randrange = rnd.randrange
        keyspace = spec.keyspace
        collection = spec.collection
        value = os.urandom(spec.value_size)
        timeout = spec.request_timeout

        def key() -> bytes:
            return b"k%09d" % randrange(keyspace)

        def batch(client: Any) -> Any:
            return client.batch(
                [BatchOp.set(collection, key(), value) for _ in range(spec.batch_size)], timeout=timeout
            )

        self.operations: dict[str, Callable[[Any], Any]] = {
            "get": lambda c: c.get(collection, key(), timeout=timeout),
            "set": lambda c: c.set(collection, key(), value, timeout=timeout),
            "delete": lambda c: c.delete(collection, key(), timeout=timeout),
            "range": lambda c: c.range(collection, key(), None, spec.range_limit),
            "batch": batch,
        }
        # A fixed, shuffled cycle of kinds in the mix's proportions: no per-request random choice.
        total = sum(weight for _, weight in spec.mix)
        cycle: list[str] = []
        for kind, weight in spec.mix:
            if kind not in self.operations:
                raise ValueError(f"unknown operation {kind!r} in the mix")
            cycle += [kind] * max(1, round(1000 * weight / total)) if weight > 0 else []
        rnd.shuffle(cycle)
        self.cycle = cycle
        self.position = 0
        self.latencies = array.array("d")
        self.kind_counts = dict.fromkeys(self.operations, 0)
        self.count = 0
        self.completed = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.items = 0
        self.value_bytes = 0
        self.outstanding = 0
        self.measuring = False
        self.stopping = False
        self.window = (0.0, 0.0)
        self.limit = job.max_ops
        self.finished: defer.Deferred[None] = defer.Deferred()
        self.live = len(clients)

    def issue(self, client: Any) -> None:
        cycle = self.cycle
        kind = cycle[self.position]
        self.position = (self.position + 1) % len(cycle)
        started = time.perf_counter()
        try:
            d = self.operations[kind](client)
        except Exception as e:  # a client-side failure to build the request
            self._error(repr(e))
            return
        self.outstanding += 1
        d.addCallbacks(
            self._ok, self._failed, callbackArgs=(client, started, kind), errbackArgs=(client, started, kind)
        )

    def _ok(self, result: Any, client: Any, started: float, kind: str) -> None:
        now = time.perf_counter()
        self.outstanding -= 1
        self.completed += 1
        if self.measuring:
            self.latencies.append(now - started)
            self.count += 1
            self.kind_counts[kind] += 1
            if kind == "range":
                self.items += len(result)
                self.value_bytes += sum(len(v) for _, v in result)
            if self.limit is not None and self.count >= self.limit:
                self.end_window()
        if not self.stopping:
            self.issue(client)
        elif self.outstanding == 0:
            self._finish()

    def _failed(self, failure: Any, client: Any, started: float, kind: str) -> None:
        self.outstanding -= 1
        self._error(f"{kind}: {failure.getErrorMessage()}")
        if client.closed:
            self.live -= 1
            if self.live <= 0:
                self.stopping = True
        if not self.stopping and not client.closed:
            self.issue(client)
        elif self.outstanding == 0:
            self._finish()

    def _error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5 and message not in self.error_samples:
            self.error_samples.append(message)

    def begin_window(self) -> None:
        self.measuring = True
        self.window = (time.perf_counter(), 0.0)
        self.progress_phase(_MEASURING)

    def end_window(self) -> None:
        if not self.measuring:
            return
        self.measuring = False
        self.stopping = True
        self.window = (self.window[0], time.perf_counter())
        self.progress_phase(_MEASURED)
        if self.outstanding == 0:
            self._finish()

    def progress_phase(self, phase: int) -> None:
        self.progress.phase[self.index] = phase

    def _finish(self) -> None:
        if not self.finished.called:
            self.finished.callback(None)

    def publish(self) -> None:
        self.progress.counts[self.index] = self.completed

    async def run(self, start_at: float) -> None:
        from twisted.internet import task

        await task.deferLater(self.reactor, max(0.0, start_at - time.time()), lambda: None)
        spec = self.spec
        ticker = task.LoopingCall(self.publish)
        ticker.clock = self.reactor
        ticker.start(0.1, now=False)
        if spec.warmup > 0:
            self.reactor.callLater(spec.warmup, self.begin_window)
        else:
            self.begin_window()
        self.reactor.callLater(spec.warmup + spec.duration, self.end_window)
        for client in self.clients:
            for _ in range(spec.pipeline):
                self.issue(client)
        try:
            await self.finished
        finally:
            ticker.stop()
            self.publish()

    def result(self) -> dict[str, Any]:
        start, end = self.window
        return {
            "ops": self.count,
            "completed": self.completed,
            "elapsed": max(0.0, end - start) if end else 0.0,
            "latencies": self.latencies.tobytes(),
            "errors": self.errors,
            "error_samples": self.error_samples,
            "kinds": self.kind_counts,
            "items": self.items,
            "value_bytes": self.value_bytes,
        }


class _Shared:
    """The arrays workers publish into (picklable to spawned processes as constructor args)."""

    def __init__(self, counts: Any, phase: Any, start_at: Any) -> None:
        self.counts = counts
        self.phase = phase
        self.start_at = start_at


async def _connect_all(reactor: Any, job: _Job) -> list[Any]:
    from twisted.internet import defer

    from amaters.client import connect

    target = job.target
    attempts = [
        connect(
            reactor,
            target.host,
            target.port,
            ca_cert=target.ca_cert,
            token=target.token,
            api_key=target.api_key,
            plaintext=target.plaintext,
            timeout=job.spec.request_timeout,
        )
        for _ in range(job.connections)
    ]
    results = await defer.DeferredList(attempts, consumeErrors=True)
    clients = [value for ok, value in results if ok]
    failures = [value for ok, value in results if not ok]
    if failures:
        for client in clients:
            await client.close()
        raise RuntimeError(
            f"{len(failures)} of {job.connections} connections failed: {failures[0].getErrorMessage()}"
        )
    return clients


async def _wait_for_start(reactor: Any, shared: _Shared, deadline: float) -> float:
    from twisted.internet import task

    while shared.start_at.value <= 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the parent never gave the start signal")
        await task.deferLater(reactor, 0.01, lambda: None)
    return float(shared.start_at.value)


async def _fill(reactor: Any, clients: list[Any], job: _Job, shared: _Shared) -> dict[str, Any]:
    """Write keys ``key_range`` as BATCHes of ``batch_size`` SETs, ``pipeline`` batches per connection."""
    from twisted.internet import defer

    from amaters.client import BatchOp

    spec = job.spec
    lo, hi = job.key_range
    value_source = os.urandom(spec.value_size + 4096)
    started = time.perf_counter()
    state = {"next": lo, "done": 0, "errors": 0}
    samples: list[str] = []

    def value(i: int) -> bytes:
        offset = (i * 7919) % 4096  # values differ, so nothing compresses them away
        return value_source[offset : offset + spec.value_size]

    async def lane(client: Any) -> None:
        while state["next"] < hi:
            first = state["next"]
            last = min(hi, first + spec.batch_size)
            state["next"] = last
            ops = [BatchOp.set(spec.collection, key_for(i), value(i)) for i in range(first, last)]
            try:
                await client.batch(ops)
            except Exception as e:
                state["errors"] += 1
                if len(samples) < 5:
                    samples.append(str(e))
                if client.closed:
                    return
                continue
            state["done"] += last - first
            shared.counts[job.index] = state["done"]

    lanes = [defer.Deferred.fromCoroutine(lane(client)) for client in clients for _ in range(spec.pipeline)]
    await defer.gatherResults(lanes, consumeErrors=True)
    elapsed = time.perf_counter() - started
    return {
        "ops": state["done"],
        "elapsed": elapsed,
        "latencies": b"",
        "errors": state["errors"],
        "error_samples": samples,
        "kinds": {"batch-set": state["done"]},
        "items": state["done"],
        "value_bytes": state["done"] * spec.value_size,
    }


async def _scan(reactor: Any, clients: list[Any], job: _Job, shared: _Shared) -> dict[str, Any]:
    """Stream the whole collection over one connection, counting entries and value bytes."""
    spec = job.spec
    client = clients[0]
    items = 0
    value_bytes = 0
    chunk_latency = array.array("d")
    started = last = time.perf_counter()
    shared.phase[job.index] = _MEASURING
    stream = client.scan(spec.collection)
    async for chunk in stream:
        now = time.perf_counter()
        chunk_latency.append(now - last)
        last = now
        items += len(chunk)
        value_bytes += sum(len(v) for _, v in chunk)
        shared.counts[job.index] = items
    elapsed = time.perf_counter() - started
    shared.phase[job.index] = _MEASURED
    return {
        "ops": items,
        "elapsed": elapsed,
        "latencies": chunk_latency.tobytes(),
        "errors": 0,
        "error_samples": [],
        "kinds": {"range-chunks": len(chunk_latency)},
        "items": items,
        "value_bytes": value_bytes,
        "total_count": stream.total_count,
    }


async def _worker(reactor: Any, job: _Job, shared: _Shared) -> dict[str, Any]:
    deadline = time.monotonic() + job.hard_limit
    clients = await _connect_all(reactor, job)
    try:
        shared.phase[job.index] = _READY
        start_at = await _wait_for_start(reactor, shared, deadline)
        if job.mode == "load":
            driver = _Driver(reactor, clients, job, shared)
            await driver.run(start_at)
            return driver.result()
        if job.mode == "fill":
            return await _fill(reactor, clients, job, shared)
        if job.mode == "scan":
            return await _scan(reactor, clients, job, shared)
        raise ValueError(f"unknown mode {job.mode}")
    finally:
        for client in clients:
            if not client.closed:
                await client.close()


def _worker_entry(job: _Job, shared: _Shared, results: Any) -> None:
    """The body of one generator process: its own reactor, one job, the result on ``results``."""
    from twisted.internet import defer, reactor

    outcome: dict[str, Any] = {"index": job.index, "pid": os.getpid()}

    def start() -> None:
        d = defer.Deferred.fromCoroutine(_worker(reactor, job, shared))

        def done(result: dict[str, Any]) -> None:
            outcome.update(result)

        def failed(failure: Any) -> None:
            outcome["fatal"] = failure.getErrorMessage() or repr(failure.value)

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())

    def too_long() -> None:
        outcome["fatal"] = f"worker gave up after {job.hard_limit:g} s"
        reactor.stop()

    reactor.callWhenRunning(start)
    reactor.callLater(job.hard_limit, too_long)
    reactor.run(installSignalHandlers=False)
    shared.phase[job.index] = _DONE
    results.put(outcome)


# -- the parent -------------------------------------------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(
    mode: str,
    target: Target,
    spec: LoadSpec,
    *,
    workers: int = 2,
    server_pid: int | None = None,
    label: str = "",
    quiet: bool = False,
    key_range: tuple[int, int] | None = None,
) -> LoadResult:
    """Run ``mode`` ("load", "fill" or "scan") from ``workers`` processes and measure it.

    ``server_pid`` (the server's process) is measured for CPU and RSS over the window.
    """
    if mode == "scan":
        workers = 1
    workers = max(1, min(workers, spec.connections))
    context = mp.get_context("spawn")
    shared = _Shared(
        context.Array("q", workers, lock=False),
        context.Array("i", workers, lock=False),
        context.Value("d", 0.0, lock=False),
    )
    results: Any = context.Queue()
    connections = _split(spec.connections, workers)
    ops_shares = _split(spec.max_ops, workers) if spec.max_ops else [None] * workers
    lo, hi = key_range if key_range is not None else (0, spec.keyspace)
    key_shares = _split(hi - lo, workers)
    planned = spec.warmup + spec.duration if mode == "load" else 0.0
    hard_limit = planned + _GRACE + (3600.0 if mode != "load" else 60.0)
    jobs = []
    first = lo
    for i in range(workers):
        jobs.append(
            _Job(
                mode,
                i,
                target,
                spec,
                connections[i],
                ops_shares[i],
                (first, first + key_shares[i]),
                hard_limit,
            )
        )
        first += key_shares[i]
    processes = [
        context.Process(target=_worker_entry, args=(job, shared, results), daemon=True) for job in jobs
    ]
    server = psutil.Process(server_pid) if server_pid else None
    result = LoadResult(label=label, spec=asdict(spec), generator_processes=workers)
    outcomes: list[dict[str, Any]] = []
    try:
        for process in processes:
            process.start()
        _wait_phase(shared, processes, _READY, time.monotonic() + 120.0, results, outcomes)
        start_at = time.time() + 0.05
        shared.start_at.value = start_at
        window_start = start_at + (spec.warmup if mode == "load" else 0.0)
        _sleep_until(window_start)
        meters = _Meters(server, [p.pid for p in processes if p.pid is not None])
        _monitor(shared, processes, results, outcomes, meters, label, mode, spec, hard_limit, quiet)
        meters.stop()
        _collect(results, outcomes, workers, time.monotonic() + 60.0)
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
    _aggregate(result, outcomes, mode)
    if meters.server_cpu is not None:
        result.server_cpu_pct = round(meters.server_cpu, 1)
    result.generator_cpu_pct = round(meters.generator_cpu, 1)
    result.machine_cpu_pct = round(meters.machine_cpu, 1)
    result.server_rss_mb_start = meters.rss_mb(meters.rss_start)
    result.server_rss_mb_end = meters.rss_mb(meters.rss_end)
    result.server_rss_mb_max = meters.rss_mb(meters.rss_max)
    result.bottleneck = judge_bottleneck(
        result.server_cpu_pct, result.generator_cpu_pct, result.machine_cpu_pct
    )
    return result


class _Meters:
    """CPU and RSS of the server and the generators over the measured window."""

    def __init__(self, server: psutil.Process | None, generator_pids: list[int]) -> None:
        self.server = server
        self.server_meter = CPUMeter([server.pid]) if server is not None else None
        self.generator_meter = CPUMeter(generator_pids)
        psutil.cpu_percent(None)
        self.rss_start = self._rss()
        self.rss_max = self.rss_start
        self.rss_end: int | None = None
        self.server_cpu: float | None = None
        self.generator_cpu = 0.0
        self.machine_cpu = 0.0
        self.stopped = False

    def _rss(self) -> int | None:
        if self.server is None:
            return None
        try:
            return int(self.server.memory_info().rss)
        except psutil.Error:
            return None

    def sample(self) -> None:
        rss = self._rss()
        if rss is not None and (self.rss_max is None or rss > self.rss_max):
            self.rss_max = rss

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.sample()
        self.rss_end = self._rss()
        if self.server_meter is not None:
            self.server_cpu = self.server_meter.percent()
        self.generator_cpu = self.generator_meter.percent()
        self.machine_cpu = psutil.cpu_percent(None) * (psutil.cpu_count() or 1)

    @staticmethod
    def rss_mb(value: int | None) -> float | None:
        return round(value / 2**20, 1) if value is not None else None


def _sleep_until(when: float) -> None:
    delay = when - time.time()
    if delay > 0:
        time.sleep(delay)


def _drain(results: Any, outcomes: list[dict[str, Any]]) -> None:
    while True:
        try:
            outcomes.append(results.get_nowait())
        except queue_module.Empty:
            return


def _wait_phase(
    shared: _Shared,
    processes: list[Any],
    phase: int,
    deadline: float,
    results: Any,
    outcomes: list[dict[str, Any]],
) -> None:
    while any(shared.phase[i] < phase for i in range(len(processes))):
        _drain(results, outcomes)
        fatal = [o["fatal"] for o in outcomes if "fatal" in o]
        if fatal:
            raise RuntimeError(f"generator failed: {fatal[0]}")
        if any(not p.is_alive() and p.exitcode not in (0, None) for p in processes):
            raise RuntimeError("a generator process died")
        if time.monotonic() > deadline:
            raise RuntimeError("generators did not get ready in time")
        time.sleep(0.02)


def _monitor(
    shared: _Shared,
    processes: list[Any],
    results: Any,
    outcomes: list[dict[str, Any]],
    meters: _Meters,
    label: str,
    mode: str,
    spec: LoadSpec,
    hard_limit: float,
    quiet: bool,
) -> None:
    """Print progress every second until every worker has left the measured window."""
    began = time.monotonic()
    deadline = began + hard_limit
    last_tick = began
    last_count = sum(shared.counts)
    server_meter = CPUMeter([meters.server.pid]) if meters.server is not None else None
    generator_meter = CPUMeter([p.pid for p in processes if p.pid is not None])
    while time.monotonic() < deadline:
        _drain(results, outcomes)
        phases = [shared.phase[i] for i in range(len(processes))]
        if all(p >= _MEASURED for p in phases):
            break
        meters.sample()
        now = time.monotonic()
        if now - last_tick >= 1.0:
            count = sum(shared.counts)
            rate = (count - last_count) / (now - last_tick)
            if not quiet:
                server_cpu = f"{server_meter.percent():.0f}%" if server_meter is not None else "-"
                rss = meters._rss()
                _say(
                    f"  [{label}] {now - began:5.1f}s {'measuring' if mode == 'load' else mode}:"
                    f" {rate:10,.0f} {'keys' if mode != 'load' else 'ops'}/s  server CPU {server_cpu}"
                    f"  generators CPU {generator_meter.percent():.0f}%"
                    + (f"  server RSS {rss / 2**20:.0f} MB" if rss else "")
                )
            server_meter = CPUMeter([meters.server.pid]) if meters.server is not None else None
            generator_meter = CPUMeter([p.pid for p in processes if p.pid is not None])
            last_tick, last_count = now, count
        time.sleep(0.02)
    meters.stop()


def _collect(results: Any, outcomes: list[dict[str, Any]], workers: int, deadline: float) -> None:
    while len(outcomes) < workers and time.monotonic() < deadline:
        try:
            outcomes.append(results.get(timeout=0.5))
        except queue_module.Empty:
            continue
    if len(outcomes) < workers:
        raise RuntimeError(f"only {len(outcomes)} of {workers} generators reported")


def _aggregate(result: LoadResult, outcomes: list[dict[str, Any]], mode: str) -> None:
    fatal = [o["fatal"] for o in outcomes if "fatal" in o]
    if fatal:
        raise RuntimeError(f"generator failed: {fatal[0]}")
    latencies = array.array("d")
    kinds: dict[str, int] = {}
    for outcome in outcomes:
        chunk = array.array("d")
        chunk.frombytes(outcome["latencies"])
        latencies.extend(chunk)
        result.ops += outcome["ops"]
        result.completed_total += outcome.get("completed", outcome["ops"])
        result.errors += outcome["errors"]
        _add_error_samples(result, outcome["error_samples"])
        for kind, count in outcome["kinds"].items():
            if count:
                kinds[kind] = kinds.get(kind, 0) + count
        result.items += outcome["items"]
        result.value_bytes += outcome["value_bytes"]
        if "total_count" in outcome:
            result.spec["server_total_count"] = outcome["total_count"]
    result.ops_by_kind = kinds
    # The window is each worker's own; they start together, so the longest one covers them all.
    result.elapsed_s = round(max((o["elapsed"] for o in outcomes), default=0.0), 4)
    if result.elapsed_s > 0 and result.ops:
        result.ops_per_s = round(result.ops / result.elapsed_s, 1)
    _set_percentiles(result, latencies)


def _add_error_samples(result: LoadResult, samples: Sequence[str]) -> None:
    """Keep the first five distinct error messages of a run."""
    for sample in samples:
        if len(result.error_samples) < 5 and sample not in result.error_samples:
            result.error_samples.append(sample)


def _set_percentiles(result: LoadResult, latencies: array.array[float]) -> None:
    """Keep ``latencies`` in ``result`` and set its percentiles, maximum and mean from them."""
    result.latencies = latencies
    if latencies:
        ordered = sorted(latencies)
        result.p50_ms = round(percentile(ordered, 0.50) * 1000, 3)
        result.p90_ms = round(percentile(ordered, 0.90) * 1000, 3)
        result.p99_ms = round(percentile(ordered, 0.99) * 1000, 3)
        result.max_ms = round(ordered[-1] * 1000, 3)
        result.mean_ms = round(sum(ordered) / len(ordered) * 1000, 3)


def summary_line(result: LoadResult) -> str:
    """One human line for a finished run."""
    if result.ops_per_s is None:
        return f"{result.label}: no operations measured; errors {result.errors} {result.error_samples[:1]}"
    latency = (
        f" p50 {result.p50_ms:.2f} ms p90 {result.p90_ms:.2f} ms p99 {result.p99_ms:.2f} ms max {result.max_ms:.1f} ms"
        if result.p50_ms is not None
        else ""
    )
    return (
        f"{result.label}: {result.ops_per_s:,.0f} ops/s over {result.elapsed_s:.1f}s ({result.ops:,} ops,"
        f" {result.errors} errors){latency}; {result.generator_processes} generator processes;"
        f" {result.bottleneck}"
    )

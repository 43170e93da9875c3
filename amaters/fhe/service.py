"""The server's FHE side: key registry, circuit cache, worker pool and the evaluator.

- Uploaded evaluation keys live under ``<data_dir>/fhe/keys/<key set id>/`` (so snapshots of the
  data dir carry them); an upload arrives in chunks, is checked against its sha256 identity and
  against the server's compiled circuit, then warmed in a worker.
- Compiled circuits are cached under ``<data_dir>/fhe/circuits/`` keyed by field widths, our
  circuit version and concrete's version.
- Evaluation runs in worker processes (concrete holds the GIL while it evaluates, measured: a
  thread running it starves the reactor thread), in batches so a timeout stops the remaining work.
  Each worker keeps an LRU of loaded key sets bounded by ``fhe.max_loaded_bytes``.
- The cleartext evaluator (tests) runs the same engine in an I/O thread.

Nothing here does I/O in a constructor; :func:`build_fhe` wires it from config.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from amaters.config import Config, FHEConfig
from amaters.errors import (
    AmatersError,
    ComputeError,
    ComputeTimeout,
    InvalidOperation,
    InvalidValue,
    NotFound,
    SizeExceeded,
    StorageFull,
)
from amaters.fhe import records
from amaters.fhe.schema import Schema, SchemaError
from amaters.interfaces import IFHEEvaluator

if TYPE_CHECKING:
    from amaters.fhe import engine

#: Rows per worker job: small enough that a timeout stops work promptly.
BATCH_ROWS = 4
_ID_CHARS = frozenset("0123456789abcdef")


def missing_extra_message(what: str) -> str | None:
    """Why ``what`` cannot run on this server, or None when the concrete extra is installed."""
    if importlib.util.find_spec("concrete") is None:
        return (
            f"{what} needs concrete-python on the server: pip install 'amaters[fhe]'"
            " (see docs/fhe.md); the key-value operations work without it"
        )
    return None


@attrs.frozen
class KeyUpload:
    """One chunk of an evaluation key upload (``offset`` into the whole, ``last`` on the final one)."""

    key_set_id: str
    evaluator: str
    schema: str
    specs_sha256: str
    total_size: int
    offset: int
    data: bytes = attrs.field(repr=False)
    last: bool
    warm_ciphertext: bytes = attrs.field(repr=False, default=b"")


@attrs.frozen
class UploadResult:
    received: int
    complete: bool
    already_present: bool


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


@implementer(IFHEEvaluator)
class FheService(service.Service):
    """Owns the FHE workers and the key registry; is the server's :class:`IFHEEvaluator`."""

    name = "fhe"
    _log = Logger()

    def __init__(
        self, config: FHEConfig, reactor: Any, io_pool: Any, data_dir: str, metrics: Any = None
    ) -> None:
        self.config = config
        self._reactor = reactor
        #: Runs file I/O and the cleartext evaluator: ``io_pool.run(f, *args)`` gives a Deferred.
        self._io = io_pool
        self.root_dir = Path(data_dir) / "fhe"
        self.keys_dir = self.root_dir / "keys"
        self.circuits_dir = self.root_dir / "circuits"
        self.metrics = metrics
        #: The concrete workers, created on first use (processes start on the first submit).
        self._processes: ProcessPoolExecutor | None = None
        self._meta: dict[str, dict[str, Any]] = {}
        #: Held (in io threads) while an upload claims a place under fhe.max_key_sets.
        self._claims = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.config.evaluator

    def unavailable(self, what: str) -> str | None:
        """Why ``what`` (FILTER, UPDATE, key upload) cannot run here, or None."""
        if self.kind == "concrete":
            return missing_extra_message(what)
        return None

    def startService(self) -> None:
        super().startService()
        reason = self.unavailable("FILTER and UPDATE")
        if reason is not None:
            self._log.warn("{reason}", reason=reason)
        else:
            self._log.info(
                "FHE evaluator: {kind}, {workers} worker(s)", kind=self.kind, workers=self.config.workers
            )

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        # Processes start on the first submit, not here.
        return ProcessPoolExecutor(
            max_workers=self.config.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
        )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        processes, self._processes = self._processes, None
        if processes is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = self._io.run(processes.shutdown, wait=True, cancel_futures=True)
        return d

    def _in_io(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self._io.run(f, *args)
        return d

    def _in_worker(self, job: engine.Job) -> defer.Deferred[engine.JobResult]:
        # numpy and concrete come with the fhe extra: imported on first use, not at server start.
        from amaters.fhe import engine

        if job.kind != "concrete":
            return self._in_io(engine.run_job, job)
        if not self.running:
            return defer.fail(InvalidOperation("the FHE service is not running"))
        if self._processes is None:
            self._processes = self._new_pool()
        d: defer.Deferred[engine.JobResult] = defer.Deferred()
        try:
            future = self._processes.submit(engine.run_job, job)
        except BrokenProcessPool:
            # A worker died (killed, out of memory): replace the pool once, then go on.
            self._log.warn("An FHE worker process died; starting new workers")
            self._processes.shutdown(wait=False, cancel_futures=True)
            self._processes = self._new_pool()
            future = self._processes.submit(engine.run_job, job)

        def done(f: Future[engine.JobResult]) -> None:
            self._reactor.callFromThread(self._settle, f, d)

        future.add_done_callback(done)
        d.addErrback(self._cancel_future, future)
        return d

    @staticmethod
    def _cancel_future(failure: Any, future: Future[Any]) -> Any:
        future.cancel()
        return failure

    @staticmethod
    def _settle(f: Future[engine.JobResult], d: defer.Deferred[engine.JobResult]) -> None:
        if d.called:
            return
        if f.cancelled():
            d.errback(ComputeError("the evaluation was cancelled"))
            return
        error = f.exception()
        if error is not None:
            if isinstance(error, AmatersError):
                d.errback(error)
            else:
                d.errback(ComputeError(f"the evaluation failed: {type(error).__name__}: {error}"))
            return
        d.callback(f.result())

    def _observe(self, result: engine.JobResult) -> None:
        m = self.metrics
        if m is None:
            return
        if result.evaluations:
            m.fhe_evaluations.inc(result.evaluations)
            per_row = result.seconds / result.evaluations
            for _ in range(result.evaluations):
                m.fhe_row_seconds.observe(per_row)
        if result.keys_loaded:
            m.fhe_key_sets_loaded.inc()
        if result.circuit_cache_hit is not None:
            m.fhe_circuit_cache.labels("hit" if result.circuit_cache_hit else "miss").inc()

    # -- key registry ---------------------------------------------------------------------------

    def _dir(self, key_set_id: str) -> Path:
        if len(key_set_id) != 64 or not set(key_set_id) <= _ID_CHARS:
            raise InvalidValue("a key set id is 64 lowercase hex characters (a sha256)")
        return self.keys_dir / key_set_id

    def status(self) -> defer.Deferred[dict[str, Any]]:
        """What the server holds for FILTER and UPDATE: the evaluator, the key sets stored, the
        compiled circuits cached (the directories are listed in the io pool)."""
        return self._io.run(self._status_blocking)

    def _status_blocking(self) -> dict[str, Any]:
        key_sets = (
            sorted(p.name for p in self.keys_dir.iterdir() if p.is_dir()) if self.keys_dir.is_dir() else []
        )
        circuits = sum(1 for _ in self.circuits_dir.iterdir()) if self.circuits_dir.is_dir() else 0
        return {
            "evaluator": self.kind,
            "available": self.unavailable("FILTER") is None,
            "workers": self.config.workers,
            "key_sets_stored": len(key_sets),
            "key_sets": [key_set_id[:16] for key_set_id in key_sets],
            "circuits_cached": circuits,
            "max_loaded_bytes": self.config.max_loaded_bytes,
        }

    def has_key_set(self, key_set_id: str) -> bool:
        """Whether evaluation keys with this id are stored (a stat; cached once seen)."""
        if key_set_id in self._meta:
            return True
        try:
            return (self._dir(key_set_id) / "meta.json").exists()
        except AmatersError:
            return False

    def _read_meta(self, key_set_id: str) -> dict[str, Any]:
        meta = self._meta.get(key_set_id)
        if meta is None:
            path = self._dir(key_set_id) / "meta.json"
            try:
                meta = json.loads(path.read_text())
            except FileNotFoundError:
                raise NotFound(
                    "the server has no evaluation keys with this key set id; upload them first"
                    " (client.upload_keys or amaters fhe upload)"
                ) from None
            self._meta[key_set_id] = meta
        return meta

    def upload_chunk(self, chunk: KeyUpload) -> defer.Deferred[UploadResult]:  # type: ignore[override]
        """Store one chunk; on the last, verify, publish and warm the key set."""
        reason = self.unavailable("uploading FHE keys")
        if reason is not None:
            return defer.fail(InvalidOperation(reason))
        return defer.Deferred.fromCoroutine(self._upload(chunk))

    async def _upload(self, chunk: KeyUpload) -> UploadResult:
        if chunk.evaluator != self.kind:
            raise InvalidValue(
                f"the keys are for the {chunk.evaluator} evaluator; this server runs {self.kind}"
            )
        try:
            schema = Schema.parse(chunk.schema)
        except SchemaError as e:
            raise InvalidValue(f"key upload: {e}") from None
        directory = self._dir(chunk.key_set_id)
        received, complete, already = await self._in_io(self._store_chunk, directory, chunk)
        if already or not complete:
            return UploadResult(received, complete, already)
        job = self._job(chunk.key_set_id, str(schema), schema.widths, "specs")
        if self.kind == "concrete":
            specs = await self._in_worker(job)
            self._observe(specs)
            if specs.specs_sha256 != chunk.specs_sha256:
                await self._in_io(shutil.rmtree, self._part_dir(directory), True)
                raise InvalidValue(
                    "the keys were generated for a different circuit than this server compiles for"
                    " that schema (different amaters or concrete-python version?); generate them again"
                )
        await self._in_io(self._publish, directory, chunk)
        if self.kind == "concrete":
            warm = await self._in_worker(attrs.evolve(job, action="warm", rows=(chunk.warm_ciphertext,)))
            self._observe(warm)
        self._log.info(
            "Stored FHE key set {id} ({size} bytes)", id=chunk.key_set_id[:16], size=chunk.total_size
        )
        return UploadResult(received, True, False)

    @staticmethod
    def _part_dir(directory: Path) -> Path:
        return directory.with_name(directory.name + ".part")

    def _store_chunk(self, directory: Path, chunk: KeyUpload) -> tuple[int, bool, bool]:
        if (directory / "meta.json").exists():
            return chunk.total_size, True, True
        if chunk.total_size > self.config.max_key_set_bytes:
            raise SizeExceeded(
                f"key upload: {chunk.total_size} bytes of evaluation keys is over fhe.max_key_set_bytes"
                f" ({self.config.max_key_set_bytes})"
            )
        part = self._part_dir(directory)
        if not part.is_dir():
            self._claim_place(part)
        data_path = part / "evaluation.keys"
        size = data_path.stat().st_size if data_path.exists() else 0
        if chunk.offset == 0 and size:
            data_path.unlink()  # a restarted upload
            size = 0
        if chunk.offset != size:
            raise InvalidValue(f"key upload: chunk at offset {chunk.offset}, but {size} bytes were received")
        if size + len(chunk.data) > chunk.total_size:
            raise InvalidValue("key upload: more data than total_size announced")
        with open(data_path, "ab") as f:
            f.write(chunk.data)
        size += len(chunk.data)
        if not chunk.last:
            return size, False, False
        if size != chunk.total_size:
            raise InvalidValue(f"key upload: received {size} bytes of {chunk.total_size}")
        h = hashlib.sha256(f"{chunk.evaluator}\n{Schema.parse(chunk.schema)}\n".encode())
        with open(data_path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        if h.hexdigest() != chunk.key_set_id:
            shutil.rmtree(part, ignore_errors=True)
            raise InvalidValue("key upload: the data does not match the key set id (sha256); upload again")
        return size, True, False

    def _claim_place(self, part: Path) -> None:
        """Create ``part`` for a new upload if fewer than fhe.max_key_sets key sets are stored or
        being uploaded (uploads idle past fhe.upload_idle_timeout are discarded first)."""
        with self._claims:
            self._discard_idle_uploads()
            held = sum(1 for p in self.keys_dir.iterdir() if p.is_dir()) if self.keys_dir.is_dir() else 0
            if held >= self.config.max_key_sets:
                raise StorageFull(
                    f"the server already holds {held} FHE key sets (fhe.max_key_sets ="
                    f" {self.config.max_key_sets}); an administrator deletes unused ones with"
                    " amaters admin fhe-keys --delete ID"
                )
            part.mkdir(parents=True, exist_ok=True)

    def _discard_idle_uploads(self) -> None:
        if not self.keys_dir.is_dir():
            return
        oldest = time.time() - self.config.upload_idle_timeout
        for part in self.keys_dir.glob("*.part"):
            if part.is_dir() and _last_change(part) < oldest:
                shutil.rmtree(part, ignore_errors=True)
                self._log.info("Discarded an idle FHE key upload ({id})", id=part.name[:16])

    def key_sets(self) -> defer.Deferred[dict[str, Any]]:
        """Every stored key set (id, evaluator, schema, bytes, stored at) and unfinished upload
        (id, bytes received, last change), with the limits on them; listed in the io pool."""
        return self._io.run(self._key_sets_blocking)

    def _key_sets_blocking(self) -> dict[str, Any]:
        stored: list[dict[str, Any]] = []
        uploading: list[dict[str, Any]] = []
        directories = sorted(self.keys_dir.iterdir()) if self.keys_dir.is_dir() else []
        for path in directories:
            if not path.is_dir():
                continue
            keys = path / "evaluation.keys"
            size = keys.stat().st_size if keys.exists() else 0
            if path.name.endswith(".part"):
                uploading.append(
                    {
                        "key_set_id": path.name[: -len(".part")],
                        "received": size,
                        "last_change": _last_change(path),
                    }
                )
                continue
            try:
                meta = json.loads((path / "meta.json").read_text())
            except (OSError, ValueError):
                meta = {}
            stored.append(
                {
                    "key_set_id": path.name,
                    "evaluator": meta.get("evaluator"),
                    "schema": meta.get("schema"),
                    "bytes": size,
                    "stored_at": path.stat().st_mtime,
                }
            )
        return {
            "key_sets": stored,
            "uploads": uploading,
            "max_key_sets": self.config.max_key_sets,
            "max_key_set_bytes": self.config.max_key_set_bytes,
        }

    def delete_key_set(self, key_set_id: str) -> defer.Deferred[dict[str, Any]]:
        """Delete a stored key set and any unfinished upload of it; FILTER and UPDATE with it then
        answer that the server has no such keys.  ``NotFound`` when there is neither."""
        try:
            directory = self._dir(key_set_id)
        except AmatersError as e:
            return defer.fail(e)
        self._meta.pop(key_set_id, None)
        return self._io.run(self._delete_blocking, directory)

    def _delete_blocking(self, directory: Path) -> dict[str, Any]:
        found = False
        for path in (directory, self._part_dir(directory)):
            if path.is_dir():
                shutil.rmtree(path)
                found = True
        if not found:
            raise NotFound("the server has no FHE key set with this id")
        self._log.info("Deleted FHE key set {id}", id=directory.name[:16])
        return {"deleted": directory.name}

    def _publish(self, directory: Path, chunk: KeyUpload) -> None:
        part = self._part_dir(directory)
        (part / "warm.ct").write_bytes(chunk.warm_ciphertext)
        meta = {"evaluator": chunk.evaluator, "schema": str(Schema.parse(chunk.schema))}
        meta["specs_sha256"] = chunk.specs_sha256
        (part / "meta.json").write_text(json.dumps(meta))
        os.replace(part, directory)

    # -- evaluation -----------------------------------------------------------------------------

    def _job(self, key_set_id: str, schema: str, widths: tuple[int, ...], action: str) -> engine.Job:
        from amaters.fhe import engine

        return engine.Job(
            kind=self.kind,
            schema=schema,
            widths=widths,
            key_set_id=bytes.fromhex(key_set_id),
            circuits_dir=str(self.circuits_dir),
            keys_path=str(self._dir(key_set_id) / "evaluation.keys"),
            max_loaded_bytes=self.config.max_loaded_bytes,
            action=action,
        )

    def evaluate(  # type: ignore[override]
        self, key_set_id: str, action: str, tree: Any, updates: Any, rows: list[bytes], deadline: float
    ) -> defer.Deferred[list[bytes | None]]:
        """Per row: the encrypted boolean (filter) or the new record (update); None for rows of
        another key set or schema.  Fails with ComputeTimeout past ``deadline`` (reactor seconds)."""
        reason = self.unavailable(action.upper())
        if reason is not None:
            return defer.fail(InvalidOperation(reason))
        return defer.Deferred.fromCoroutine(self._evaluate(key_set_id, action, tree, updates, rows, deadline))

    async def _evaluate(
        self, key_set_id: str, action: str, tree: Any, updates: Any, rows: list[bytes], deadline: float
    ) -> list[bytes | None]:
        meta = await self._in_io(self._read_meta, key_set_id)
        schema = Schema.parse(meta["schema"])
        names = set(schema.names)
        from amaters.fhe.predicate import tree_fields

        used = tree_fields(tree) | {u[1] for u in (updates or ())}
        unknown = sorted(used - names)
        if unknown:
            raise InvalidValue(f"the key set's schema ({schema}) has no field {unknown[0]!r}")
        base = self._job(key_set_id, str(schema), schema.widths, action)
        base = attrs.evolve(base, tree=tree, updates=updates)
        batches = [tuple(rows[i : i + BATCH_ROWS]) for i in range(0, len(rows), BATCH_ROWS)]
        results: list[list[bytes | None] | None] = [None] * len(batches)
        pending = list(enumerate(batches))
        width = self.config.workers if self.kind == "concrete" else 1

        async def lane() -> None:
            while pending:
                if self._reactor.seconds() > deadline:
                    raise ComputeTimeout(
                        f"the {action.upper()} did not finish within fhe.query_timeout"
                        f" ({self.config.query_timeout:g} s); remaining rows were not evaluated"
                    )
                index, batch = pending.pop(0)
                outcome = await self._in_worker(attrs.evolve(base, rows=batch))
                self._observe(outcome)
                results[index] = list(outcome.results)

        lanes = [defer.Deferred.fromCoroutine(lane()) for _ in range(max(1, min(width, len(batches))))]
        try:
            await defer.gatherResults(lanes, consumeErrors=True)
        except defer.FirstError as e:
            pending.clear()
            e.subFailure.raiseException()
        out: list[bytes | None] = []
        for part in results:
            out.extend(part or [])
        return out


def _last_change(directory: Path) -> float:
    """The newest modification time of ``directory`` and the files in it."""
    times = [directory.stat().st_mtime]
    times += [p.stat().st_mtime for p in directory.iterdir()]
    return max(times)


def is_fhe_record(data: bytes) -> bool:
    return records.is_record(data)


def build_fhe(config: Config, reactor: Any, pools: Any, metrics: Any = None) -> FheService:
    """The FHE service (also the server's evaluator), from config; no I/O until used.

    ``pools.io`` runs its file I/O and the cleartext evaluator; concrete evaluation runs in the
    service's own worker processes.
    """
    return FheService(config.fhe, reactor, pools.io, config.server.data_dir, metrics)

"""The ``amaters snapshot ...`` and ``amaters migrate`` commands (offline tools on a data dir).

- ``snapshot create [--upload]``: snapshot the data directory: directly when no server runs on it
  (the command takes the data directory lock, as a server would), otherwise through the running
  server's admin API (only the process holding the database open can checkpoint it);
- ``snapshot list [--remote]``: archives in ``snapshot.dir`` (or in the S3 bucket);
- ``snapshot verify ARCHIVE``: re-hash every file against the manifest;
- ``snapshot restore ARCHIVE --into DIR``: verify, then restore into an empty or new directory;
- ``migrate [--dry-run]``: upgrade a stopped data directory's on-disk format after a snapshot.

ARCHIVE is a path, the name of an archive in ``snapshot.dir``, an archive name to fetch from
``snapshot.s3``, or an ``s3://bucket/key`` URL; remote archives are downloaded into
``snapshot.dir`` (checked against their sha256) first.

These commands need no reactor: they run the same code as the server with synchronous pools, so
every Deferred has fired when its call returns.  Progress goes to stderr (``--quiet`` turns it off),
results to stdout; a failure is one line on stderr and exit status 1 (2 for bad usage or config).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from twisted.internet import defer, task
from twisted.python.failure import Failure

from amaters.cli.admin import AdminError, call_admin
from amaters.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CommandError, config_options, err, load
from amaters.config import Config
from amaters.errors import AmatersError
from amaters.service import ThreadPoolService

T = TypeVar("T")


# -- runtime ---------------------------------------------------------------------------------


class OfflineRuntime:
    """A clock and synchronous pools: the server's code run inline in a command-line process."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.io = ThreadPoolService(self.clock, "io", synchronous=True)  # type: ignore[arg-type]
        self.cpu = ThreadPoolService(self.clock, "cpu", synchronous=True)  # type: ignore[arg-type]


def wait(d: defer.Deferred[T]) -> T:
    """The result of a Deferred that fired synchronously (raises its failure)."""
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("an offline operation did not complete synchronously")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


class ProgressPrinter:
    """Prints ``progress(done, total, stage)`` to a stream: one updating line on a terminal,
    otherwise a line per stage and per 10 % step.  Thread-safe (S3 transfers report from threads)."""

    def __init__(self, stream: IO[str] | None = None, enabled: bool = True) -> None:
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._bucket = -1
        self._open_line = False

    def __call__(self, done: int, total: int, stage: str) -> None:
        if not self._enabled:
            return
        with self._lock:
            if total > 0:
                percent = min(100, done * 100 // total)
                text = f"{stage}: {percent:3d}% ({human_bytes(done)} of {human_bytes(total)})"
                bucket = percent // 10
            else:
                text = f"{stage}..."
                bucket = 0
            if self._tty:
                if stage != self._stage and self._open_line:
                    self._stream.write("\n")
                self._stream.write("\r" + text.ljust(60))
                self._open_line = True
            elif stage != self._stage or bucket != self._bucket:
                self._stream.write(text + "\n")
            self._stage, self._bucket = stage, bucket
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._open_line:
                self._stream.write("\n")
                self._stream.flush()
                self._open_line = False


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _command(fn: Callable[[argparse.Namespace, ProgressPrinter], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command with a progress printer; AmatersError and CommandError become one line."""

    def run(args: argparse.Namespace) -> int:
        printer = ProgressPrinter(enabled=not getattr(args, "quiet", False))
        try:
            return fn(args, printer)
        except CommandError as e:
            printer.close()
            err(str(e))
            return e.status
        except AmatersError as e:
            printer.close()
            err(e.message)
            return EXIT_FAIL
        finally:
            printer.close()

    return run


# -- helpers ---------------------------------------------------------------------------------


def _s3_store(config: Config, bucket: str | None = None) -> Any:
    """The configured S3 store, or one for another ``bucket`` (an ``s3://`` URL) on the same endpoint."""
    import attrs

    from amaters.storage.s3 import S3Settings, S3Store

    if bucket:
        return S3Store(attrs.evolve(S3Settings.from_config(config.snapshot.s3), bucket=bucket))
    return S3Store.from_config(config.snapshot.s3)


def resolve_archive(archive: str, config: Config, runtime: OfflineRuntime, printer: ProgressPrinter) -> Path:
    """A local path for ARCHIVE, downloading it first when it is remote (see the module docstring)."""
    from amaters.storage.s3 import parse_s3_url
    from amaters.storage.snapshot import is_archive_name, snapshot_dir

    directory = snapshot_dir(config)
    if archive.startswith("s3://"):
        try:
            bucket, key = parse_s3_url(archive)
        except ValueError as e:
            raise CommandError(str(e), EXIT_USAGE) from None
        store = _s3_store(config, bucket)
        return wait(runtime.io.run(store.download_blocking, key, directory, printer, bucket=bucket))
    path = Path(archive)
    if path.is_file():
        return path
    if "/" not in archive and is_archive_name(archive):
        local = directory / archive
        if local.is_file():
            return local
        if config.snapshot.s3.bucket:
            store = _s3_store(config)
            return wait(runtime.io.run(store.download_blocking, store.key_for(archive), directory, printer))
    raise CommandError(
        f"no snapshot archive {archive!r}: not a file, not in {str(directory)!r}"
        + ("" if config.snapshot.s3.bucket else ", and no snapshot.s3.bucket to fetch it from")
    )


def _require_rocksdb(config: Config) -> None:
    if config.storage.backend != "rocksdb":
        raise CommandError(
            f"snapshots need storage.backend = rocksdb (this config uses {config.storage.backend!r})"
        )


# -- commands --------------------------------------------------------------------------------


def _create(args: argparse.Namespace, printer: ProgressPrinter) -> int:
    from amaters.storage import formatfile
    from amaters.storage.lock import DataDirLocked
    from amaters.storage.rocksdb import RocksDBBackend, RocksDBSettings
    from amaters.storage.snapshot import clean_leftovers, create_snapshot, snapshot_dir

    config = load(args)
    _require_rocksdb(config)
    db_path = config.data_dir / "db"
    if not formatfile.has_database(db_path):
        raise CommandError(f"no database in {str(db_path)!r}: nothing to snapshot")
    runtime = OfflineRuntime()
    backend = RocksDBBackend(
        db_path,
        runtime.io,
        runtime.clock,
        RocksDBSettings.from_config(config.storage),
        lock_dir=config.data_dir,
    )
    try:
        wait(backend.open())
    except DataDirLocked:
        # A running server holds the data dir: ask it, through its admin API.
        return _create_through_server(args, config)
    try:
        # The lock is ours, so no snapshot is being written: remove what a crash left behind.
        clean_leftovers(snapshot_dir(config))
        info = wait(
            defer.Deferred.fromCoroutine(
                create_snapshot(
                    backend,
                    config,
                    runtime,
                    printer,
                    upload=args.upload,
                    s3=_s3_store(config) if args.upload else None,
                )
            )
        )
    finally:
        wait(backend.close())
    printer.close()
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return EXIT_OK
    manifest = info.manifest
    print(
        f"{info.path}: {len(manifest.collections or {})} collections, {manifest.total_keys} keys,"
        f" {len(manifest.files)} files, {human_bytes(info.size)}"
    )
    if info.remote:
        print(f"uploaded to {info.remote}")
    return EXIT_OK


def _create_through_server(args: argparse.Namespace, config: Config) -> int:
    print("the server is running: taking the snapshot through its admin API", file=sys.stderr)
    try:
        body = call_admin(config, "POST", "/snapshots" + ("?upload=1" if args.upload else ""))
    except AdminError as e:
        raise CommandError(
            f"the data dir is in use by a running server and its admin API refused: {e}"
            " (set AMATERS_TOKEN or AMATERS_API_KEY to an admin credential)"
        ) from None
    if args.json:
        print(json.dumps(body, indent=2))
        return EXIT_OK
    print(
        f"{body['path']}: {len(body.get('collections') or {})} collections, {body['keys']} keys,"
        f" {body['files']} files, {human_bytes(body['size'])}"
    )
    if body.get("remote"):
        print(f"uploaded to {body['remote']}")
    return EXIT_OK


def _list(args: argparse.Namespace, printer: ProgressPrinter) -> int:
    from amaters.storage.snapshot import list_archives, snapshot_dir

    config = load(args)
    if args.remote:
        runtime = OfflineRuntime()
        store = _s3_store(config)
        remote = wait(runtime.io.run(store.list_blocking))
        if args.json:
            print(
                json.dumps(
                    [
                        {"name": r.name, "key": r.key, "size": r.size, "last_modified": r.last_modified}
                        for r in remote
                    ],
                    indent=2,
                )
            )
            return EXIT_OK
        if not remote:
            print(f"no snapshots in {store.url_for(store.settings.prefix)}")
        for r in remote:
            print(f"{r.name}  {human_bytes(r.size):>10}  {r.last_modified}  {store.url_for(r.key)}")
        return EXIT_OK
    directory = snapshot_dir(config)
    found = list_archives(directory)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": s.name,
                        "path": str(s.path),
                        "size": s.size,
                        "sha256": s.sha256,
                        "created_at": s.manifest.created_at if s.manifest else None,
                        "format": s.manifest.format if s.manifest else None,
                        "keys": s.manifest.total_keys if s.manifest else None,
                        "source": s.manifest.source if s.manifest else None,
                        "problem": s.problem,
                    }
                    for s in found
                ],
                indent=2,
            )
        )
        return EXIT_OK
    if not found:
        print(f"no snapshots in {directory}")
    for s in found:
        if s.manifest is None:
            print(f"{s.name}  {human_bytes(s.size):>10}  UNREADABLE: {s.problem}")
            continue
        keys = "?" if s.manifest.total_keys is None else str(s.manifest.total_keys)
        print(
            f"{s.name}  {human_bytes(s.size):>10}  format {s.manifest.format}  {keys} keys"
            f"  {s.manifest.source}"
        )
    return EXIT_OK


def _verify(args: argparse.Namespace, printer: ProgressPrinter) -> int:
    from amaters.storage.snapshot import verify_archive

    config = load(args)
    runtime = OfflineRuntime()
    path = resolve_archive(args.archive, config, runtime, printer)
    manifest = wait(runtime.cpu.run(verify_archive, path, printer))
    printer.close()
    print(
        f"{path}: OK ({len(manifest.files)} files, {human_bytes(manifest.total_bytes)}, format"
        f" {manifest.format}, created {manifest.created_at} by amaters {manifest.amaters_version})"
    )
    return EXIT_OK


def _restore(args: argparse.Namespace, printer: ProgressPrinter) -> int:
    from amaters.storage.migrate import CURRENT_FORMAT
    from amaters.storage.snapshot import restore_archive

    config = load(args)
    runtime = OfflineRuntime()
    path = resolve_archive(args.archive, config, runtime, printer)
    into = Path(args.into)
    manifest = wait(runtime.cpu.run(restore_archive, path, into, printer))
    printer.close()
    keys = "?" if manifest.total_keys is None else manifest.total_keys
    print(f"restored {path.name} into {into}: {len(manifest.collections or {})} collections, {keys} keys")
    if manifest.format < CURRENT_FORMAT:
        print(
            f"note: this snapshot has on-disk format {manifest.format}; run `amaters migrate` with"
            f" server.data_dir = {into} before starting a server on it"
        )
    elif manifest.format > CURRENT_FORMAT:
        print(
            f"note: this snapshot has on-disk format {manifest.format}, newer than this amaters reads"
            f" ({CURRENT_FORMAT}); start amaters {manifest.amaters_version} or newer on it"
        )
    else:
        print(f"start a server with server.data_dir = {into}")
    return EXIT_OK


def _migrate(args: argparse.Namespace, printer: ProgressPrinter) -> int:
    from amaters.storage.migrate import describe, migrate_data_dir

    config = load(args)
    _require_rocksdb(config)
    runtime = OfflineRuntime()
    result = wait(
        defer.Deferred.fromCoroutine(
            migrate_data_dir(config, runtime, dry_run=args.dry_run, progress=printer)
        )
    )
    printer.close()
    for line in describe(result):
        print(line)
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------


def add_commands(subparsers: Any) -> None:
    """Add ``snapshot {create,list,verify,restore}`` and ``migrate`` to the ``amaters`` parser."""
    config_opts = config_options()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    snapshot = subparsers.add_parser(
        "snapshot",
        help="create, list, verify and restore snapshots (backups)",
        description="Snapshots of a data directory: consistent, checksummed archives, optionally on S3.",
    )
    actions = snapshot.add_subparsers(dest="snapshot_command", metavar="ACTION")
    snapshot.set_defaults(func=lambda args: _usage(snapshot))

    p = actions.add_parser(
        "create",
        parents=[config_opts, common],
        help="snapshot the data directory into snapshot.dir (through the running server if there is one)",
    )
    p.add_argument("--upload", action="store_true", help="also upload the archive to snapshot.s3")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_command(_create))

    p = actions.add_parser("list", parents=[config_opts, common], help="list snapshot archives")
    p.add_argument("--remote", action="store_true", help="list the archives in snapshot.s3 instead")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=_command(_list))

    archive_help = "archive path, archive name (in snapshot.dir or snapshot.s3), or s3://bucket/key"
    p = actions.add_parser(
        "verify", parents=[config_opts, common], help="check every file of an archive against its manifest"
    )
    p.add_argument("archive", metavar="ARCHIVE", help=archive_help)
    p.set_defaults(func=_command(_verify))

    p = actions.add_parser(
        "restore",
        parents=[config_opts, common],
        help="verify an archive and restore it into an empty or new directory",
    )
    p.add_argument("archive", metavar="ARCHIVE", help=archive_help)
    p.add_argument("--into", required=True, metavar="DIR", help="new data directory (absent or empty)")
    p.set_defaults(func=_command(_restore))

    p = subparsers.add_parser(
        "migrate",
        parents=[config_opts, common],
        help="upgrade a stopped data directory to this version's on-disk format",
        description="Upgrade the data directory in place, after taking a snapshot of it. Refuses while"
        " a server uses the directory.",
    )
    p.add_argument("--dry-run", action="store_true", help="only show what would be done")
    p.set_defaults(func=_command(_migrate))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE

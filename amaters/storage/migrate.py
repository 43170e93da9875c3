"""``amaters migrate``: upgrade a stopped data directory's on-disk format in place.

A data directory's format is the number in ``<data_dir>/FORMAT``
(:mod:`amaters.storage.formatfile`); a server reads exactly one format (the RocksDB backend's
``FORMAT_VERSION``) and refuses any other before opening the database.  :data:`MIGRATIONS` maps
each format N to the step that turns a format-N directory into format N+1.  A migration:

1. takes the data directory lock (:mod:`amaters.storage.lock`), so it refuses to run while a
   server uses the directory, and no server can start while it runs;
2. finds the directory's format and plans the steps up to the current one (none missing);
3. with ``dry_run``, stops here and reports the plan;
4. archives the directory as it is (an "offline" snapshot in ``snapshot.dir``; the database may be
   in a format this code cannot open as a backend, so its files are archived as they are);
5. runs each step in the io pool and, after each, rewrites ``FORMAT`` with the new number, so an
   interrupted migration resumes from the last finished step (every step must be safe to re-run).

Formats:

- **0**: a data directory written before the format file existed: ``<data_dir>/db`` but no
  ``FORMAT``; its database may also lack the in-database marker ``amaters:format_version``.
- **1**: ``FORMAT`` says 1; the database has a column family ``c:<name>`` per collection, records
  in :mod:`amaters.storage.codec` format 1, and the marker ``1``.

Step 0 → 1 checks that every column family is a collection and every record decodes (so it never
stamps a database amaters did not write), sets the marker and lets the driver write ``FORMAT``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from amaters.config import Config
from amaters.errors import ErrorCategory, StorageError
from amaters.storage import codec, formatfile
from amaters.storage.lock import DataDirLock
from amaters.storage.rocksdb import FORMAT_KEY, FORMAT_VERSION, column_family_name
from amaters.storage.snapshot import (
    Pools,
    ProgressCallback,
    SnapshotInfo,
    _no_progress,
    pack_offline_blocking,
    snapshot_dir,
)

#: The format this amaters reads and writes.
CURRENT_FORMAT = FORMAT_VERSION


class MigrationError(StorageError):
    """A migration cannot start or a step failed; the message says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message, category=ErrorCategory.SERVER_ERROR)


#: ``step(data_dir, db_path, progress)``: blocking; turns format N into N+1 (not ``FORMAT`` itself).
StepFunction = Callable[[Path, Path, ProgressCallback], None]


@attrs.frozen
class Migration:
    """One step: a format-``source`` directory becomes format ``source + 1``."""

    source: int
    description: str
    apply: StepFunction

    @property
    def target(self) -> int:
        return self.source + 1


@attrs.frozen
class MigrationResult:
    """What :func:`migrate_data_dir` found and did."""

    data_dir: Path
    from_format: int
    to_format: int
    steps: tuple[Migration, ...]
    dry_run: bool
    snapshot: SnapshotInfo | None = None

    @property
    def changed(self) -> bool:
        return bool(self.steps) and not self.dry_run


def plan(found: int, current: int, registry: Mapping[int, Migration]) -> tuple[Migration, ...]:
    """The steps from format ``found`` to ``current``; :class:`MigrationError` if one is missing."""
    steps = []
    for source in range(found, current):
        step = registry.get(source)
        if step is None:
            raise MigrationError(
                f"no migration from format {source} to {source + 1} in this amaters; upgrade through"
                " an intermediate amaters release that has it (see docs/upgrading.md)"
            )
        steps.append(step)
    return tuple(steps)


def _step_0_to_1(data_dir: Path, db_path: Path, progress: ProgressCallback) -> None:
    """Format 0 → 1: verify the database is amaters' (collections, decodable records) and mark it."""
    import rocksdict

    prefix = column_family_name("")
    names = rocksdict.Rdict.list_cf(str(db_path), rocksdict.Options(raw_mode=True))
    families = {n: rocksdict.Options(raw_mode=True) for n in names if n != "default"}
    foreign = sorted(n for n in families if not n.startswith(prefix))
    if foreign:
        raise MigrationError(
            f"{str(db_path)!r} has column families amaters never creates ({', '.join(foreign)});"
            " it is not an amaters database, so it is left as it is"
        )
    db = rocksdict.Rdict(str(db_path), rocksdict.Options(raw_mode=True), column_families=families or None)
    try:
        marker = db.get(FORMAT_KEY)
        if marker is not None and marker != b"1":
            raise MigrationError(
                f"{str(db_path)!r} has no FORMAT file but its database says format {marker!r};"
                " restore the FORMAT file that belongs to it instead of migrating"
            )
        checked = 0
        for name in families:
            collection = name[len(prefix) :]
            family = db.get_column_family(name)
            it = family.iter()
            it.seek_to_first()
            while it.valid():
                # Raises Corrupted naming the collection; the directory stays format 0.
                codec.decode(it.value(), where=f"a stored value in collection {collection!r}")
                checked += 1
                if checked % 10_000 == 0:
                    progress(checked, 0, "checking records")
                it.next()
            it.status()
            del it, family
        progress(checked, checked, "checking records")
        synced = rocksdict.WriteOptions()
        synced.sync = True
        db.put(FORMAT_KEY, b"1", synced)
    finally:
        db.close()


#: Every known step, by the format it starts from.
MIGRATIONS: Mapping[int, Migration] = {
    0: Migration(
        0,
        "check every collection and record, then write the format marker and the FORMAT file",
        _step_0_to_1,
    ),
}


def _acquire(lock: DataDirLock) -> None:
    if not lock.data_dir.is_dir():
        raise MigrationError(f"data directory {str(lock.data_dir)!r} does not exist: nothing to migrate")
    lock.acquire()


async def migrate_data_dir(
    config: Config,
    pools: Pools,
    *,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
    registry: Mapping[int, Migration] = MIGRATIONS,
    current: int = CURRENT_FORMAT,
    now: Callable[[], float] | None = None,
) -> MigrationResult:
    """Bring ``config``'s data directory to format ``current`` (see the module docstring).

    Raises ``DataDirLocked`` while a server holds the directory, :class:`MigrationError` when there
    is nothing to migrate or a step is missing, ``FormatMismatch`` for a directory newer than
    ``current``.  Blocking work runs in ``pools.io`` (steps, lock) and ``pools.cpu`` (snapshot).
    """
    report = progress or _no_progress
    data_dir = config.data_dir
    db_path = data_dir / "db"
    lock = DataDirLock(data_dir)
    await pools.io.run(_acquire, lock)
    try:
        found = await pools.io.run(formatfile.effective_format, data_dir, db_path)
        if found is None:
            raise MigrationError(f"data directory {str(data_dir)!r} holds no database: nothing to migrate")
        if found > current:
            # The same refusal a server gives, naming both versions.
            await pools.io.run(formatfile.check_data_dir, data_dir, db_path, current)
        steps = plan(found, current, registry)
        result = MigrationResult(data_dir, found, current, steps, dry_run)
        if dry_run or not steps:
            return result
        snapshot = await pools.cpu.run(
            pack_offline_blocking,
            data_dir,
            snapshot_dir(config),
            (now or time.time)(),
            config.snapshot.compression,
            found,
            report,
        )
        for step in steps:
            await pools.io.run(step.apply, data_dir, db_path, report)
            await pools.io.run(formatfile.write_format, data_dir, step.target)
        return attrs.evolve(result, snapshot=snapshot)
    finally:
        await pools.io.run(lock.release)


def describe(result: MigrationResult) -> list[str]:
    """Lines telling an operator what a migration found and did (or would do)."""
    where = str(result.data_dir)
    if not result.steps:
        return [f"{where}: already at format {result.to_format}; nothing to do"]
    verb = "would run" if result.dry_run else "ran"
    lines = [f"{where}: format {result.from_format} -> {result.to_format}; {verb}:"]
    lines += [f"  {s.source} -> {s.target}: {s.description}" for s in result.steps]
    if result.dry_run:
        lines.append("a snapshot of the directory would be taken first; nothing was changed")
    elif result.snapshot is not None:
        lines.append(f"snapshot taken before migrating: {result.snapshot.path}")
    return lines


__all__ = [
    "CURRENT_FORMAT",
    "MIGRATIONS",
    "Migration",
    "MigrationError",
    "MigrationResult",
    "describe",
    "migrate_data_dir",
    "plan",
]

"""The data directory's format file: ``<data_dir>/FORMAT``, checked before the database opens.

The file is one JSON object::

    {"format": 1, "written_by": "amaters 0.1.0"}

``format`` is the on-disk format of the whole data directory; it equals the RocksDB backend's
``FORMAT_VERSION`` (the same number is also stored inside the database, under
``amaters:format_version`` in the ``default`` column family, and checked once it is open).  The file
exists so that a server can refuse a directory *before* RocksDB opens it: opening a newer layout
with older code could write to it (RocksDB creates files and the backend writes its marker), so a
newer format must be refused without touching anything.

What :func:`check_data_dir` decides:

- ``FORMAT`` present, same format: open;
- ``FORMAT`` present, newer format: refuse, naming both versions and the upgrade path (run the
  newer amaters, or restore a snapshot taken before the upgrade);
- ``FORMAT`` present, older format, or no ``FORMAT`` next to an existing database (format 0: a data
  directory written before the format file existed): refuse and point to ``amaters migrate``;
- no ``FORMAT`` and no database: a new data directory; :func:`stamp_data_dir` writes the file once
  the database has opened.

Everything here is blocking file I/O for pool threads (or offline tools); nothing imports the
RocksDB backend, so the backend can call these functions without an import cycle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs

from amaters import __version__
from amaters.errors import Corrupted, ErrorCategory, StorageError

FORMAT_FILE_NAME = "FORMAT"

#: The format of a data directory that holds a database but no ``FORMAT`` file.
UNVERSIONED_FORMAT = 0


class FormatMismatch(StorageError):
    """The data directory's on-disk format is not the one this server reads."""

    def __init__(self, message: str, found: int, expected: int) -> None:
        super().__init__(message, category=ErrorCategory.SERVER_ERROR)
        self.found = found
        self.expected = expected


@attrs.frozen
class DataDirFormat:
    """What a data directory's ``FORMAT`` file says (``written_by`` '' when unknown)."""

    format: int
    written_by: str = ""

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "written_by": self.written_by}) + "\n"


def format_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / FORMAT_FILE_NAME


def has_database(db_path: str | os.PathLike[str]) -> bool:
    """Whether ``db_path`` holds a RocksDB database (its ``CURRENT`` file exists)."""
    return (Path(db_path) / "CURRENT").is_file()


def read_format(data_dir: str | os.PathLike[str]) -> DataDirFormat | None:
    """The data directory's ``FORMAT``, or None when the file does not exist.

    Raises :class:`~amaters.errors.Corrupted` naming the file when it is not the expected JSON.
    """
    path = format_path(data_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise Corrupted(f"cannot read the format file {str(path)!r}: {e}") from e
    try:
        data = json.loads(text)
        version = data["format"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(version)
        written_by = data.get("written_by", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise Corrupted(
            f"the format file {str(path)!r} is not valid: expected JSON like"
            ' {"format": 1, "written_by": "amaters 0.1.0"}'
        ) from None
    return DataDirFormat(version, str(written_by))


def effective_format(data_dir: str | os.PathLike[str], db_path: str | os.PathLike[str]) -> int | None:
    """The data directory's format: its ``FORMAT``, 0 for a database without one, None when new."""
    found = read_format(data_dir)
    if found is not None:
        return found.format
    return UNVERSIONED_FORMAT if has_database(db_path) else None


def check_data_dir(data_dir: str | os.PathLike[str], db_path: str | os.PathLike[str], current: int) -> None:
    """Refuse to go on unless the data directory is new or already in format ``current``.

    Call it with the data directory lock held and before the database opens.  Raises
    :class:`FormatMismatch` with a message naming both formats and what to do.
    """
    found = read_format(data_dir)
    if found is None:
        if not has_database(db_path):
            return  # a new data directory
        found = DataDirFormat(UNVERSIONED_FORMAT, "an amaters version before format files")
    if found.format == current:
        return
    where = str(Path(data_dir))
    written_by = f" (written by {found.written_by})" if found.written_by else ""
    if found.format > current:
        raise FormatMismatch(
            f"data directory {where!r} has on-disk format {found.format}{written_by}, newer than"
            f" format {current} that amaters {__version__} reads; run the amaters version that wrote"
            " it (or a newer one), or restore a snapshot taken before that upgrade into a new data"
            " directory. There is no downgrade.",
            found.format,
            current,
        )
    raise FormatMismatch(
        f"data directory {where!r} has on-disk format {found.format}{written_by}, older than format"
        f" {current} that amaters {__version__} reads; stop every server using it and run"
        " `amaters migrate --config <file>` (it takes a snapshot first)",
        found.format,
        current,
    )


def write_format(data_dir: str | os.PathLike[str], version: int) -> None:
    """Write ``FORMAT`` with ``version`` atomically and durably (temp file, fsync, rename, dir fsync)."""
    directory = Path(data_dir)
    target = format_path(directory)
    temp = directory / f".{FORMAT_FILE_NAME}.tmp"
    content = DataDirFormat(version, f"amaters {__version__}").to_json().encode()
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
        fsync_directory(directory)
    except OSError as e:
        raise StorageError(
            f"cannot write the format file {str(target)!r}: {e.strerror}",
            category=ErrorCategory.SERVER_ERROR,
        ) from e


def stamp_data_dir(data_dir: str | os.PathLike[str], current: int) -> None:
    """Write ``FORMAT`` = ``current`` if the data directory has none (after a new database opened)."""
    if not format_path(data_dir).exists():
        write_format(data_dir, current)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename or a new file in it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Reading the files auth settings name: secrets and TOML-or-JSON tables, with safe error messages.

Every error here names the file and what is wrong, never the file's content: these files hold
secrets or hashes of secrets, and the messages end up in logs and in ``amaters validate-config``.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class AuthConfigError(Exception):
    """Auth settings or files are invalid; ``problems`` lists every problem, one line each."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def read_structured_file(path: str, what: str) -> Any:
    """The parsed content of a TOML file, or of a JSON file when the name ends in ``.json``.

    Raises :class:`AuthConfigError` naming ``what`` (the setting) and the file.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise AuthConfigError([f"{what}: {path!r} does not exist"]) from None
    except IsADirectoryError:
        raise AuthConfigError([f"{what}: {path!r} is a directory, not a file"]) from None
    except OSError as e:
        raise AuthConfigError([f"{what}: cannot read {path!r} ({e.strerror or type(e).__name__})"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthConfigError([f"{what}: {path!r} is not UTF-8 text"]) from None
    if p.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            # The message gives a position, not the content.
            raise AuthConfigError(
                [f"{what}: {path!r} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"]
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AuthConfigError([f"{what}: {path!r} is not valid TOML ({e})"]) from None


def read_secret(value: str, file: str, key: str, file_key: str) -> bytes | None:
    """A secret given inline (``value``) or in a file (trailing newlines dropped), or None.

    Raises :class:`AuthConfigError` when both are given, the file is unreadable or empty.  The
    secret itself never appears in a message.
    """
    if value and file:
        raise AuthConfigError([f"{key}/{file_key}: set one of them, not both"])
    if value:
        return value.encode("utf-8")
    if not file:
        return None
    try:
        data = Path(file).read_bytes()
    except OSError as e:
        raise AuthConfigError(
            [f"{file_key}: cannot read {file!r} ({e.strerror or type(e).__name__})"]
        ) from None
    data = data.rstrip(b"\r\n")
    if not data:
        raise AuthConfigError([f"{file_key}: {file!r} is empty"])
    return data


def string_list(value: Any) -> tuple[str, ...] | None:
    """``value`` as a tuple of non-empty strings, or None when it is not a list of them."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return None
    return tuple(value)

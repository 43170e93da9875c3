"""``amaters auth``: make API keys and their hashes for the keys file.

- ``amaters auth new-key --name billing --role user``: a new key ``<id>.<secret>`` and the keys-file
  entry for it (TOML, or JSON with ``--format json``).  The key is printed once and never stored.
- ``amaters auth hash-key``: the ``key_hash`` of a key read from standard input (or typed at a
  prompt), for keys made some other way.

The pepper comes from ``--pepper-file``, or else from the server configuration (``--config``,
``--set``, ``AMATERS_AUTH__API_KEY_PEPPER``...): ``auth.api_key_pepper`` or
``auth.api_key_pepper_file``.  Keys are never taken as command-line arguments, which other users
may see in the process list and which end up in shell history.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import sys
from typing import Any

from amaters.auth.apikeys import check_pepper, generate_api_key, hash_api_key
from amaters.auth.files import AuthConfigError, read_secret

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class _Refused(Exception):
    """A problem to print on one line before exiting with ``status``."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def _err(message: str) -> None:
    print(f"amaters auth: {message}", file=sys.stderr)


def _pepper_settings(args: argparse.Namespace) -> tuple[str, str]:
    """``auth.api_key_pepper`` and ``auth.api_key_pepper_file`` from the configuration's sources.

    Only these two keys are read (with the usual precedence: file, environment, ``--set``), so the
    first key can be made before the keys file the configuration names exists.
    """
    import tomllib
    from pathlib import Path

    from amaters.config import env_overrides, parse_override

    values: dict[str, str] = {}
    base = Path.cwd()
    if args.config:
        path = Path(args.config)
        base = path.resolve().parent
        try:
            tree = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise _Refused(f"cannot read the configuration {args.config}: {type(e).__name__}") from None
        section = tree.get("auth", {})
        if isinstance(section, dict):
            for name in ("api_key_pepper", "api_key_pepper_file"):
                if isinstance(section.get(name), str):
                    values[name] = section[name]
    pairs = env_overrides(os.environ)
    for text in args.set or []:
        try:
            pairs.append(parse_override(text))
        except ValueError as e:
            raise _Refused(str(e)) from None
    for dotted, value in pairs:
        if dotted in ("auth.api_key_pepper", "auth.api_key_pepper_file"):
            values[dotted.split(".", 1)[1]] = value
    pepper_file = values.get("api_key_pepper_file", "")
    if pepper_file:
        pepper_file = str((base / os.path.expanduser(pepper_file)).resolve())
    return values.get("api_key_pepper", ""), pepper_file


def _pepper(args: argparse.Namespace) -> bytes:
    try:
        if args.pepper_file:
            pepper = read_secret("", args.pepper_file, "--pepper-file", "--pepper-file")
        else:
            value, file = _pepper_settings(args)
            pepper = read_secret(value, file, "auth.api_key_pepper", "auth.api_key_pepper_file")
        if pepper is None:
            raise _Refused(
                "no pepper: give --pepper-file, or a configuration (--config, --set or"
                " AMATERS_AUTH__API_KEY_PEPPER) with auth.api_key_pepper or auth.api_key_pepper_file"
            )
        check_pepper(pepper)
    except AuthConfigError as e:
        raise _Refused("; ".join(e.problems)) from None
    return pepper


def _expiry(args: argparse.Namespace) -> datetime.datetime | None:
    if args.expires and args.days is not None:
        raise _Refused("give --expires or --days, not both")
    if args.days is not None:
        if args.days <= 0:
            raise _Refused("--days must be positive")
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        return now + datetime.timedelta(days=args.days)
    if args.expires:
        try:
            moment = datetime.datetime.fromisoformat(args.expires.replace("z", "Z"))
        except ValueError:
            raise _Refused(
                f"--expires {args.expires!r}: expected a date-time like 2026-12-31T00:00:00Z"
            ) from None
        if moment.tzinfo is None:
            raise _Refused("--expires needs a UTC offset, e.g. 2026-12-31T00:00:00Z")
        return moment.astimezone(datetime.UTC)
    return None


def _roles(args: argparse.Namespace) -> list[str]:
    roles: list[str] = []
    for item in args.role or []:
        roles += [r.strip() for r in item.split(",") if r.strip()]
    return list(dict.fromkeys(roles))


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


def cmd_new_key(args: argparse.Namespace) -> int:
    """``amaters auth new-key``: print a new key and its keys-file entry."""
    pepper = _pepper(args)
    expires = _expiry(args)
    try:
        key_id, key = generate_api_key(args.id)
    except ValueError as e:
        raise _Refused(f"--id: {e}") from None
    entry: dict[str, Any] = {
        "id": key_id,
        "name": args.name or key_id,
        "key_hash": hash_api_key(pepper, key),
        "roles": _roles(args),
    }
    if expires is not None:
        entry["expires_at"] = expires.isoformat().replace("+00:00", "Z")
    if args.format == "json":
        print(json.dumps({"key": key, "entry": entry}, indent=2))
        return EXIT_OK
    # The key is deliberately not a TOML comment: pasted into the keys file by mistake, it makes the
    # file invalid (and refused) instead of sitting there in clear text.
    lines = [
        f"API key {key_id} (give it to the client now; it is not stored and cannot be shown again):",
        f"  {key}",
        "",
        "Keys file entry (add it to auth.api_keys_file, then reload the server):",
        "",
        "[[keys]]",
        f"id = {_toml_string(entry['id'])}",
        f"name = {_toml_string(entry['name'])}",
        f"key_hash = {_toml_string(entry['key_hash'])}",
        "roles = [" + ", ".join(_toml_string(r) for r in entry["roles"]) + "]",
    ]
    if "expires_at" in entry:
        lines.append(f"expires_at = {entry['expires_at']}")
    print("\n".join(lines))
    return EXIT_OK


def _read_key() -> str:
    # A prompt that does not echo on a terminal; the first line of a pipe otherwise.
    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
    key = key.rstrip("\r\n")
    if not key:
        raise _Refused("no key given on standard input")
    return key


def cmd_hash_key(args: argparse.Namespace) -> int:
    """``amaters auth hash-key``: print the key_hash of the key on standard input."""
    pepper = _pepper(args)
    print(hash_api_key(pepper, _read_key()))
    return EXIT_OK


def _guarded(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except _Refused as e:
            _err(str(e))
            return e.status

    run.__doc__ = func.__doc__
    return run


def add_commands(subparsers: Any) -> None:
    """Add ``amaters auth new-key`` and ``amaters auth hash-key`` to the ``amaters`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="FILE", help="server configuration (for the pepper)")
    common.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a setting (repeatable)"
    )
    common.add_argument(
        "--pepper-file", metavar="FILE", help="file holding the pepper (instead of the configuration)"
    )
    auth = subparsers.add_parser("auth", help="make API keys and key hashes")
    actions = auth.add_subparsers(dest="auth_command", metavar="ACTION", required=True)

    p = actions.add_parser(
        "new-key", parents=[common], help="generate an API key and print its keys-file entry"
    )
    p.add_argument("--id", help="key id (default: ak_ and 12 random hex digits)")
    p.add_argument("--name", help="display name (default: the id)")
    p.add_argument(
        "--role", action="append", metavar="ROLE", help="role of the key (repeatable, or comma-separated)"
    )
    p.add_argument("--expires", metavar="DATETIME", help="expiry, e.g. 2026-12-31T00:00:00Z")
    p.add_argument("--days", type=int, metavar="N", help="expire N days from now")
    p.add_argument("--format", choices=["toml", "json"], default="toml", help="output format")
    p.set_defaults(func=_guarded(cmd_new_key))

    p = actions.add_parser(
        "hash-key", parents=[common], help="print the key_hash of a key read from standard input"
    )
    p.set_defaults(func=_guarded(cmd_hash_key))


__all__ = ["add_commands", "cmd_hash_key", "cmd_new_key"]

"""``amaters fhe keygen|upload``, ``filter``, ``update``, and ``set``/``get`` of FHE records.

::

    amaters fhe keygen --schema age:8,balance:16 --out my.fhe
    amaters --fhe-keys my.fhe fhe upload
    amaters --fhe-keys my.fhe set people alice age=42,balance=1000
    amaters --fhe-keys my.fhe get people alice
    amaters --fhe-keys my.fhe filter people "age > 30 and not balance == 0"
    amaters --fhe-keys my.fhe update people "age > 30" "age=40,balance+=5,balance*=2"

Predicates: comparisons ``FIELD OP INT`` (``== != < <= > >=``) combined with ``and``, ``or``,
``not`` and parentheses.  Updates: ``FIELD=INT`` (set), ``FIELD+=INT`` (add), ``FIELD*=INT`` (mul).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from amaters.cli import client
from amaters.cli.client import FHE_COMMAND_TIMEOUT, _key_arg, _run, _show
from amaters.cli.common import EXIT_FAIL as EXIT_MISSING
from amaters.cli.common import EXIT_OK, EXIT_USAGE, CommandError
from amaters.cli.common import err as _err
from amaters.fhe.predicate import Predicate, UpdateOp, add, field, mul, set_
from amaters.fhe.schema import SchemaError

_TOKEN = re.compile(r"\s*(?:(\d+)|(==|!=|<=|>=|<|>)|([A-Za-z_][A-Za-z0-9_]*)|(\(|\)))")
_KEYWORDS = {"and", "or", "not"}


class ParseError(ValueError):
    """A predicate or update list that does not parse (one-line message)."""


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ParseError(f"unexpected {text[pos:].strip()[:20]!r} in predicate {text!r}")
        out.append(m.group(m.lastindex or 0))
        pos = m.end()
    return out


def parse_predicate(text: str) -> Predicate:
    """``"age > 30 and not balance == 0"`` as a predicate; raises :class:`ParseError`."""
    tokens = _tokens(text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ParseError(f"predicate {text!r} ends too early")
        pos += 1
        return tokens[pos - 1]

    def disjunction() -> Predicate:
        p = conjunction()
        while peek() == "or":
            take()
            p = p | conjunction()
        return p

    def conjunction() -> Predicate:
        p = negation()
        while peek() == "and":
            take()
            p = p & negation()
        return p

    def negation() -> Predicate:
        if peek() == "not":
            take()
            return ~negation()
        if peek() == "(":
            take()
            p = disjunction()
            if take() != ")":
                raise ParseError(f"missing ')' in predicate {text!r}")
            return p
        name = take()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in _KEYWORDS:
            raise ParseError(f"expected a field name, got {name!r} in predicate {text!r}")
        op = take()
        value = take()
        if not value.isdigit():
            raise ParseError(f"expected a number after {name} {op}, got {value!r}")
        f, v = field(name), int(value)
        table = {"==": f.__eq__, "!=": f.__ne__, "<": f.__lt__, "<=": f.__le__, ">": f.__gt__, ">=": f.__ge__}
        if op not in table:
            raise ParseError(f"expected one of == != < <= > >= after {name}, got {op!r}")
        result: Predicate = table[op](v)
        return result

    p = disjunction()
    if pos != len(tokens):
        raise ParseError(f"unexpected {tokens[pos]!r} in predicate {text!r}")
    return p


def parse_updates(text: str) -> list[UpdateOp]:
    """``"age=40,balance+=5,balance*=2"`` as updates; raises :class:`ParseError`."""
    out: list[UpdateOp] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\+=|\*=|=)\s*(\d+)\s*", part)
        if m is None:
            raise ParseError(f"update {part.strip()!r}: expected FIELD=N, FIELD+=N or FIELD*=N")
        name, op, value = m.group(1), m.group(2), int(m.group(3))
        out.append({"=": set_, "+=": add, "*=": mul}[op](name, value))
    return out


def parse_record(text: str) -> dict[str, int]:
    """``"age=42,balance=1000"`` as a record; raises :class:`ParseError`."""
    out: dict[str, int] = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\d+)\s*", part)
        if m is None:
            raise ParseError(f"record field {part.strip()!r}: expected FIELD=N")
        out[m.group(1)] = int(m.group(2))
    return out


def show_record(record: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in record.items())


# -- hooks into the client CLI ---------------------------------------------------------------


def add_commands(subparsers: Any) -> None:
    """``amaters fhe keygen|upload``, ``amaters filter`` and ``amaters update``; ``set`` and
    ``get`` (added by :mod:`amaters.cli.client`) take and show records when given ``--fhe-keys``."""
    common = client.client_options(suppress_defaults=True)
    for name, plain, record in (("set", client.cmd_set, cmd_set), ("get", client.cmd_get, cmd_get)):
        parser = subparsers.choices.get(name)
        if parser is not None:
            parser.set_defaults(func=_either(plain, record))
    fhe = subparsers.add_parser("fhe", help="homomorphic encryption keys (docs/fhe.md)")
    sub = fhe.add_subparsers(dest="fhe_command", metavar="COMMAND", required=True)
    p = sub.add_parser("keygen", help="generate an FHE key set for a schema (keep the file private)")
    p.add_argument("--schema", required=True, help="fields and widths, e.g. age:8,balance:16")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the key file (mode 0600)")
    p.add_argument(
        "--evaluator",
        choices=["concrete", "cleartext-insecure"],
        default="concrete",
        help="concrete (default) or cleartext-insecure (no encryption: tests only)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("upload", parents=[common], help="upload the public evaluation keys to the server")
    p.add_argument("file", nargs="?", help="the key file (default: --fhe-keys)")
    p.set_defaults(func=cmd_upload)

    p = subparsers.add_parser("filter", parents=[common], help="rows whose encrypted record matches")
    p.add_argument("collection")
    p.add_argument("predicate", help='e.g. "age > 30 and not balance == 0"')
    p.add_argument("--limit", type=int, metavar="N", help="examine at most N encrypted rows")
    p.set_defaults(func=cmd_filter)
    p = subparsers.add_parser("update", parents=[common], help="update the rows a predicate selects")
    p.add_argument("collection")
    p.add_argument("predicate", help='e.g. "age > 30"')
    p.add_argument("updates", help='e.g. "age=40,balance+=5,balance*=2"')
    p.set_defaults(func=cmd_update)


def _either(plain: Any, record: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        return int(record(args) if getattr(args, "fhe_keys", None) else plain(args))

    return run


def _keys(args: argparse.Namespace, path: str | None = None) -> Any:

    path = path or getattr(args, "fhe_keys", None)
    if not path:
        raise CommandError("this command needs --fhe-keys FILE (from `amaters fhe keygen`)", EXIT_USAGE)
    try:
        from amaters.fhe.keys import FheKeys

        return FheKeys.load(path)
    except FileNotFoundError:
        raise CommandError(f"--fhe-keys {path}: no such file", EXIT_USAGE) from None
    except ImportError:
        raise CommandError("FHE keys need concrete-python: pip install 'amaters[fhe]'", EXIT_USAGE) from None
    except SchemaError as e:
        raise CommandError(str(e), EXIT_USAGE) from None


def _usage(error: Exception) -> Any:

    return CommandError(str(error), EXIT_USAGE)


def cmd_keygen(args: argparse.Namespace) -> int:

    try:
        if os.path.exists(args.out) and not args.force:
            raise CommandError(f"{args.out} exists; pass --force to replace it", EXIT_USAGE)
        from amaters.fhe.keys import FheKeys
        from amaters.fhe.schema import Schema

        schema = Schema.parse(args.schema)
        if args.evaluator == "concrete":
            print("generating FHE keys (about 10-30 s)...", file=sys.stderr)
        keys = FheKeys.generate(schema, evaluator=args.evaluator)
        keys.save(args.out)
    except CommandError as e:
        _err(str(e))
        return e.status
    except SchemaError as e:
        _err(str(e))
        return EXIT_USAGE
    except ImportError:
        _err("FHE keys need concrete-python: pip install 'amaters[fhe]'")
        return EXIT_USAGE
    print(f"wrote {args.out} (schema {schema}, key set {keys.key_set_id.hex()[:16]}...); keep it private")
    return EXIT_OK


def cmd_upload(args: argparse.Namespace) -> int:

    keys = _loaded(args, args.file)
    if isinstance(keys, int):
        return keys

    async def body(client: Any) -> int:
        stored = await client.upload_keys(keys)
        size = len(keys.evaluation_keys())
        print(
            f"{'uploaded' if stored else 'already on the server:'} key set {keys.key_set_id.hex()} ({size} bytes)"
        )
        return EXIT_OK

    return _run(args, body, FHE_COMMAND_TIMEOUT)


def _loaded(args: argparse.Namespace, path: str | None = None) -> Any:

    try:
        return _keys(args, path)
    except CommandError as e:
        _err(str(e))
        return e.status


def cmd_set(args: argparse.Namespace) -> int:
    """``set COLLECTION KEY age=42,balance=1000`` with --fhe-keys: store an encrypted record."""

    keys = _loaded(args)
    if isinstance(keys, int):
        return keys
    try:
        record = keys.schema.check_record(parse_record(args.value))
        key = _key_arg(args, args.key)
    except (ParseError, SchemaError) as e:
        _err(str(e))
        return int(_usage(e).status)

    async def body(client: Any) -> int:
        await client.set_record(args.collection, key, keys, record)
        return EXIT_OK

    return _run(args, body)


def cmd_get(args: argparse.Namespace) -> int:

    keys = _loaded(args)
    if isinstance(keys, int):
        return keys
    key = _key_arg(args, args.key)

    async def body(client: Any) -> int:
        blob = await client.get_blob(args.collection, key)
        if blob is None:
            raise CommandError(f"{args.collection}/{args.key}: not found", EXIT_MISSING)
        try:
            print(show_record(keys.decrypt(blob.data)))
        except SchemaError as e:
            raise CommandError(str(e), EXIT_MISSING) from None
        return EXIT_OK

    return _run(args, body)


def cmd_filter(args: argparse.Namespace) -> int:

    keys = _loaded(args)
    if isinstance(keys, int):
        return keys
    try:
        predicate = parse_predicate(args.predicate)
        keys.encrypt_predicate(predicate)  # unknown fields and out-of-range constants, before connecting
    except (ParseError, SchemaError) as e:
        _err(str(e))
        return int(_usage(e).status)

    async def body(client: Any) -> int:
        rows = await client.filter(args.collection, predicate, keys=keys, limit=args.limit)
        for key, record in rows:
            print(f"{_show(key)}\t{show_record(record)}")
        return EXIT_OK

    return _run(args, body, FHE_COMMAND_TIMEOUT)


def cmd_update(args: argparse.Namespace) -> int:

    keys = _loaded(args)
    if isinstance(keys, int):
        return keys
    try:
        predicate = parse_predicate(args.predicate)
        updates = parse_updates(args.updates)
        keys.encrypt_predicate(predicate)
        keys.encrypt_updates(updates)
    except (ParseError, SchemaError) as e:
        _err(str(e))
        return int(_usage(e).status)

    async def body(client: Any) -> int:
        rewritten = await client.update(args.collection, predicate, updates, keys=keys)
        print(f"{rewritten} encrypted rows rewritten")
        return EXIT_OK

    return _run(args, body, FHE_COMMAND_TIMEOUT)

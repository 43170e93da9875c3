"""Client commands of the ``amaters`` command: set, get, delete, range, collections, info, ping, keygen.

``amaters.cli`` builds the parser and calls :func:`add_commands`; each command is stored as
``args.func(args) -> int``.  Every command runs the Twisted client under ``task.react`` and prints
one clear line on stderr for any failure (no traceback), with a non-zero exit status:

- 0: success;
- 1: the key (or collection) does not exist, or the server refused the request;
- 2: bad usage, or the client could not connect (refused, TLS failure, timeout).

Keys on the command line are UTF-8 text unless ``--hex`` says they are hexadecimal (for binary keys).
Values are bytes: ``set`` takes them from the argument (UTF-8) or from standard input with ``-``;
``get`` writes them raw to standard output.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from amaters.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CommandError, err
from amaters.client import DEFAULT_PORT, AmatersClient

EXIT_MISSING = EXIT_FAIL

DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_CA = Path("amaters-data") / "tls" / "ca.pem"
DEFAULT_KEY_FILE = "amaters.key"
#: The deadline of a command without ``--timeout``, and of one that waits for homomorphic work or
#: for a key set to be stored (the library's own deadline for such a request).
COMMAND_TIMEOUT = 10.0
FHE_COMMAND_TIMEOUT = AmatersClient.FHE_TIMEOUT


# -- options ---------------------------------------------------------------------------------


def client_options(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The options every client command takes (a parent parser).

    They are accepted before the command (``amaters --ca F get ...``, on the top-level parser, which
    holds the defaults) and after it (``amaters get ... --ca F``): the command's copies use
    ``suppress_defaults`` so that an option not given there keeps the top-level value.
    """
    parent = _OptionParser(add_help=False, suppress_defaults=suppress_defaults)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=os.environ.get("AMATERS_SERVER", DEFAULT_SERVER),
        help=f"server address (default: $AMATERS_SERVER or {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--ca",
        metavar="FILE",
        default=os.environ.get("AMATERS_CA"),
        help=f"CA certificate to trust (default: $AMATERS_CA, or ./{DEFAULT_CA} when it exists)",
    )
    group.add_argument("--client-cert", metavar="FILE", help="client certificate (mutual TLS)")
    group.add_argument("--client-key", metavar="FILE", help="client certificate's private key")
    creds = group.add_mutually_exclusive_group()
    creds.add_argument(
        "--token",
        metavar="JWT",
        default=os.environ.get("AMATERS_TOKEN"),
        help="bearer token (default: $AMATERS_TOKEN)",
    )
    creds.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("AMATERS_API_KEY"),
        help="API key (default: $AMATERS_API_KEY)",
    )
    group.add_argument(
        "--plaintext", action="store_true", help="no TLS (only for a server with tls.enabled = false)"
    )
    group.add_argument(
        "--key-file",
        metavar="FILE",
        default=os.environ.get("AMATERS_KEY_FILE"),
        help="encrypt/decrypt values with this key file (from `amaters keygen`; default: $AMATERS_KEY_FILE)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=(
            f"one deadline for the whole command (default: {COMMAND_TIMEOUT:g}; {FHE_COMMAND_TIMEOUT:g} for"
            " fhe upload, filter and update, which wait for homomorphic work or a key set's storage)"
        ),
    )
    group.add_argument("--hex", action="store_true", help="keys on the command line are hexadecimal")
    group.add_argument(
        "--fhe-keys",
        metavar="FILE",
        default=os.environ.get("AMATERS_FHE_KEYS"),
        help="FHE key file (from `amaters fhe keygen`): set/get take and show records, filter and"
        " update use it (default: $AMATERS_FHE_KEYS; docs/fhe.md)",
    )
    return parent


class _OptionParser(argparse.ArgumentParser):
    """An ArgumentParser whose arguments can all default to "not given" (argparse.SUPPRESS)."""

    def __init__(self, *args: Any, suppress_defaults: bool = False, **kwargs: Any) -> None:
        self._suppress_defaults = suppress_defaults  # read by add_argument_group during __init__
        super().__init__(*args, **kwargs)

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        group = super().add_argument_group(*args, **kwargs)
        if self._suppress_defaults and args and args[0] == "connection":
            _suppressing(group)
        return group


def _suppressing(container: Any) -> None:
    add = container.add_argument
    add_group = container.add_mutually_exclusive_group

    def add_argument(*args: Any, **kwargs: Any) -> Any:
        kwargs["default"] = argparse.SUPPRESS
        return add(*args, **kwargs)

    def add_mutually_exclusive_group(*args: Any, **kwargs: Any) -> Any:
        group = add_group(*args, **kwargs)
        _suppressing(group)
        return group

    container.add_argument = add_argument
    container.add_mutually_exclusive_group = add_mutually_exclusive_group


def add_commands(subparsers: Any) -> None:
    """Add the client commands to the ``amaters`` command's subparsers."""
    common = client_options(suppress_defaults=True)

    p = subparsers.add_parser("set", parents=[common], help="store a value")
    p.add_argument("collection")
    p.add_argument("key")
    p.add_argument("value", help="the value (UTF-8), or - to read it from standard input")
    p.set_defaults(func=cmd_set)

    p = subparsers.add_parser("get", parents=[common], help="print a value (exit 1 when missing)")
    p.add_argument("collection")
    p.add_argument("key")
    p.set_defaults(func=cmd_get)

    p = subparsers.add_parser("delete", parents=[common], help="delete a key (exit 1 when missing)")
    p.add_argument("collection")
    p.add_argument("key")
    p.set_defaults(func=cmd_delete)

    p = subparsers.add_parser("range", parents=[common], help="list keys in [START, END)")
    p.add_argument("collection")
    p.add_argument("start", help="first key (inclusive); '' for the beginning")
    p.add_argument("end", help="end key (exclusive); '' for the end of the collection")
    p.add_argument("--limit", type=int, metavar="N", help="at most N entries")
    p.add_argument("--keys-only", action="store_true", help="print keys only")
    p.set_defaults(func=cmd_range)

    p = subparsers.add_parser("collections", parents=[common], help="list, create or drop collections")
    p.add_argument("action", nargs="?", choices=["list", "create", "drop"], default="list")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_collections)

    p = subparsers.add_parser("info", parents=[common], help="server version, capabilities and uptime")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("ping", parents=[common], help="round trip to the server")
    p.set_defaults(func=cmd_ping)

    p = subparsers.add_parser("keygen", help="write a new client-side encryption key file")
    p.add_argument("file", nargs="?", help=f"where to write it (default: --key-file or ./{DEFAULT_KEY_FILE})")
    p.add_argument("--key-file", metavar="FILE", default=None, help="same as FILE")
    p.add_argument(
        "--force", action="store_true", help="replace an existing file (its values become unreadable)"
    )
    p.set_defaults(func=cmd_keygen)


# -- plumbing --------------------------------------------------------------------------------


def _parse_server(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, DEFAULT_PORT
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise CommandError(f"--server {text!r}: expected HOST:PORT", EXIT_USAGE) from None
    if not 0 < number < 65536:
        raise CommandError(f"--server {text!r}: port out of range", EXIT_USAGE)
    return host or "127.0.0.1", number


def _key_arg(args: argparse.Namespace, text: str, what: str = "key") -> bytes:
    if args.hex:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise CommandError(f"{what} {text!r} is not hexadecimal", EXIT_USAGE) from None
    return text.encode()


def _show(data: bytes) -> str:
    """Bytes for a terminal: UTF-8 where valid, backslash escapes elsewhere (and for tabs/newlines)."""
    text = data.decode("utf-8", errors="backslashreplace")
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


async def _connect(reactor: Any, args: argparse.Namespace, timeout: float) -> AmatersClient:
    from amaters.client import connect
    from amaters.crypto import AESGCMCipher, KeyFileError

    host, port = _parse_server(args.server)
    ca = args.ca
    if ca is None and not args.plaintext and DEFAULT_CA.exists():
        ca = str(DEFAULT_CA)
    cipher = None
    if args.key_file:
        try:
            cipher = AESGCMCipher.from_file(args.key_file)
        except KeyFileError as e:
            raise CommandError(str(e), EXIT_USAGE) from None
    return await connect(
        reactor,
        host,
        port,
        ca_cert=ca,
        client_cert=args.client_cert,
        client_key=args.client_key,
        token=args.token,
        api_key=args.api_key,
        plaintext=args.plaintext,
        timeout=timeout,
        cipher=cipher,
    )


def _run(
    args: argparse.Namespace,
    body: Callable[[AmatersClient], Coroutine[Any, Any, int]],
    default_timeout: float = COMMAND_TIMEOUT,
) -> int:
    """Connect, run ``body``, close; turn every failure into one line and an exit status.

    ``--timeout`` (else ``default_timeout``) is one deadline for the whole command: connecting
    (TCP, TLS handshake, protocol handshake), the requests and closing.  When it passes, the
    connection is dropped.
    """
    from twisted.internet import defer, task

    from amaters.errors import AmatersError, ErrorCode, RequestTimeout

    status = [EXIT_OK]

    async def main(reactor: Any) -> None:
        client: AmatersClient | None = None
        timeout = args.timeout if args.timeout is not None else default_timeout
        deadline = reactor.seconds() + timeout
        watchdog = None
        try:
            client = await _connect(reactor, args, timeout)
            connected = client

            def expire() -> None:
                connected.abort(RequestTimeout(f"no answer from {args.server} within {timeout:g} s"))

            watchdog = reactor.callLater(max(0.0, deadline - reactor.seconds()), expire)
            status[0] = await body(client)
        except CommandError as e:
            err(str(e))
            status[0] = e.status
        except AmatersError as e:
            err(f"{e.code.name}: {e.message}")
            network = int(e.code) // 1000 == 1
            status[0] = EXIT_USAGE if network else EXIT_MISSING
            if e.code == ErrorCode.NETWORK_TLS_HANDSHAKE and args.ca is None and not DEFAULT_CA.exists():
                err("hint: pass --ca with the server's CA certificate (<data_dir>/tls/ca.pem)")
        except Exception as e:
            err(f"unexpected error: {e}")
            status[0] = EXIT_MISSING
        finally:
            if client is not None and not client.closed:
                await client.close(timeout=max(0.0, deadline - reactor.seconds()))
            if watchdog is not None and watchdog.active():
                watchdog.cancel()

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    except SystemExit:
        pass
    return status[0]


# -- commands --------------------------------------------------------------------------------


def cmd_set(args: argparse.Namespace) -> int:
    key = _key_arg(args, args.key)
    value = sys.stdin.buffer.read() if args.value == "-" else args.value.encode()

    async def body(client: AmatersClient) -> int:
        await client.set(args.collection, key, value)
        return EXIT_OK

    return _run(args, body)


def cmd_get(args: argparse.Namespace) -> int:
    key = _key_arg(args, args.key)

    async def body(client: AmatersClient) -> int:
        value = await client.get(args.collection, key)
        if value is None:
            raise CommandError(f"not found: key {args.key!r} in collection {args.collection!r}")
        out = sys.stdout.buffer
        out.write(value)
        if sys.stdout.isatty() and not value.endswith(b"\n"):
            out.write(b"\n")
        out.flush()
        return EXIT_OK

    return _run(args, body)


def cmd_delete(args: argparse.Namespace) -> int:
    key = _key_arg(args, args.key)

    async def body(client: AmatersClient) -> int:
        if await client.delete(args.collection, key):
            print("deleted")
            return EXIT_OK
        raise CommandError(f"not found: key {args.key!r} in collection {args.collection!r}")

    return _run(args, body)


def cmd_range(args: argparse.Namespace) -> int:
    start = _key_arg(args, args.start, "start")
    end = _key_arg(args, args.end, "end") if args.end else None
    if args.limit is not None and args.limit < 0:
        err("--limit must be at least 0")
        return EXIT_USAGE

    async def body(client: AmatersClient) -> int:
        count = 0
        async for chunk in client.scan(args.collection, start, end, args.limit):
            lines = []
            for key, value in chunk:
                shown_key = key.hex() if args.hex else _show(key)
                lines.append(shown_key if args.keys_only else f"{shown_key}\t{_show(value)}")
            count += len(chunk)
            if lines:
                print("\n".join(lines), flush=True)
        return EXIT_OK

    return _run(args, body)


def cmd_collections(args: argparse.Namespace) -> int:
    if args.action in ("create", "drop") and not args.name:
        err(f"collections {args.action} needs a NAME")
        return EXIT_USAGE

    async def body(client: AmatersClient) -> int:
        if args.action == "create":
            created = await client.create_collection(args.name)
            print("created" if created else "already exists")
        elif args.action == "drop":
            if not await client.drop_collection(args.name):
                raise CommandError(f"not found: collection {args.name!r}")
            print("dropped")
        else:
            for name in await client.list_collections():
                print(name)
        return EXIT_OK

    return _run(args, body)


def cmd_info(args: argparse.Namespace) -> int:
    async def body(client: AmatersClient) -> int:
        info = await client.server_info()
        hs = client.handshake
        print(f"server:       {hs.server_name} at {args.server}")
        print(f"protocol:     {'.'.join(map(str, info.version))}")
        print(f"supported:    {', '.join('.'.join(map(str, v)) for v in info.supported_versions)}")
        print(f"capabilities: {', '.join(info.capabilities)}")
        print(f"uptime:       {info.uptime_seconds} s")
        print(f"principal:    {hs.principal} (roles: {', '.join(hs.roles) or '-'})")
        return EXIT_OK

    return _run(args, body)


def cmd_ping(args: argparse.Namespace) -> int:
    async def body(client: AmatersClient) -> int:
        seconds = await client.ping()
        print(f"pong from {args.server} in {seconds * 1000:.2f} ms")
        return EXIT_OK

    return _run(args, body)


def cmd_keygen(args: argparse.Namespace) -> int:
    from amaters.crypto import AESGCMCipher, KeyFileError

    path = args.file or args.key_file or DEFAULT_KEY_FILE
    try:
        AESGCMCipher.generate(path, overwrite=args.force)
    except KeyFileError as e:
        err(str(e))
        return EXIT_MISSING
    except OSError as e:
        err(f"cannot write {path}: {e.strerror or e}")
        return EXIT_MISSING
    print(
        f"wrote a new AES-256-GCM key to {path} (mode 0600); keep a copy: values encrypted with it are unreadable without it"
    )
    return EXIT_OK

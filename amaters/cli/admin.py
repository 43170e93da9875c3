"""``amaters admin ...``: the admin API from the command line.

``amaters admin status|collections|stats|compact|reload|snapshots [--create [--upload]]`` and
``amaters admin fhe-keys [--delete ID]`` call the running server's ops site (``web.listen`` from
the config) with ``--token`` or ``--api-key`` (or the ``AMATERS_TOKEN`` / ``AMATERS_API_KEY``
environment variables).  Output is the JSON the server
answers; errors are one line on stderr with a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from amaters.cli.common import config_options, endpoint_url, err, load
from amaters.config import Config


class AdminError(Exception):
    """The admin call failed; the message is one line for the operator."""


def admin_url(config: Config) -> str:
    if not config.web.enabled:
        raise AdminError("the ops site is disabled (web.enabled = false): no admin API")
    return endpoint_url(config.web.listen) + "/admin"


def call_admin(
    config: Config,
    method: str,
    path: str,
    *,
    token: str | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> Any:
    """Call the admin API; returns the decoded JSON, or raises AdminError with the server's message."""
    token = token or os.environ.get("AMATERS_TOKEN")
    api_key = api_key or os.environ.get("AMATERS_API_KEY")
    # The ops site refuses admin requests without it while auth is off (a web page cannot send it).
    headers = {"X-Amaters-Admin": "1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif api_key:
        headers["Authorization"] = f"ApiKey {api_key}"
    url = admin_url(config) + path
    request = urllib.request.Request(
        url, method=method, headers=headers, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read())
            message = body.get("message") or body.get("error") or str(e.code)
        except (ValueError, AttributeError):
            message = f"HTTP {e.code}"
        raise AdminError(f"{url}: {e.code} {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise AdminError(f"{url}: cannot reach the server ({getattr(e, 'reason', e)})") from None


ROUTES = {
    "status": ("GET", "/status"),
    "collections": ("GET", "/collections"),
    "stats": ("GET", "/stats"),
    "compact": ("POST", "/compact"),
    "reload": ("POST", "/reload"),
}


def cmd_admin(args: argparse.Namespace) -> int:
    config = load(args)
    if args.action == "snapshots":
        query = "?upload=1" if args.upload else ""
        method, path = ("POST", "/snapshots" + query) if args.create else ("GET", "/snapshots")
        if args.remote and not args.create:
            path = "/snapshots?remote=1"
    elif args.action == "fhe-keys":
        method, path = (
            ("DELETE", "/fhe/keys/" + urllib.parse.quote(args.delete, safe=""))
            if args.delete
            else ("GET", "/fhe/keys")
        )
    else:
        method, path = ROUTES[args.action]
    try:
        body = call_admin(
            config, method, path, token=getattr(args, "token", None), api_key=getattr(args, "api_key", None)
        )
    except AdminError as e:
        err(str(e))
        return 1
    json.dump(body, sys.stdout, indent=2, sort_keys=True)
    print()
    if args.action == "reload" and isinstance(body, dict) and not body.get("ok", False):
        return 1
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``admin ACTION``."""
    p = subparsers.add_parser(
        "admin", parents=[config_options()], help="call the running server's admin API (admin role)"
    )
    p.add_argument("action", choices=[*ROUTES, "snapshots", "fhe-keys"], help="what to do")
    # Default "not given": the same options before the command (top-level) keep their value.
    p.add_argument("--token", default=argparse.SUPPRESS, help="JWT bearer token (or AMATERS_TOKEN)")
    p.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (or AMATERS_API_KEY)")
    p.add_argument("--create", action="store_true", help="snapshots: take one now")
    p.add_argument("--upload", action="store_true", help="snapshots --create: also upload to S3")
    p.add_argument("--remote", action="store_true", help="snapshots: list the S3 bucket")
    p.add_argument("--delete", metavar="ID", help="fhe-keys: delete the key set with this id (64 hex)")
    p.set_defaults(func=cmd_admin)

"""``amaters cluster status|nodes|shards``: the cluster as a running node sees it.

The commands call the node's admin API (``GET /admin/cluster`` on ``web.listen`` from the config,
admin role, with ``--token``/``--api-key`` like ``amaters admin``).  ``status`` prints the whole
view as JSON; ``nodes`` one line per registered node (``*`` marks the node holding singleton
duties); ``shards`` one line per etcd member of each shard (``*`` marks the Raft leader).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from amaters.cli.admin import AdminError, call_admin
from amaters.cli.common import config_options, err, load


def cmd_cluster(args: argparse.Namespace) -> int:
    config = load(args)
    try:
        view = call_admin(
            config,
            "GET",
            "/cluster",
            token=getattr(args, "token", None),
            api_key=getattr(args, "api_key", None),
        )
    except AdminError as e:
        err(str(e))
        return 1
    if args.action == "status":
        json.dump(view, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0 if view.get("quorum") else 1
    if args.action == "nodes":
        for node in view.get("nodes", []):
            mark = "*" if node.get("leader") else " "
            print(f"{mark} {node.get('name')}\t{node.get('advertise')}\t{node.get('version')}")
        return 0
    for shard in view.get("shards", []):
        for member in shard.get("members", []):
            mark = "*" if member.get("leader") else " "
            state = "up" if member.get("reachable") else "unreachable"
            size = member.get("db_size", "")
            print(f"{shard.get('name')}\t{mark} {member.get('endpoint')}\t{state}\t{size}")
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``cluster ACTION``."""
    p = subparsers.add_parser(
        "cluster", parents=[config_options()], help="show the cluster a running node belongs to (admin role)"
    )
    p.add_argument("action", choices=["status", "nodes", "shards"], help="what to show")
    p.add_argument("--token", default=argparse.SUPPRESS, help="JWT bearer token (or AMATERS_TOKEN)")
    p.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (or AMATERS_API_KEY)")
    p.set_defaults(func=cmd_cluster)

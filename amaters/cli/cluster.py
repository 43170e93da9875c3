"""``amaters cluster status|nodes|shards|add-shard NAME URL...|move VSHARD SHARD``.

The commands call a running node's admin API (``/admin/cluster`` on ``web.listen`` from the config,
admin role, with ``--token``/``--api-key`` like ``amaters admin``).  ``status`` prints the whole
view as JSON; ``nodes`` one line per registered node (``*`` marks the node holding singleton
duties); ``shards`` one line per etcd member of each shard (``*`` marks the Raft leader) and the
number of virtual shards each shard holds.  ``add-shard`` adds an etcd cluster as a shard and moves
it an even share of virtual shards online; ``move`` moves one virtual shard.  Both print the result
as JSON.  ``snapshot DIR`` takes etcd's snapshot of every shard straight from the etcd members in
the config's ``cluster.endpoints`` (and the shard map), with a manifest of SHA-256 sums;
``verify-snapshot DIR`` checks the files against it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import urlencode

from amaters.cli.admin import AdminError, call_admin
from amaters.cli.common import config_options, err, load


def cmd_snapshot(args: argparse.Namespace, config: Any) -> int:
    from pathlib import Path

    from amaters.cluster.snapshot import SnapshotError, snapshot_cluster, verify_snapshot

    if len(args.args) != 1:
        err(f"usage: amaters cluster {args.action} DIR")
        return 2
    try:
        if args.action == "snapshot":
            if not config.cluster.endpoints:
                err("cluster.endpoints is not set in the configuration: not a clustered server")
                return 2
            manifest = snapshot_cluster(config.cluster.endpoints, config.cluster.prefix, Path(args.args[0]))
        else:
            manifest = verify_snapshot(Path(args.args[0]))
    except SnapshotError as e:
        err(str(e))
        return 1
    for name, shard in sorted(manifest["shards"].items()):
        print(f"{name}\t{shard['file']}\t{shard['bytes']} bytes\tsha256 {shard['sha256']}")
    print("verified" if args.action == "verify-snapshot" else f"snapshot written to {args.args[0]}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    config = load(args)
    if args.action in ("snapshot", "verify-snapshot"):
        return cmd_snapshot(args, config)
    method, path = "GET", "/cluster"
    if args.action == "add-shard":
        if len(args.args) < 2:
            err("usage: amaters cluster add-shard NAME URL [URL...]")
            return 2
        query = urlencode([("name", args.args[0]), *(("endpoint", url) for url in args.args[1:])])
        method, path = "POST", "/cluster/shards?" + query
    elif args.action == "move":
        if len(args.args) != 2 or not args.args[0].isdigit():
            err("usage: amaters cluster move VSHARD SHARD")
            return 2
        method, path = "POST", "/cluster/move?" + urlencode({"vshard": args.args[0], "to": args.args[1]})
    try:
        view = call_admin(
            config, method, path, token=getattr(args, "token", None), api_key=getattr(args, "api_key", None)
        )
    except AdminError as e:
        err(str(e))
        return 1
    if method == "POST":
        json.dump(view, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
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
            vshards = len(shard.get("vshards", []))
            print(f"{shard.get('name')}\t{mark} {member.get('endpoint')}\t{state}\t{size}\t{vshards} vshards")
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``cluster ACTION``."""
    p = subparsers.add_parser(
        "cluster",
        parents=[config_options()],
        help="show or reshard the cluster a running node belongs to (admin role)",
    )
    p.add_argument(
        "action",
        choices=["status", "nodes", "shards", "add-shard", "move", "snapshot", "verify-snapshot"],
        help="what to show or do",
    )
    p.add_argument("args", nargs="*", help="add-shard: NAME URL...; move: VSHARD SHARD; snapshot: DIR")
    p.add_argument("--token", default=argparse.SUPPRESS, help="JWT bearer token (or AMATERS_TOKEN)")
    p.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (or AMATERS_API_KEY)")
    p.set_defaults(func=cmd_cluster)

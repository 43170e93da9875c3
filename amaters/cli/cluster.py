"""``amaters cluster status|nodes|shards|add-shard|remove-shard|move|snapshot|verify-snapshot|restore``.

The commands call a running node's admin API (``/admin/cluster`` on ``web.listen`` from the config,
admin role, with ``--token``/``--api-key`` like ``amaters admin``).  ``status`` prints the whole
view as JSON; ``nodes`` one line per registered node (``*`` marks the node holding singleton
duties); ``shards`` one line per etcd member of each shard (``*`` marks the Raft leader) and the
number of virtual shards each shard holds.  ``add-shard`` adds an etcd cluster as a shard and moves
it an even share of virtual shards online; ``remove-shard`` moves every virtual shard off a shard
and drops it; ``move`` moves one virtual shard.  They print the result as JSON.

``snapshot DIR`` takes etcd's snapshot of every shard straight from the etcd members in the
config's ``cluster.endpoints`` (and the shard map), with a manifest of SHA-256 sums and each shard's
members; ``snapshot s3://BUCKET/PREFIX`` stages it in a temporary directory and uploads it with
``[snapshot.s3]``'s endpoint, region and credentials (the manifest last, never over an existing
one).  ``verify-snapshot DIR|s3://...`` checks the files against the manifest.  ``restore SOURCE
--into DIR`` verifies every file (downloading first from S3), rebuilds every member of every shard
with ``etcdctl snapshot restore`` and prints the ``etcd`` command that starts each member; progress
goes to stderr, results to stdout, a failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from amaters.cli.admin import AdminError, call_admin
from amaters.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CommandError, config_options, err, load


def _s3_store(config: Any, url: str) -> tuple[Any, str]:
    """An S3 store for ``s3://bucket/prefix`` (endpoint, region and credentials as for
    ``[snapshot.s3]``) whose keys are ``prefix/<file>``; and the URL, normalised."""
    import attrs

    from amaters.storage.s3 import S3Settings, S3Store, parse_s3_url

    try:
        bucket, key = parse_s3_url(url)
    except ValueError:
        raise CommandError(f"{url!r} is not an s3://bucket/prefix URL", EXIT_USAGE) from None
    prefix = key.strip("/") + "/"
    settings = attrs.evolve(S3Settings.from_config(config.snapshot.s3), bucket=bucket, prefix=prefix)
    return S3Store(settings), f"s3://{bucket}/{prefix}"


def _upload(config: Any, directory: Path, url: str, printer: Any) -> None:
    """Upload a cluster snapshot's files, each with its SHA-256 in the object's metadata, the
    manifest last (a snapshot without its manifest is incomplete); refuses to overwrite one."""
    from amaters.cluster.snapshot import MANIFEST, file_sha256, read_manifest

    store, where = _s3_store(config, url)
    manifest = read_manifest(directory / MANIFEST)
    for shard in sorted(manifest["shards"].values(), key=lambda s: str(s["file"])):
        store.upload_blocking(directory / shard["file"], shard["sha256"], progress=printer)
        printer.close()
    store.upload_blocking(directory / MANIFEST, file_sha256(directory / MANIFEST)[0], progress=printer)
    printer.close()
    print(f"uploaded to {where}", file=sys.stderr)


def _download(config: Any, url: str, directory: Path, printer: Any) -> None:
    """Download a cluster snapshot into ``directory``: the manifest, then every shard file, each
    checked against the SHA-256 in its object's metadata and then in the manifest."""
    from amaters.cluster.snapshot import MANIFEST, SnapshotError, read_manifest, verify_snapshot

    store, where = _s3_store(config, url)
    if not store.exists_blocking(store.key_for(MANIFEST)):
        raise SnapshotError(f"no cluster snapshot at {where} (no {MANIFEST} there)")
    store.download_blocking(store.key_for(MANIFEST), directory, printer)
    printer.close()
    manifest = read_manifest(directory / MANIFEST)
    for shard in sorted(manifest["shards"].values(), key=lambda s: str(s["file"])):
        store.download_blocking(store.key_for(shard["file"]), directory, printer)
        printer.close()
    verify_snapshot(directory)


def cmd_snapshot(args: argparse.Namespace, config: Any) -> int:
    """``snapshot DIR|s3://...``, ``verify-snapshot DIR|s3://...``, ``restore SOURCE --into DIR``."""
    import shlex
    import shutil
    import tempfile

    from amaters.cli.snapshot import ProgressPrinter
    from amaters.cluster.snapshot import (
        SnapshotError,
        check_target,
        find_etcdctl,
        parse_member,
        restore_cluster,
        shard0_endpoints,
        snapshot_cluster,
        verify_snapshot,
    )
    from amaters.errors import AmatersError

    if len(args.args) != 1:
        what = "SOURCE --into DIR" if args.action == "restore" else "DIR|s3://BUCKET/PREFIX"
        err(f"usage: amaters cluster {args.action} {what}")
        return EXIT_USAGE
    if args.action == "restore" and not args.into:
        err("usage: amaters cluster restore SOURCE --into DIR (DIR: a new or empty directory)")
        return EXIT_USAGE
    if args.action != "restore" and (args.into or args.member):
        err(f"--into and --member are options of restore, not of {args.action}")
        return EXIT_USAGE
    target = args.args[0]
    remote = target.startswith("s3://")
    printer = ProgressPrinter()
    staging: Path | None = None
    started = time.monotonic()
    try:
        if args.action == "snapshot":
            if not config.cluster.endpoints:
                err("cluster.endpoints is not set in the configuration: not a clustered server")
                return EXIT_USAGE
            directory = Path(target)
            if remote:
                store, where = _s3_store(config, target)
                if store.exists_blocking(store.key_for("manifest.json")):
                    raise SnapshotError(f"{where} already holds a cluster snapshot (manifest.json)")
                staging = Path(tempfile.mkdtemp(prefix="amaters-cluster-snapshot-"))
                directory = staging / "snapshot"
            manifest = snapshot_cluster(config.cluster.endpoints, config.cluster.prefix, directory)
            if remote:
                _upload(config, directory, target, printer)
        elif args.action == "verify-snapshot":
            directory = Path(target)
            if remote:
                staging = Path(tempfile.mkdtemp(prefix="amaters-cluster-verify-"))
                directory = staging
                _download(config, target, directory, printer)
            manifest = verify_snapshot(directory)
        else:
            try:
                overrides = [parse_member(spec) for spec in args.member or []]
            except SnapshotError as e:
                raise CommandError(str(e), EXIT_USAGE) from None
            into = Path(args.into)
            check_target(into)
            etcdctl = find_etcdctl()
            source = Path(target)
            if remote:
                staging = Path(tempfile.mkdtemp(prefix="amaters-cluster-restore-"))
                source = staging
                _download(config, target, source, printer)
            restored = restore_cluster(
                source,
                into,
                overrides=overrides,
                etcdctl=etcdctl,
                progress=lambda line: print(line, file=sys.stderr, flush=True),
            )
            shards = sorted({r.shard for r in restored})
            print(
                f"restored {len(shards)} shards ({len(restored)} etcd members) into {into}"
                f" in {time.monotonic() - started:.1f} s; start every member:"
            )
            for r in restored:
                print(f"# shard {r.shard}, member {r.member.name}")
                print(shlex.join(r.command))
            endpoints = json.dumps(shard0_endpoints(restored))
            print(f"# then start the nodes with cluster.endpoints = {endpoints}")
            return EXIT_OK
    except SnapshotError as e:
        printer.close()
        err(str(e))
        return EXIT_FAIL
    except CommandError as e:
        printer.close()
        err(str(e))
        return e.status
    except AmatersError as e:
        printer.close()
        err(e.message)
        return EXIT_FAIL
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    for name, shard in sorted(manifest["shards"].items()):
        print(f"{name}\t{shard['file']}\t{shard['bytes']} bytes\tsha256 {shard['sha256']}")
    if args.action == "verify-snapshot":
        print("verified")
    else:
        print(f"snapshot written to {target}")
    return EXIT_OK


def cmd_cluster(args: argparse.Namespace) -> int:
    config = load(args)
    if args.action in ("snapshot", "verify-snapshot", "restore"):
        return cmd_snapshot(args, config)
    method, path = "GET", "/cluster"
    if args.action == "add-shard":
        if len(args.args) < 2:
            err("usage: amaters cluster add-shard NAME URL [URL...]")
            return 2
        query = urlencode([("name", args.args[0]), *(("endpoint", url) for url in args.args[1:])])
        method, path = "POST", "/cluster/shards?" + query
    elif args.action == "remove-shard":
        if len(args.args) != 1:
            err("usage: amaters cluster remove-shard NAME")
            return 2
        method, path = "DELETE", "/cluster/shards/" + quote(args.args[0], safe="")
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
    if method in ("POST", "DELETE"):
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
        choices=[
            "status",
            "nodes",
            "shards",
            "add-shard",
            "remove-shard",
            "move",
            "snapshot",
            "verify-snapshot",
            "restore",
        ],
        help="what to show or do",
    )
    p.add_argument(
        "args",
        nargs="*",
        help="add-shard: NAME URL...; remove-shard: NAME; move: VSHARD SHARD; snapshot, verify-snapshot, restore:"
        " DIR or s3://BUCKET/PREFIX",
    )
    p.add_argument("--into", metavar="DIR", help="restore: the new or empty directory to restore into")
    p.add_argument(
        "--member",
        action="append",
        metavar="SHARD/NAME=PEER_URL,CLIENT_URL",
        help="restore: one etcd member of a shard (repeat per member); replaces that shard's members"
        " from the manifest (needed for snapshots that record none)",
    )
    p.add_argument("--token", default=argparse.SUPPRESS, help="JWT bearer token (or AMATERS_TOKEN)")
    p.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (or AMATERS_API_KEY)")
    p.set_defaults(func=cmd_cluster)

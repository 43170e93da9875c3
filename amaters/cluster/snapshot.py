"""Snapshots of a whole cluster: etcd's own snapshot of every shard, with one manifest; restore.

``snapshot_cluster`` asks one member of each shard (shard 0 from ``cluster.endpoints``, the others
from the shard map) for etcd's snapshot (``/v3/maintenance/snapshot``, streamed) and for its member
list (``/v3/cluster/member/list``), and writes ``shard-<shard>.db`` files and ``manifest.json``
(format 2: shard endpoints and members, file sizes, SHA-256 of each file, the shard map).
``verify_snapshot`` checks every file against the manifest.  ``restore_cluster`` verifies, then
rebuilds every member of every shard with ``etcdctl snapshot restore`` into
``<into>/shard-<shard>/<member>.etcd`` and returns the ``etcd`` command line that starts each one.
Manifests of format 1 (no members) restore only with an explicit member layout.  Blocking I/O and
subprocesses: for command-line tools and threads, never the reactor.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

MANIFEST = "manifest.json"
#: The manifest format written; 1 (no member lists) is still read.
FORMAT = 2
#: Shard and member names become file names on restore: keep them to these characters.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
#: etcd's limit on the operations of one transaction, as docs/cluster.md recommends it for amaters.
MAX_TXN_OPS = 10000


class SnapshotError(Exception):
    """A snapshot could not be taken, does not verify or cannot be restored; the message is one line."""


@attrs.frozen
class Member:
    """One etcd member of a shard, as restore needs it."""

    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "peer_urls": list(self.peer_urls), "client_urls": list(self.client_urls)}


@attrs.frozen
class RestoredMember:
    """A member rebuilt from a shard's snapshot: its data directory and the command that starts it."""

    shard: str
    member: Member
    data_dir: Path
    command: tuple[str, ...]


def _post(url: str, body: dict[str, Any], timeout: float) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    return urllib.request.urlopen(request, timeout=timeout)


def _shard_map(endpoints: list[str], prefix: str, timeout: float) -> dict[str, Any] | None:
    key = base64.b64encode(prefix.encode() + b"shardmap").decode()
    last = ""
    for endpoint in endpoints:
        try:
            with _post(endpoint.rstrip("/") + "/v3/kv/range", {"key": key}, timeout) as response:
                answer = json.loads(response.read())
        except (OSError, ValueError) as e:
            last = f"{endpoint}: {e}"
            continue
        kvs = answer.get("kvs") or []
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None
    raise SnapshotError(f"cannot read the shard map from any member of shard 0 ({last})")


def _members(name: str, endpoints: list[str], timeout: float) -> list[Member]:
    """The shard's etcd members (name, peer and client URLs), by name, from the first member that
    answers."""
    last = ""
    for endpoint in endpoints:
        try:
            with _post(endpoint.rstrip("/") + "/v3/cluster/member/list", {}, timeout) as response:
                answer = json.loads(response.read())
            found = [
                Member(
                    str(m.get("name", "")),
                    tuple(str(u) for u in m.get("peerURLs") or ()),
                    tuple(str(u) for u in m.get("clientURLs") or ()),
                )
                for m in answer.get("members") or []
            ]
            return sorted(found, key=lambda m: m.name)
        except (OSError, ValueError, AttributeError, TypeError) as e:
            last = f"{endpoint}: {e}"
    raise SnapshotError(f"shard {name}: cannot list its etcd members from any endpoint ({last})")


def _snapshot_shard(endpoints: list[str], path: Path, timeout: float) -> tuple[str, str, int]:
    """Stream one member's snapshot into ``path``; (endpoint used, sha256, bytes)."""
    last = ""
    decoder = json.JSONDecoder()
    for endpoint in endpoints:
        digest = hashlib.sha256()
        size = 0
        try:
            with (
                _post(endpoint.rstrip("/") + "/v3/maintenance/snapshot", {}, timeout) as response,
                path.open("wb") as out,
            ):
                buffer = ""
                while True:
                    data = response.read(1 << 16)
                    if data:
                        buffer += data.decode("ascii")
                    while True:
                        text = buffer.lstrip()
                        if not text:
                            buffer = ""
                            break
                        try:
                            message, end = decoder.raw_decode(text)
                        except ValueError:
                            buffer = text
                            break
                        buffer = text[end:]
                        if "error" in message:
                            raise SnapshotError(str(message["error"].get("message", message["error"])))
                        blob = base64.b64decode(message.get("result", {}).get("blob", ""))
                        out.write(blob)
                        digest.update(blob)
                        size += len(blob)
                    if not data:
                        break
        except (OSError, ValueError, SnapshotError) as e:
            last = f"{endpoint}: {e}"
            continue
        if size == 0:
            last = f"{endpoint}: empty snapshot"
            continue
        return endpoint, digest.hexdigest(), size
    raise SnapshotError(f"no member gave a snapshot ({last})")


def snapshot_cluster(
    endpoints: list[str], prefix: str, directory: Path, timeout: float = 60.0
) -> dict[str, Any]:
    """Snapshot every shard into the new directory ``directory``; returns the manifest."""
    if directory.exists() and any(directory.iterdir()):
        raise SnapshotError(f"{directory} exists and is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    shard_map = _shard_map(endpoints, prefix, timeout)
    shards: dict[str, list[str]] = {"0": list(endpoints)}
    if shard_map:
        shards.update({name: list(eps) for name, eps in shard_map["shards"].items() if name != "0"})
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created_at": time.time(),
        "shard_map": shard_map,
        "shards": {},
    }
    for name, shard_endpoints in sorted(shards.items()):
        file = f"shard-{name}.db"
        members = _members(name, shard_endpoints, timeout)
        used, sha256, size = _snapshot_shard(shard_endpoints, directory / file, timeout)
        manifest["shards"][name] = {
            "file": file,
            "sha256": sha256,
            "bytes": size,
            "endpoints": shard_endpoints,
            "members": [m.to_dict() for m in members],
            "taken_from": used,
        }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def file_sha256(path: Path) -> tuple[str, int]:
    """(SHA-256 hex, size) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path``, its shape checked: every shard names a plain file name, a size and
    a SHA-256; the format is one this version reads."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SnapshotError(f"cannot read {path}: {e}") from None
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("shards"), dict)
        or not manifest["shards"]
    ):
        raise SnapshotError(f"{path} is not a cluster snapshot manifest (no shards)")
    version = manifest.get("format")
    if not isinstance(version, int) or version < 1:
        raise SnapshotError(f"{path}: no valid manifest format")
    if version > FORMAT:
        raise SnapshotError(f"{path} has manifest format {version}; this amaters reads up to {FORMAT}")
    for name, shard in manifest["shards"].items():
        ok = (
            isinstance(shard, dict)
            and isinstance(shard.get("file"), str)
            and _SAFE_NAME.match(shard["file"]) is not None
            and isinstance(shard.get("bytes"), int)
            and isinstance(shard.get("sha256"), str)
        )
        if not ok:
            raise SnapshotError(f"{path}: shard {name!r} has no valid file, bytes and sha256")
    return manifest


def verify_snapshot(directory: Path) -> dict[str, Any]:
    """Check every shard file against the manifest (size and SHA-256); returns the manifest."""
    manifest = read_manifest(directory / MANIFEST)
    for name, shard in sorted(manifest["shards"].items()):
        path = directory / shard["file"]
        try:
            sha256, size = file_sha256(path)
        except OSError as e:
            raise SnapshotError(f"shard {name}: cannot read {path}: {e.strerror}") from None
        if size != shard["bytes"] or sha256 != shard["sha256"]:
            raise SnapshotError(f"shard {name}: {path} does not match its SHA-256 in the manifest")
    return manifest


# -- restore ---------------------------------------------------------------------------------------


def parse_member(spec: str) -> tuple[str, Member]:
    """``(shard, member)`` of ``SHARD/NAME=PEER_URL,CLIENT_URL`` (a ``--member`` option)."""
    left, sep, urls = spec.partition("=")
    shard, slash, name = left.partition("/")
    peer, comma, client = urls.partition(",")
    if not (sep and slash and comma and shard and name and peer.strip() and client.strip()) or "," in client:
        raise SnapshotError(f"--member {spec!r}: expected SHARD/NAME=PEER_URL,CLIENT_URL")
    return shard, Member(name, (peer.strip(),), (client.strip(),))


def member_layout(
    manifest: dict[str, Any], overrides: Iterable[tuple[str, Member]] = ()
) -> dict[str, list[Member]]:
    """Each shard's members to restore: from ``overrides`` (``--member``) where given, else from the
    manifest.  Refuses (one line) a shard without members, names that are not plain file names,
    members without URLs, and a layout that moves a shard other than shard 0 to client URLs the
    restored shard map does not list (nodes find those shards through the map)."""
    given: dict[str, list[Member]] = {}
    for shard, member in overrides:
        if shard not in manifest["shards"]:
            raise SnapshotError(f"--member names shard {shard!r}, which is not in this snapshot")
        given.setdefault(shard, []).append(member)
    layout: dict[str, list[Member]] = {}
    for shard, entry in sorted(manifest["shards"].items()):
        if shard in given:
            members = given[shard]
        elif isinstance(entry.get("members"), list) and entry["members"]:
            try:
                members = [
                    Member(str(m["name"]), tuple(m["peer_urls"]), tuple(m["client_urls"]))
                    for m in entry["members"]
                ]
            except (KeyError, TypeError):
                raise SnapshotError(f"shard {shard}: the manifest's member list is malformed") from None
        else:
            raise SnapshotError(
                f"shard {shard}: this snapshot (manifest format {manifest['format']}) records no etcd members;"
                " take a new snapshot with this amaters, or give each member with"
                " --member SHARD/NAME=PEER_URL,CLIENT_URL"
            )
        if not _SAFE_NAME.match(shard):
            raise SnapshotError(
                f"shard name {shard!r} cannot be a directory name; it cannot be restored here"
            )
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise SnapshotError(f"shard {shard}: two members are named the same")
        for m in members:
            if not _SAFE_NAME.match(m.name):
                raise SnapshotError(
                    f"shard {shard}: member name {m.name!r} is empty or not a plain file name"
                    " (a member added but never started has no name); give the layout with --member"
                )
            if not m.peer_urls or not m.client_urls:
                raise SnapshotError(
                    f"shard {shard}: member {m.name} has no peer or no client URL; use --member"
                )
        if shard != "0" and shard in given:
            mapped = ((manifest.get("shard_map") or {}).get("shards") or {}).get(shard)
            clients = {u for m in members for u in m.client_urls}
            if mapped is not None and clients != set(mapped):
                raise SnapshotError(
                    f"shard {shard}: the restored shard map reaches it at {','.join(mapped)};"
                    " its members must keep those client URLs"
                )
        layout[shard] = members
    return layout


def find_etcdctl() -> str:
    """The path of ``etcdctl`` on PATH (one-line SnapshotError when there is none)."""
    found = shutil.which("etcdctl")
    if found is None:
        raise SnapshotError(
            "etcdctl is not on PATH: install etcd's client tools (Debian: apt-get install etcd-client)"
        )
    return found


def check_target(into: Path) -> None:
    """Refuse a restore target that exists and is not an empty directory."""
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise SnapshotError(f"{into} exists and is not empty: restore into a new or empty directory")


def start_command(member: Member, data_dir: Path) -> tuple[str, ...]:
    """The ``etcd`` command that starts ``member`` on its restored data directory (listening on its
    advertised URLs; the cluster's membership comes from the data directory)."""
    peers = ",".join(member.peer_urls)
    clients = ",".join(member.client_urls)
    return (
        "etcd",
        "--name",
        member.name,
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        clients,
        "--advertise-client-urls",
        clients,
        "--listen-peer-urls",
        peers,
        "--initial-advertise-peer-urls",
        peers,
        "--max-txn-ops",
        str(MAX_TXN_OPS),
    )


def _etcdctl_failure(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error")]
    text = (errors or lines or ["no output"])[-1]
    return text[:300]


def restore_cluster(
    source: Path,
    into: Path,
    *,
    overrides: Iterable[tuple[str, Member]] = (),
    progress: Callable[[str], None] | None = None,
    etcdctl: str | None = None,
    timeout: float = 600.0,
) -> list[RestoredMember]:
    """Rebuild every member of every shard of the snapshot in ``source`` under ``into``.

    Before anything is written: ``into`` must be absent or empty, ``etcdctl`` on PATH, every file
    must match the manifest's size and SHA-256, and every shard must have a member layout (see
    :func:`member_layout`).  Then each member is restored with ``etcdctl snapshot restore`` into
    ``into/shard-<shard>/<member>.etcd`` with its name, the shard's initial cluster, a fresh
    cluster token per shard and its peer URLs.  If a restore fails, what this call created is
    removed.  Returns the restored members with the command that starts each.
    """
    say = progress or (lambda line: None)
    check_target(into)
    etcdctl = etcdctl or find_etcdctl()
    manifest = verify_snapshot(source)
    layout = member_layout(manifest, overrides)
    say(f"verified {len(layout)} shard files against {source / MANIFEST}")
    created_into = not into.exists()
    into.mkdir(parents=True, exist_ok=True)
    restored: list[RestoredMember] = []
    env = {**os.environ, "ETCDCTL_API": "3"}
    try:
        for shard, members in layout.items():
            file = source / manifest["shards"][shard]["file"]
            token = f"amaters-{shard}-{secrets.token_hex(6)}"
            initial = ",".join(f"{m.name}={url}" for m in members for url in m.peer_urls)
            shard_dir = into / f"shard-{shard}"
            shard_dir.mkdir()
            for member in members:
                data_dir = shard_dir / f"{member.name}.etcd"
                started = time.monotonic()
                argv = [
                    etcdctl,
                    "snapshot",
                    "restore",
                    str(file),
                    "--name",
                    member.name,
                    "--data-dir",
                    str(data_dir),
                    "--initial-cluster",
                    initial,
                    "--initial-cluster-token",
                    token,
                    "--initial-advertise-peer-urls",
                    ",".join(member.peer_urls),
                ]
                try:
                    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
                except subprocess.TimeoutExpired:
                    raise SnapshotError(
                        f"shard {shard}: etcdctl snapshot restore for member {member.name} took over {timeout:.0f} s"
                    ) from None
                if run.returncode != 0:
                    raise SnapshotError(
                        f"shard {shard}: etcdctl snapshot restore for member {member.name} failed:"
                        f" {_etcdctl_failure(run.stderr)}"
                    )
                say(
                    f"shard {shard}: member {member.name} restored into {data_dir} ({time.monotonic() - started:.2f} s)"
                )
                restored.append(
                    RestoredMember(shard, member, data_dir, start_command(member, data_dir.resolve()))
                )
    except BaseException:
        if created_into:
            shutil.rmtree(into, ignore_errors=True)
        else:
            for child in into.iterdir():
                shutil.rmtree(child, ignore_errors=True)
        raise
    return restored


def shard0_endpoints(restored: list[RestoredMember]) -> list[str]:
    """The client URLs of shard 0's restored members (``cluster.endpoints`` for the nodes)."""
    return [url for r in restored if r.shard == "0" for url in r.member.client_urls]


__all__ = [
    "FORMAT",
    "MANIFEST",
    "Member",
    "RestoredMember",
    "SnapshotError",
    "check_target",
    "file_sha256",
    "find_etcdctl",
    "member_layout",
    "parse_member",
    "read_manifest",
    "restore_cluster",
    "shard0_endpoints",
    "snapshot_cluster",
    "verify_snapshot",
]

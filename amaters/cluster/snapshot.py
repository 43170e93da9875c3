"""Snapshots of a whole cluster: etcd's own snapshot of every shard, with one manifest.

``snapshot_cluster`` asks one member of each shard (shard 0 from ``cluster.endpoints``, the others
from the shard map) for etcd's snapshot (``/v3/maintenance/snapshot``, streamed), writes
``<shard>.db`` files and ``manifest.json`` (shard endpoints, file sizes, SHA-256 of each file, the
shard map).  ``verify_snapshot`` checks every file against the manifest.  A shard's file is an
ordinary etcd snapshot: ``etcdctl snapshot restore`` rebuilds that shard's cluster from it
(docs/cluster.md).  Blocking I/O: for command-line tools and threads, never the reactor.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class SnapshotError(Exception):
    """A snapshot could not be taken or does not verify; the message is one line."""


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
    manifest: dict[str, Any] = {"format": 1, "created_at": time.time(), "shard_map": shard_map, "shards": {}}
    for name, shard_endpoints in sorted(shards.items()):
        file = f"shard-{name}.db"
        used, sha256, size = _snapshot_shard(shard_endpoints, directory / file, timeout)
        manifest["shards"][name] = {
            "file": file,
            "sha256": sha256,
            "bytes": size,
            "endpoints": shard_endpoints,
            "taken_from": used,
        }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_snapshot(directory: Path) -> dict[str, Any]:
    """Check every shard file against the manifest (size and SHA-256); returns the manifest."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise SnapshotError(f"cannot read {directory / MANIFEST}: {e}") from None
    for name, shard in manifest.get("shards", {}).items():
        path = directory / shard["file"]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SnapshotError(f"shard {name}: cannot read {path}: {e.strerror}") from None
        if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise SnapshotError(f"shard {name}: {path} does not match its SHA-256 in the manifest")
    return manifest

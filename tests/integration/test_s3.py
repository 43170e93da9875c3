"""Snapshots on S3 against a real S3-compatible server: moto's standalone server on 127.0.0.1.

The server runs as a subprocess for this module.  Requests are authenticated like real S3: an IAM
user with an access key is created while the server still accepts anything, then authentication is
switched on (moto's ``/moto-api/reset-auth``), so a wrong secret key gets S3's real
``SignatureDoesNotMatch``.  boto3 calls run in the test thread (synchronous pools).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from harness import free_port
from twisted.internet import defer

from amaters.cli import main
from amaters.config import Config, load_config
from amaters.storage.rocksdb import RocksDBBackend
from amaters.storage.snapshot import (
    SnapshotCorrupted,
    SnapshotInfo,
    create_snapshot,
    restore_archive,
    verify_archive,
)
from amaters.types import CipherBlob

pytestmark = pytest.mark.integration

try:
    import boto3
    import moto.server  # noqa: F401
except ImportError:  # pragma: no cover - the test extras install both
    pytest.skip('moto[server] is not installed (pip install "moto[server]")', allow_module_level=True)

from s3_helpers import REGION, S3Server  # noqa: E402
from storage_helpers import open_backend, result_of, sync_pools  # noqa: E402

from amaters.storage.s3 import S3Error, S3Settings, S3Store  # noqa: E402

#: Key prefix of the tests' archives.  No "/" in it: moto's signature check mishandles a "/" in a
#: query parameter (getmoto/moto#5948), so a ListObjects with Prefix="a/b/" fails there with
#: SignatureDoesNotMatch although real S3 accepts it.  Keys with "/" in the path are fine.
PREFIX = "nightly-"


# -- helpers -----------------------------------------------------------------------------------


def dump(backend: RocksDBBackend) -> dict[str, list[tuple[bytes, CipherBlob]]]:
    out: dict[str, list[tuple[bytes, CipherBlob]]] = {}
    for name in result_of(backend.list_collections()):
        cursor = backend.scan(name, b"", None, None, 10_000)
        entries: list[tuple[bytes, CipherBlob]] = []
        while chunk := result_of(cursor.next_chunk()):
            entries.extend(chunk)
        out[name] = entries
    return out


def make_config(data_dir: Path, server: S3Server, bucket: str, *settings: str) -> Config:
    return load_config(
        None,
        [
            f"server.data_dir={data_dir}",
            f"snapshot.s3.endpoint_url={server.endpoint}",
            f"snapshot.s3.bucket={bucket}",
            f"snapshot.s3.region={REGION}",
            f"snapshot.s3.prefix={PREFIX}",
            *settings,
        ],
        {},
    )


def store_for(config: Config, server: S3Server, **session: str) -> S3Store:
    return S3Store(S3Settings.from_config(config.snapshot.s3), lambda: server.session(**session))


def snapshot(backend: RocksDBBackend, config: Config, store: S3Store) -> SnapshotInfo:
    info: SnapshotInfo = result_of(
        defer.Deferred.fromCoroutine(create_snapshot(backend, config, sync_pools(), upload=True, s3=store))
    )
    return info


# -- tests -------------------------------------------------------------------------------------


def test_round_trip_upload_download_verify_restore(s3_server: S3Server, tmp_path: Path) -> None:
    """A snapshot uploaded with its sha256 in the object's metadata, listed, downloaded elsewhere,
    verified and restored, holds exactly the data of the store it was taken from."""
    bucket = s3_server.new_bucket()
    data_dir = tmp_path / "data"
    backend = open_backend(data_dir)
    result_of(backend.create_collection("users"))
    for i in range(200):
        result_of(
            backend.put("users", b"user:%03d" % i, CipherBlob.wrap(os.urandom(100), created_at=i, version=1))
        )
    config = make_config(data_dir, s3_server, bucket)
    store = store_for(config, s3_server)
    info = snapshot(backend, config, store)
    expected = dump(backend)
    result_of(backend.close())

    assert info.remote == f"s3://{bucket}/{PREFIX}{info.name}"
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{PREFIX}{info.name}")
    assert head["Metadata"]["sha256"] == info.sha256
    assert head["Metadata"]["amaters-format"] == "1"
    assert [(r.name, r.size) for r in store.list_blocking()] == [(info.name, info.size)]

    elsewhere = tmp_path / "elsewhere"
    seen: list[str] = []
    path = store.download_blocking(f"{PREFIX}{info.name}", elsewhere, lambda d, t, s: seen.append(s))
    assert path == elsewhere / info.name
    assert {"downloading", "checking download"} <= set(seen)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
    verify_archive(path)
    restored_dir = tmp_path / "restored"
    restore_archive(path, restored_dir)
    restored = open_backend(restored_dir)
    try:
        assert dump(restored) == expected
    finally:
        result_of(restored.close())
    # A second download of the same archive reuses the verified local copy.
    assert store.download_blocking(f"{PREFIX}{info.name}", elsewhere) == path


def test_large_archive_uses_multipart_upload(s3_server: S3Server, tmp_path: Path) -> None:
    """An archive above snapshot.s3.multipart_threshold_bytes goes up in parts (the object's ETag
    has a part count) and still round-trips with a matching sha256."""
    bucket = s3_server.new_bucket()
    data_dir = tmp_path / "data"
    backend = open_backend(data_dir)
    result_of(backend.create_collection("blobs"))
    for i in range(12):  # ~12 MiB of incompressible ciphertext
        result_of(backend.put("blobs", b"%02d" % i, CipherBlob.wrap(os.urandom(1024 * 1024))))
    config = make_config(
        data_dir,
        s3_server,
        bucket,
        "snapshot.compression=none",
        f"snapshot.s3.multipart_threshold_bytes={5 * 1024 * 1024}",
    )
    store = store_for(config, s3_server)
    progress: list[tuple[int, int, str]] = []
    info = result_of(
        defer.Deferred.fromCoroutine(
            create_snapshot(
                backend, config, sync_pools(), lambda *p: progress.append(p), upload=True, s3=store
            )
        )
    )
    result_of(backend.close())
    assert info.size > 10 * 1024 * 1024
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{PREFIX}{info.name}")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # 12+ MiB in 5 MiB parts
    uploading = [(d, t) for d, t, s in progress if s == "uploading"]
    assert uploading[-1] == (info.size, info.size)

    path = store.download_blocking(f"{PREFIX}{info.name}", tmp_path / "down")
    assert verify_archive(path).collections == {"blobs": 12}


def test_download_with_wrong_checksum_is_refused(s3_server: S3Server, tmp_path: Path) -> None:
    """An object whose bytes do not match the sha256 in its metadata is refused and not kept."""
    bucket = s3_server.new_bucket()
    name = "amaters-20250101T000000.000Z.tar"
    s3_server.client().put_object(
        Bucket=bucket, Key=f"{PREFIX}{name}", Body=b"tampered", Metadata={"sha256": "0" * 64}
    )
    config = make_config(tmp_path / "data", s3_server, bucket)
    store = store_for(config, s3_server)
    with pytest.raises(SnapshotCorrupted, match="fails its sha256 check"):
        store.download_blocking(f"{PREFIX}{name}", tmp_path / "down")
    assert list((tmp_path / "down").iterdir()) == []


def test_wrong_secret_key_is_a_clear_error(s3_server: S3Server, tmp_path: Path) -> None:
    """A wrong secret key fails upload, list and download with "S3 rejected the credentials
    (SignatureDoesNotMatch)", never a traceback or the key; an unknown key id is named as such."""
    bucket = s3_server.new_bucket()
    data_dir = tmp_path / "data"
    backend = open_backend(data_dir)
    result_of(backend.create_collection("c"))
    result_of(backend.put("c", b"k", CipherBlob.wrap(b"v")))
    config = make_config(data_dir, s3_server, bucket)
    good = snapshot(backend, config, store_for(config, s3_server))
    bad = store_for(config, s3_server, secret="not-the-secret")
    with pytest.raises(S3Error) as upload:
        snapshot(backend, config, bad)
    result_of(backend.close())
    with pytest.raises(S3Error) as listing:
        bad.list_blocking()
    with pytest.raises(S3Error) as download:
        bad.download_blocking(f"{PREFIX}{good.name}", tmp_path / "down")
    for caught in (upload, listing, download):
        message = caught.value.message
        assert message.startswith("S3 rejected the credentials (SignatureDoesNotMatch)"), message
        assert "not-the-secret" not in message and s3_server.secret not in message
        assert caught.value.s3_code == "SignatureDoesNotMatch"
    # The local archive of the failed upload is kept.
    assert len(list((data_dir / "snapshots").glob("*.tar.zst"))) == 2

    with pytest.raises(S3Error, match=r"S3 rejected the credentials \(InvalidAccessKeyId\)"):
        store_for(config, s3_server, key_id="AKIAUNKNOWN000000000").list_blocking()


def test_missing_bucket_and_unreachable_endpoint(s3_server: S3Server, tmp_path: Path) -> None:
    """A bucket that does not exist and an endpoint nobody listens on are named in the error."""
    config = make_config(tmp_path, s3_server, "no-such-bucket-here")
    with pytest.raises(S3Error, match=r"bucket 'no-such-bucket-here' does not exist .*\(NoSuchBucket\)"):
        store_for(config, s3_server).list_blocking()
    dead = load_config(
        None,
        [
            f"server.data_dir={tmp_path}",
            f"snapshot.s3.endpoint_url=http://127.0.0.1:{free_port()}",
            "snapshot.s3.bucket=b",
            f"snapshot.s3.region={REGION}",
        ],
        {},
    )
    store = S3Store(S3Settings.from_config(dead.snapshot.s3), lambda: s3_server.session())
    store._client = _no_retry_client(store)  # type: ignore[method-assign]
    with pytest.raises(S3Error, match=r"cannot reach S3 at http://127\.0\.0\.1"):
        store.list_blocking()


def _no_retry_client(store: S3Store) -> Any:
    """A client factory like the store's, without retries (an unreachable endpoint fails at once)."""
    from botocore.config import Config as BotoConfig

    def client() -> Any:
        return boto3.session.Session(aws_access_key_id="a", aws_secret_access_key="b").client(
            "s3",
            endpoint_url=store.settings.endpoint_url,
            region_name=REGION,
            config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=2),
        )

    return client


def test_cli_upload_list_remote_and_restore_by_name(
    s3_server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With credentials from the standard AWS environment variables, `snapshot create --upload`,
    `snapshot list --remote` and `snapshot restore NAME` (fetched from S3) work end to end; a wrong
    secret key is one line on stderr and exit status 1."""
    bucket = s3_server.new_bucket()
    data_dir = tmp_path / "data"
    backend = open_backend(data_dir)
    result_of(backend.create_collection("c"))
    result_of(backend.put("c", b"k", CipherBlob.wrap(b"cipher")))
    result_of(backend.close())
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    settings = [
        "--set",
        f"server.data_dir={data_dir}",
        "--set",
        f"snapshot.s3.endpoint_url={s3_server.endpoint}",
        "--set",
        f"snapshot.s3.bucket={bucket}",
        "--set",
        f"snapshot.s3.region={REGION}",
        "--set",
        f"snapshot.s3.prefix={PREFIX}",
    ]
    assert main(["snapshot", "create", "--upload", *settings]) == 0
    out, err = capsys.readouterr()
    assert f"uploaded to s3://{bucket}/{PREFIX}amaters-" in out and "uploading: 100%" in err
    name = out.split("uploaded to ")[1].strip().rsplit("/", 1)[1][len(PREFIX) :]

    assert main(["snapshot", "list", "--remote", *settings]) == 0
    assert name in capsys.readouterr().out

    # Restoring by name after the local copy is gone downloads it from S3 first.
    (data_dir / "snapshots" / name).unlink()
    (data_dir / "snapshots" / (name + ".sha256")).unlink()
    target = tmp_path / "restored"
    assert main(["snapshot", "restore", name, "--into", str(target), "-q", *settings]) == 0
    assert "1 collections, 1 keys" in capsys.readouterr().out
    restored = open_backend(target)
    try:
        assert result_of(restored.get("c", b"k")) == CipherBlob.wrap(b"cipher")
    finally:
        result_of(restored.close())

    assert main(["snapshot", "verify", f"s3://{bucket}/{PREFIX}{name}", "-q", *settings]) == 0
    capsys.readouterr()

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    assert main(["snapshot", "list", "--remote", *settings]) == 1
    err = capsys.readouterr().err
    assert err.startswith("amaters: S3 rejected the credentials (SignatureDoesNotMatch)")
    assert len(err.strip().splitlines()) == 1 and "wrong-secret" not in err

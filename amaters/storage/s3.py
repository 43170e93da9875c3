"""Snapshot archives on S3-compatible storage (AWS S3, MinIO, Ceph RGW, ...), through boto3.

Settings come from ``[snapshot.s3]``: ``endpoint_url`` (empty: AWS), ``bucket``, ``prefix``,
``region``, ``multipart_threshold_bytes``.  Credentials come from boto3's standard chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the
shared credentials file, instance or container roles); amaters never reads, stores or logs them.

An archive ``amaters-<time>.tar.zst`` is stored at ``<prefix>amaters-<time>.tar.zst`` with its
sha256 in the object's metadata (``x-amz-meta-sha256``), together with its format version and
creation time.  Archives at least ``multipart_threshold_bytes`` large go up as a multipart upload in
parts of that size (boto3's ``TransferConfig``).  A download is written to ``<name>.partial``,
its sha256 compared with the metadata, and only then renamed into place.

Every method whose name ends in ``_blocking`` does network and file I/O: run it in a pool
(``pools.io.run``).  Failures are :class:`S3Error` with one clear line, never a traceback and never
credentials: a wrong secret key is "S3 rejected the credentials (SignatureDoesNotMatch) ...".
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import attrs

from amaters.errors import ErrorCategory, StorageError
from amaters.storage import formatfile
from amaters.storage.snapshot import (
    CHECKSUM_SUFFIX,
    PARTIAL_SUFFIX,
    Manifest,
    ProgressCallback,
    SnapshotCorrupted,
    _Reporter,
    _write_checksum_file,
    is_archive_name,
    read_checksum_file,
)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ARCHIVE_AT_END = re.compile(r"amaters-\d{8}T\d{6}\.\d{3}Z\.tar(\.zst)?$")


class S3Error(StorageError):
    """An S3 operation failed; ``s3_code`` is S3's error code when it answered with one."""

    def __init__(self, message: str, *, s3_code: str | None = None, retryable: bool = False) -> None:
        super().__init__(
            message, category=ErrorCategory.RETRYABLE if retryable else ErrorCategory.SERVER_ERROR
        )
        self.s3_code = s3_code


@attrs.frozen
class S3Settings:
    """What :class:`S3Store` needs from ``[snapshot.s3]``."""

    bucket: str
    prefix: str = "amaters/snapshots/"
    endpoint_url: str = ""
    region: str = ""
    multipart_threshold_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_config(cls, s3: Any) -> S3Settings:
        return cls(
            bucket=s3.bucket,
            prefix=s3.prefix,
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            multipart_threshold_bytes=s3.multipart_threshold_bytes,
        )


@attrs.frozen
class RemoteSnapshot:
    """An archive in the bucket."""

    name: str
    key: str
    size: int
    last_modified: str


def parse_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; ValueError when it is not one."""
    parsed = urlparse(url)
    key = parsed.path.lstrip("/")
    if parsed.scheme != "s3" or not parsed.netloc or not key:
        raise ValueError(f"{url!r} is not an s3://bucket/key URL")
    return parsed.netloc, key


class S3Store:
    """Uploads, downloads and lists snapshot archives in one bucket under one prefix.

    ``session_factory`` returns a ``boto3.session.Session`` (tests may pass one with explicit
    credentials); by default each operation makes a new session from the standard AWS chain, in
    the pool thread that runs it (boto3 sessions are not thread-safe; clients are).
    """

    def __init__(self, settings: S3Settings, session_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self._session_factory = session_factory

    @classmethod
    def from_config(cls, s3: Any, session_factory: Callable[[], Any] | None = None) -> S3Store:
        """A store for the ``[snapshot.s3]`` section; fails clearly when no bucket is configured."""
        if not s3.bucket:
            raise S3Error(
                "no S3 bucket configured: set snapshot.s3.bucket (and snapshot.s3.endpoint_url for non-AWS S3)"
            )
        return cls(S3Settings.from_config(s3), session_factory)

    def key_for(self, name: str) -> str:
        return f"{self.settings.prefix}{name}"

    def url_for(self, key: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.settings.bucket}/{key}"

    # -- boto3 ---------------------------------------------------------------------------------

    def _client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config as BotoConfig
        except ImportError:
            raise S3Error('S3 needs boto3: pip install "amaters[s3]"') from None
        session = self._session_factory() if self._session_factory is not None else boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=self.settings.endpoint_url or None,
            region_name=self.settings.region or None,
            config=BotoConfig(
                connect_timeout=10,
                read_timeout=60,
                retries={"max_attempts": 5, "mode": "standard"},
                signature_version="s3v4",
            ),
        )

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        threshold = self.settings.multipart_threshold_bytes
        return TransferConfig(
            multipart_threshold=threshold, multipart_chunksize=threshold, max_concurrency=4, use_threads=True
        )

    def _failed(self, error: BaseException, action: str, bucket: str | None = None) -> S3Error:
        return s3_error(error, action, bucket or self.settings.bucket, self.settings.endpoint_url)

    # -- operations ----------------------------------------------------------------------------

    def upload_blocking(
        self,
        path: Path,
        sha256: str,
        manifest: Manifest | None = None,
        progress: ProgressCallback | None = None,
    ) -> str:
        """Upload the archive at ``path``; returns its ``s3://`` URL.

        The object's metadata carries ``sha256`` (and the manifest's format and creation time); the
        uploaded size is checked against the local file afterwards.
        """
        key = self.key_for(path.name)
        size = path.stat().st_size
        metadata = {"sha256": sha256}
        if manifest is not None:
            metadata["amaters-format"] = str(manifest.format)
            metadata["created-at"] = manifest.created_at
        reporter = _Reporter(progress or _ignore, size, "uploading")
        try:
            client = self._client()
            client.upload_file(
                str(path),
                self.settings.bucket,
                key,
                ExtraArgs={"Metadata": metadata},
                Config=self._transfer_config(),
                Callback=reporter.advance,
            )
            head = client.head_object(Bucket=self.settings.bucket, Key=key)
        except S3Error:
            raise
        except Exception as e:
            raise self._failed(e, f"uploading {path.name}") from None
        if int(head.get("ContentLength", -1)) != size:
            raise S3Error(
                f"uploaded {path.name} to {self.url_for(key)} but S3 reports {head.get('ContentLength')} bytes,"
                f" not {size}"
            )
        reporter.finish()
        return self.url_for(key)

    def download_blocking(
        self,
        key: str,
        directory: Path,
        progress: ProgressCallback | None = None,
        *,
        bucket: str | None = None,
    ) -> Path:
        """Download ``key`` into ``directory`` under its archive name; verify its sha256; its path.

        A local archive of that name is reused when its recorded sha256 (``<name>.sha256``) equals
        the object's; any other existing file is never overwritten.  The sha256 from the object's
        metadata must match the downloaded bytes (else :class:`SnapshotCorrupted`, and nothing is
        kept); it is also written to ``<name>.sha256``.
        """
        bucket = bucket or self.settings.bucket
        # The archive's own name, whatever prefix (with or without "/") the key has.
        found = _ARCHIVE_AT_END.search(key)
        name = found.group(0) if found else key.rsplit("/", 1)[-1]
        if not name:
            raise S3Error(f"{self.url_for(key, bucket)} does not name an archive")
        target = directory / name
        partial = directory / (name + PARTIAL_SUFFIX)
        try:
            client = self._client()
            head = _head_object(client, bucket, key)
        except Exception as e:
            raise self._failed(e, f"downloading {self.url_for(key, bucket)}", bucket) from None
        expected = (head.get("Metadata") or {}).get("sha256", "")
        if target.exists():
            # Already downloaded (say, by an earlier verify): reuse it if it is the same archive.
            if expected and read_checksum_file(target) == expected:
                return target
            raise S3Error(
                f"{target} already exists and is not known to be the same archive as"
                f" {self.url_for(key, bucket)}; move it away first"
            )
        directory.mkdir(parents=True, exist_ok=True)
        try:
            size = int(head.get("ContentLength", 0))
            reporter = _Reporter(progress or _ignore, size, "downloading")
            client.download_file(
                bucket, key, str(partial), Config=self._transfer_config(), Callback=reporter.advance
            )
            reporter.finish()
        except S3Error:
            partial.unlink(missing_ok=True)
            raise
        except Exception as e:
            partial.unlink(missing_ok=True)
            raise self._failed(e, f"downloading {self.url_for(key, bucket)}", bucket) from None
        try:
            if not _SHA256.match(expected):
                raise S3Error(
                    f"{self.url_for(key, bucket)} has no sha256 in its metadata (x-amz-meta-sha256); it was"
                    " not uploaded by amaters, so it cannot be checked"
                )
            checking = _Reporter(progress or _ignore, size, "checking download")
            digest = hashlib.sha256()
            with partial.open("rb") as f:
                while chunk := f.read(1024 * 1024):
                    digest.update(chunk)
                    checking.advance(len(chunk))
            checking.finish()
            if digest.hexdigest() != expected:
                raise SnapshotCorrupted(
                    f"downloaded {self.url_for(key, bucket)} fails its sha256 check (metadata"
                    f" {expected[:16]}..., downloaded {digest.hexdigest()[:16]}...)"
                )
            with partial.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, target)
            _write_checksum_file(target, expected)
            formatfile.fsync_directory(directory)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return target

    def exists_blocking(self, key: str) -> bool:
        """Whether an object ``key`` exists in the bucket (S3Error for any other failure)."""
        from botocore.exceptions import ClientError

        try:
            client = self._client()
            _head_object(client, self.settings.bucket, key)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._failed(e, f"looking for {self.url_for(key)}") from None
        except Exception as e:
            raise self._failed(e, f"looking for {self.url_for(key)}") from None
        return True

    def list_blocking(self) -> list[RemoteSnapshot]:
        """Archives under the prefix, oldest first."""
        found: list[RemoteSnapshot] = []
        try:
            client = self._client()
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket, Prefix=self.settings.prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"]
                    name = key[len(self.settings.prefix) :]
                    if "/" in name or not is_archive_name(name):
                        continue
                    modified = item.get("LastModified")
                    found.append(
                        RemoteSnapshot(
                            name,
                            key,
                            int(item.get("Size", 0)),
                            modified.isoformat() if modified is not None else "",
                        )
                    )
        except Exception as e:
            raise self._failed(e, "listing snapshots") from None
        return sorted(found, key=lambda r: r.name)


def _ignore(done: int, total: int, stage: str) -> None:
    pass


def _head_object(client: Any, bucket: str, key: str) -> Any:
    """``head_object``; when it fails without an error code (HEAD answers have no body, so a wrong
    secret key is a bare 403), a one-byte GET asks again to learn S3's real error code."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code", "")) not in ("403", "400", "Forbidden", "BadRequest"):
            raise
        client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()
        raise


_CREDENTIAL_CODES = {
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "InvalidAccessKeyId": "the access key id is not known to this S3 service",
    "InvalidToken": "the session token is invalid",
    "ExpiredToken": "the session token has expired",
    "TokenRefreshRequired": "the session token has expired",
    "AuthorizationHeaderMalformed": "the authorization header is malformed (check snapshot.s3.region)",
}


def s3_error(error: BaseException, action: str, bucket: str, endpoint: str) -> S3Error:
    """One clear :class:`S3Error` for an exception boto3 raised while doing ``action``.

    Messages name the action, the bucket and S3's error code; never credentials or signatures.
    """
    from botocore import exceptions as bx

    where = endpoint or "AWS S3"
    if isinstance(error, S3Error):
        return error
    if isinstance(error, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return S3Error(
            f"{action}: no usable AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,"
            " or AWS_PROFILE (the standard AWS chain)"
        )
    if isinstance(error, bx.ProfileNotFound):
        return S3Error(f"{action}: the AWS profile named by AWS_PROFILE does not exist")
    if isinstance(error, (bx.EndpointConnectionError, bx.ConnectionClosedError)):
        return S3Error(f"{action}: cannot reach S3 at {where}", retryable=True)
    if isinstance(error, (bx.ReadTimeoutError, bx.ConnectTimeoutError)):
        return S3Error(f"{action}: S3 at {where} timed out", retryable=True)
    code: str | None = None
    status: int | None = None
    if isinstance(error, bx.ClientError):
        code = str(error.response.get("Error", {}).get("Code", "")) or None
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    else:
        # boto3's S3UploadFailedError and similar wrap the ClientError's text.
        match = re.search(r"An error occurred \(([A-Za-z0-9.]+)\)", str(error))
        if match:
            code = match.group(1)
    if code in _CREDENTIAL_CODES:
        return S3Error(
            f"S3 rejected the credentials ({code}): {_CREDENTIAL_CODES[code]}; {action} failed", s3_code=code
        )
    if code == "AccessDenied":
        return S3Error(
            f"{action}: S3 denied access to bucket {bucket!r} (AccessDenied): the credentials lack permission",
            s3_code=code,
        )
    if code in ("403", "Forbidden"):
        return S3Error(
            f"{action}: S3 refused the request (403 Forbidden): wrong credentials, or no permission for"
            f" bucket {bucket!r}",
            s3_code=code,
        )
    if code == "NoSuchBucket":
        return S3Error(f"{action}: bucket {bucket!r} does not exist at {where} (NoSuchBucket)", s3_code=code)
    if code in ("NoSuchKey", "404", "NotFound"):
        return S3Error(f"{action}: no such object in bucket {bucket!r} (NoSuchKey)", s3_code=code)
    if code is not None:
        retryable = code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout") or (
            status is not None and status >= 500
        )
        return S3Error(f"{action}: S3 answered {code}", s3_code=code, retryable=retryable)
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return S3Error(f"{action}: {text}")


__all__ = [
    "CHECKSUM_SUFFIX",
    "RemoteSnapshot",
    "S3Error",
    "S3Settings",
    "S3Store",
    "parse_s3_url",
    "s3_error",
]

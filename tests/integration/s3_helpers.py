"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1, with authentication.

Requests are authenticated like real S3: an IAM user with an access key is created while the server
still accepts anything, then authentication is switched on (moto's ``/moto-api/reset-auth``), so a
wrong secret key gets S3's real ``SignatureDoesNotMatch``.  The ``s3_server`` fixture
(``conftest.py``) starts one per test module and stops it by pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ports import free_port

REGION = "us-east-1"


class S3Server(SimpleNamespace):
    endpoint: str
    key_id: str
    secret: str

    def session(self, secret: str | None = None, key_id: str | None = None) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=key_id or self.key_id,
            aws_secret_access_key=secret or self.secret,
            region_name=REGION,
        )

    def client(self) -> Any:
        return self.session().client("s3", endpoint_url=self.endpoint)

    def new_bucket(self) -> str:
        name = f"amaters-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def environment(self) -> dict[str, str]:
        """The environment of a command that uses this server's credentials (the standard AWS chain)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_ACCESS_KEY_ID=self.key_id, AWS_SECRET_ACCESS_KEY=self.secret, AWS_DEFAULT_REGION=REGION
        )
        return env


@contextmanager
def running_s3_server(log_dir: Path) -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, with an IAM user whose key is required."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = log_dir / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"moto server exited: {log_path.read_text()}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"moto server not up after 30s: {log_path.read_text()}") from None
                time.sleep(0.1)
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="amaters-backup")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="amaters-backup", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="amaters-backup")["AccessKey"]
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=5).close()  # from now on every request is checked
        yield S3Server(endpoint=endpoint, key_id=key["AccessKeyId"], secret=key["SecretAccessKey"])
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

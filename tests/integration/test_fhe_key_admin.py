"""FHE key storage limits and their administration, through a real server and the CLI: a reader
cannot fill the disk with evaluation keys, and an administrator lists and deletes key sets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from harness import ServerProcess
from twisted.internet import reactor

from amaters.client import connect
from amaters.errors import AmatersError
from amaters.fhe import FheKeys, field

pytestmark = pytest.mark.integration


def admin(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "amaters.cli",
            "admin",
            "fhe-keys",
            *args,
            "--config",
            str(server.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest_twisted.ensureDeferred
async def test_key_sets_are_limited_listed_and_deleted(tmp_path: Path, servers: list[ServerProcess]) -> None:
    """With fhe.max_key_sets = 1 a second key set is refused in one line (STORAGE_FULL naming the
    setting); `amaters admin fhe-keys` lists the stored one, `--delete` removes it (FILTER with it
    then asks for an upload) and the second upload succeeds; a bad id is one line and exit 1."""
    text = '[fhe]\nevaluator = "cleartext-insecure"\nallow_insecure = true\nmax_key_sets = 1\n'
    server = ServerProcess(tmp_path, config_text=text)
    servers.append(server)
    server.start().wait_ready(60)
    first = FheKeys.generate("age:8", evaluator="cleartext-insecure")
    second = FheKeys.generate("score:8", evaluator="cleartext-insecure")
    client = await connect(reactor, "127.0.0.1", server.port, ca_cert=str(server.ca_cert), timeout=60)
    try:
        assert await client.upload_keys(first) is True
        await client.set_record("people", b"k", first, {"age": 30})
        with pytest.raises(AmatersError) as refused:
            await client.upload_keys(second)
        assert refused.value.code.name == "STORAGE_FULL"
        assert "fhe.max_key_sets = 1" in str(refused.value) and "\n" not in str(refused.value)

        listed = admin(server)
        assert listed.returncode == 0, listed.stderr
        stored = json.loads(listed.stdout)["key_sets"]
        assert [k["key_set_id"] for k in stored] == [first.key_set_id.hex()]
        assert stored[0]["schema"] == "age:8" and stored[0]["bytes"] > 0

        deleted = admin(server, "--delete", first.key_set_id.hex())
        assert deleted.returncode == 0, deleted.stderr
        with pytest.raises(AmatersError, match="upload them first"):
            await client.filter("people", field("age") > 1, keys=first)
        assert await client.upload_keys(second) is True
        assert json.loads(admin(server).stdout)["key_sets"][0]["key_set_id"] == second.key_set_id.hex()

        for bad in ("not-an-id", first.key_set_id.hex()):
            answer = admin(server, "--delete", bad)
            assert answer.returncode == 1 and answer.stderr.count("\n") == 1, answer.stderr
            assert "Traceback" not in answer.stderr
    finally:
        await client.close()

"""The operator console in a real browser: headless Chromium against ``twistd -n amaters``.

The page is driven the way an operator uses it (open the URL, sign in, follow the navigation,
press buttons) and checked on what it renders; screenshots go to the test's tmp_path.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from browser import CHROMIUM, Browser
from harness import ServerProcess, http_get

from amaters import __version__

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/install-test-deps)"),
]
pytest.importorskip("websocket", reason="websocket-client is in the test extra")

JWT_SECRET = "console-test-secret-0123456789abcdef"

WRITER = """
import sys
from twisted.internet import defer, task
from amaters.client import connect

async def main(reactor, port, ca, token, spec):
    client = await connect(reactor, "127.0.0.1", int(port), ca_cert=ca, token=token or None)
    try:
        for item in spec.split(","):
            collection, first, count = item.split(":")
            for i in range(int(first), int(first) + int(count)):
                await client.set(collection, b"key-%05d" % i, b"ciphertext")
    finally:
        await client.close()

task.react(lambda reactor, *args: defer.ensureDeferred(main(reactor, *args)), sys.argv[1:])
"""


def write(server: ServerProcess, spec: str, token: str = "") -> None:
    """Store keys through the native protocol: ``spec`` is ``collection:first:count,...``."""
    done = subprocess.run(
        [sys.executable, "-c", WRITER, str(server.port), str(server.ca_cert), token, spec],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def requests_served(browser: Browser) -> int:
    text = browser.text("ov-requests")
    digits = re.sub(r"[^0-9]", "", text)
    return int(digits) if digits else -1


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    started = Browser(tmp_path)
    try:
        yield started
    finally:
        started.close()


def test_console_shows_the_server_and_live_charts(
    tmp_path: Path, browser: Browser, servers: list[ServerProcess]
) -> None:
    """Auth off (loopback): the page shows the version, "ready", both collections with their key
    counts, a request count and a requests chart that rise after more requests, the snapshot a button
    creates (and verifies), the configuration and the audit tail."""
    server = ServerProcess(tmp_path / "server", config_text="[audit]\nenabled = true\n")
    servers.append(server)
    server.start().wait_ready()
    write(server, "users:0:3,orders:0:5")
    base = f"http://127.0.0.1:{server.web_port}/"

    browser.navigate(base)
    browser.wait_for("document.getElementById('ov-ready').innerText === 'ready'")
    assert browser.text("ov-version") == __version__
    browser.wait_for("document.getElementById('ov-certs').innerText.includes('days')")
    assert "rocksdb" in browser.text("ov-server")
    browser.screenshot(tmp_path / "console-overview.png")

    browser.evaluate("document.querySelector('a[href=\"#collections\"]').click()")
    rows = browser.wait_for(
        "Array.from(document.querySelectorAll('#collections-table tbody tr')).map(r => r.innerText)"
        ".filter(t => t.includes('users') || t.includes('orders')).length === 2"
        " && document.getElementById('collections-table').innerText"
    )
    assert re.search(r"users\s+3 keys", rows) and re.search(r"orders\s+5 keys", rows), rows
    assert browser.evaluate("document.activeElement.id") == "collections-h"
    browser.screenshot(tmp_path / "console-collections.png")

    browser.evaluate("location.hash = '#charts'")
    browser.wait_for("document.querySelectorAll('#chart-requests canvas').length > 0")
    before = browser.wait_for(
        "(t => t > 0 && t)(parseInt(document.getElementById('ov-requests').innerText.replace(/[^0-9]/g, '')))"
    )
    assert "set:" not in browser.text("latest-requests")  # the writes came before the page opened
    write(server, "orders:5:40")
    browser.wait_for(
        f"parseInt(document.getElementById('ov-requests').innerText.replace(/[^0-9]/g, '')) >= {before + 40}"
    )
    # A "set" series appears in the requests chart only once a positive rate of SETs was measured.
    browser.wait_for("document.getElementById('latest-requests').innerText.includes('set:')")
    assert requests_served(browser) >= before + 40
    browser.screenshot(tmp_path / "console-charts.png")

    browser.evaluate("location.hash = '#snapshots'")
    browser.wait_for("!document.getElementById('snapshots-empty').hidden")
    browser.evaluate("document.getElementById('snapshot-create').click()")
    status = browser.wait_for(
        "document.getElementById('snapshots-status').innerText.startsWith('Created')"
        " && document.getElementById('snapshots-status').innerText"
    )
    assert "48 keys" in status, status
    browser.evaluate("document.querySelector('#snapshots-table tbody button').click()")
    verified = browser.wait_for(
        "(t => t.includes('OK') && t)(document.getElementById('snapshots-table').innerText)"
    )
    assert "files intact" in verified and "48 keys" in verified, verified
    browser.screenshot(tmp_path / "console-snapshots.png")

    browser.evaluate("location.hash = '#config'")
    browser.wait_for("document.getElementById('config-table').innerText.includes('web.listen')")
    # Change a reloadable and a restart-only setting on disk: the page says what a reload would do.
    server.config_path.write_text(
        server.config_path.read_text().replace("shutdown_timeout = 10", "shutdown_timeout = 12")
        + '[logging]\nlevel = "debug"\n'
    )
    browser.evaluate("location.hash = '#overview'; location.hash = '#config'")
    preview = browser.wait_for(
        "(t => t.includes('logging.level') && t)(document.getElementById('config-preview').innerText)"
    )
    assert (
        "applied by a reload" in preview
        and "server.shutdown_timeout" in preview
        and "needs a restart" in preview
    )
    browser.screenshot(tmp_path / "console-config.png")
    browser.evaluate("document.getElementById('config-reload').click()")
    reloaded = browser.wait_for(
        "(t => t.startsWith('Reloaded') && t)(document.getElementById('config-status').innerText)"
    )
    assert "logging.level" in reloaded

    # Back to the overview from another view: its data directory and certificates are read again.
    browser.evaluate("document.getElementById('ov-datadir').replaceChildren(); location.hash = '#overview'")
    usage = browser.wait_for("document.getElementById('ov-datadir').innerText")
    assert re.search(r"\d+(\.\d+)? (B|KiB|MiB) in \d+ files", usage), usage

    browser.evaluate("location.hash = '#audit'")
    audit = browser.wait_for(
        "(t => t.includes('admin snapshot create') && t)(document.getElementById('audit-table').innerText)"
    )
    assert "admin reload" in audit or "reload" in audit
    browser.screenshot(tmp_path / "console-audit.png")
    # A single node reports no cluster: its place stays hidden. The server reports its FHE state
    # (evaluator, key sets stored, circuits cached), shown in the FHE view.
    assert browser.evaluate("document.getElementById('nav-cluster').hidden")
    assert not browser.evaluate("document.getElementById('nav-fhe').hidden")
    fhe_text = browser.evaluate("document.getElementById('fhe-body').innerText").lower()
    assert "evaluator" in fhe_text and "circuits" in fhe_text, fhe_text


def _token(roles: list[str]) -> str:
    claims = {"sub": "console-test", "roles": roles, "exp": int(time.time()) + 600}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def _sign_in(browser: Browser, token: str, kind: str = "bearer") -> None:
    browser.wait_for("!document.getElementById('login').hidden")
    browser.evaluate(
        f"document.getElementById('login-kind').value = {json.dumps(kind)};"
        f"document.getElementById('login-secret').value = {json.dumps(token)};"
        "document.getElementById('login-form').requestSubmit()"
    )


def test_console_with_auth_asks_for_a_token_and_shows_refusals(
    tmp_path: Path, browser: Browser, servers: list[ServerProcess]
) -> None:
    """Auth on: without a token only the login prompt (no data); a reader's token is refused every
    admin call and cannot create a snapshot (403 shown, nothing created); an admin's token and an
    admin's API key work."""
    from amaters.auth.apikeys import generate_api_key, hash_api_key

    key_id, api_key = generate_api_key("ops")
    pepper = "console-test-pepper-0123456789"
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nid = "{key_id}"\nname = "ops"\nkey_hash = "{hash_api_key(pepper.encode(), api_key)}"\n'
        'roles = ["admin"]\n'
    )
    server = ServerProcess(
        tmp_path / "server",
        config_text=(
            f'[auth]\nenabled = true\napi_keys_file = "{keys}"\napi_key_pepper = "{pepper}"\n'
            f'[auth.jwt]\nsecret = "{JWT_SECRET}"\n'
        ),
    )
    servers.append(server)
    server.start().wait_ready()
    base = f"http://127.0.0.1:{server.web_port}/"

    browser.navigate(base)
    browser.wait_for("!document.getElementById('login').hidden")
    assert browser.evaluate("document.getElementById('nav').hidden")
    assert browser.evaluate("document.querySelectorAll('.view:not([hidden])').length") == 0
    assert browser.evaluate("document.querySelectorAll('tbody tr').length") == 0
    assert __version__ not in browser.evaluate("document.body.innerText")
    browser.screenshot(tmp_path / "console-login.png")

    _sign_in(browser, "not-a-valid-token")
    browser.wait_for("document.getElementById('login-error').innerText.includes('refused')")

    _sign_in(browser, _token(["reader"]))
    browser.wait_for("document.getElementById('overview-error').innerText.includes('403')")
    browser.evaluate("location.hash = '#snapshots'")
    browser.wait_for("document.getElementById('snapshots-error').innerText.includes('403')")
    browser.evaluate("document.getElementById('snapshots-error').textContent = ''")
    browser.evaluate("document.getElementById('snapshot-create').click()")
    shown = browser.wait_for(
        "(t => t.includes('403') && t)(document.getElementById('snapshots-error').innerText)"
    )
    assert "Forbidden" in shown
    browser.screenshot(tmp_path / "console-reader-403.png")
    # The server took no snapshot (asked as an administrator, outside the page).
    request = urllib.request.Request(
        f"{base}admin/snapshots", headers={"Authorization": f"Bearer {_token(['admin'])}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["snapshots"] == []

    # Sign out (the token leaves session storage), then in as an administrator.
    browser.evaluate("document.getElementById('signout').click()")
    assert browser.evaluate("sessionStorage.length") == 0
    _sign_in(browser, _token(["admin"]))
    browser.wait_for("document.getElementById('ov-ready').innerText === 'ready'")
    assert browser.text("ov-version") == __version__
    assert http_get(f"{base}admin/status")[0] == 401  # the page's token is not a cookie

    # An administrator's API key works the same way (sent as "Authorization: ApiKey ...").
    browser.evaluate("document.getElementById('signout').click()")
    _sign_in(browser, api_key, kind="apikey")
    browser.wait_for("document.getElementById('ov-ready').innerText === 'ready'")
    browser.evaluate("location.hash = '#snapshots'")
    browser.wait_for("!document.getElementById('snapshots-empty').hidden")
    assert browser.text("snapshots-error") == ""


def test_console_shows_the_cluster_only_when_the_server_reports_one(
    tmp_path: Path, browser: Browser, servers: list[ServerProcess]
) -> None:
    """A clustered node (one etcd member, storage.backend = etcd): the Cluster view appears and shows
    what /admin/cluster reports (this node's name, the shard and its etcd member).  The single-node
    servers of the other tests keep it hidden."""
    from etcd_helpers import ETCD, EtcdCluster

    if ETCD is None:
        pytest.skip("etcd is not installed (scripts/install-test-deps)")
    etcd = EtcdCluster(tmp_path / "etcd", 1)
    etcd.start()
    try:
        node = ServerProcess(
            tmp_path / "node",
            settings=[
                "storage.backend=etcd",
                f"cluster.endpoints={json.dumps(etcd.endpoints)}",
                "cluster.node_name=console-node",
                "tls.enabled=false",
                "server.shutdown_timeout=2",
            ],
        )
        servers.append(node)
        node.start().wait_ready()
        browser.navigate(f"http://127.0.0.1:{node.web_port}/")
        browser.wait_for("!document.getElementById('nav-cluster').hidden")
        browser.evaluate("document.querySelector('a[href=\"#cluster\"]').click()")
        shown = browser.wait_for(
            "(t => t.includes('console-node') && t)(document.getElementById('view-cluster').innerText)"
        )
        assert (
            "leader_node" in shown
            and "Shard 0: healthy" in shown
            and etcd.endpoints[0].split("//")[-1] in shown
        ), shown
        browser.screenshot(tmp_path / "console-cluster.png")
        node.stop()
    finally:
        etcd.stop()

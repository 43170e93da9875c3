"""docs/grafana-dashboard.json: valid JSON whose queries use only metrics the server exports and parse
as PromQL (checked with promtool when present)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from amaters.ops.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


def expressions() -> list[str]:
    found: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def concrete(expr: str) -> str:
    """The expression with Grafana's variables replaced, as Prometheus would receive it."""
    return expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")


def test_dashboard_queries_use_exported_metrics() -> None:
    """Every metric a panel queries is one the server exports (amaters_*, process_*)."""
    metrics = Metrics()
    metrics.storage.update({"keys": {"c": 1}, "bytes": 1})
    body, _ = metrics.exposition()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = {
        f.name + suffix
        for f in text_string_to_metric_families(body.decode())
        for suffix in suffixes.get(f.type, [""])
    }
    exprs = expressions()
    assert len(exprs) >= 20
    for expr in exprs:
        for name in re.findall(r"\b((?:amaters|process)_[a-z_]+)\b", expr):
            assert name in exported, (name, expr)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) missing")
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool accepts every panel query as a PromQL expression (as recording rules)."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:q{i}", "expr": concrete(e)} for i, e in enumerate(expressions())
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

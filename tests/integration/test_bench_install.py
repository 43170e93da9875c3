"""The benchmark runs as documented from a plain (non-editable) install, from the repository root.

The source tree is copied to a temporary directory, installed with ``pip install --no-deps .`` into
a fresh virtual environment, and ``python -m bench`` runs one short protocol scenario (which starts
both amaters and the reference server) from that copy's root without ``PYTHONPATH``.

The environment reuses the already installed dependencies through a ``.pth`` line naming the
interpreter's site-packages directories rather than ``--system-site-packages``: that would also run
their ``.pth`` files, and an editable install of some other checkout there would put that
checkout's ``bench`` on every child's import path and hide exactly the failure this test is for.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("amaters", "twisted", "bench", "pyproject.toml", "setup.py", "README.md")


def _python_in(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def test_quick_bench_scenario_runs_from_a_plain_install(tmp_path: Path) -> None:
    """One protocol scenario of ``python -m bench --quick`` runs both servers and measures both."""
    source = tmp_path / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    for name in COPIED:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = _python_in(venv)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    installed = {*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "installed-deps.pth").write_text("\n".join(sorted(installed)) + "\n")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("AMATERS_")}
    env["OMP_NUM_THREADS"] = "1"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "."],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    where = subprocess.run(
        [str(python), "-c", "import amaters; print(amaters.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert where.stdout.strip().startswith(purelib), where.stdout + where.stderr

    out = tmp_path / "out"
    command = [
        str(python),
        "-m",
        "bench",
        "--quick",
        "--only",
        "protocol",
        "--match",
        "get-100B-P1",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path),
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--keyspace",
        "200",
        "--workers",
        "1",
    ]
    completed = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    assert [scenario["name"] for scenario in results] == ["get-100B-P1"], results
    (get,) = results
    assert "error" not in get, get
    assert get["ops_per_s"] > 0 and get["reference_ops_per_s"] > 0
    assert get["errors"] == 0 and get["reference_errors"] == 0

"""Packaging: the wheel ships the twistd plugin (and no plugin cache); a fresh virtualenv gets
working ``twistd amaters`` and ``amaters`` commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contents_and_fresh_virtualenv(tmp_path: Path) -> None:
    """A fresh virtualenv (its own default setuptools) builds the wheel and gets working commands.

    The build runs with build isolation, so it gets the setuptools ``[build-system]`` asks for,
    whatever the virtualenv itself has.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = venv / "bin" / "pip"
    # The virtualenv sees only what is installed in it: not this source tree through PYTHONPATH
    # (whose amaters.egg-info, left by an editable install, would pass for an installed amaters).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    wheels = tmp_path / "wheels"
    subprocess.run(
        [str(pip), "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = wheels.glob("amaters-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/amaters_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert "amaters/py.typed" in names
    # The operator console ships whole: no build step, no network at runtime.
    from amaters.web.assets import CONSOLE_FILES

    assert {f"amaters/web/console/{name}" for name in CONSOLE_FILES} <= set(names)

    subprocess.run([str(pip), "install", "-q", str(wheel)], check=True, timeout=600, cwd=tmp_path, env=env)
    twistd_help = subprocess.run(
        [str(venv / "bin" / "twistd"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert "amaters" in twistd_help.stdout
    version = subprocess.run(
        [str(venv / "bin" / "amaters"), "version", "--verbose"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert version.returncode == 0 and version.stdout.startswith("amaters ")
    # The build environment (setuptools and mypy, nothing else) compiled the request path.
    if shutil.which(sysconfig.get_config_var("CC").split()[0]):
        from amaters.compiled import MODULES

        assert f"build compiled ({len(MODULES)} of {len(MODULES)} " in version.stdout, version.stdout
        assert wheel.name.endswith(f"-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}.whl")


def test_build_requirement_accepts_the_license_field() -> None:
    """``project.license`` as an SPDX string needs setuptools 77 or later: the build must ask for it."""
    import re
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    if not isinstance(pyproject["project"].get("license"), str):
        return
    (setuptools,) = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools.replace(" ", ""))
    assert match is not None and int(match.group(1)) >= 77, setuptools

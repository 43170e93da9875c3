"""The compiled build: a wheel compiles the modules of :mod:`amaters.compiled` with mypyc, passes the
unit tests as the interpreted build does, and falls back to pure Python, whole, when it cannot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from amaters.compiled import MODULES

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXTENSION = sysconfig.get_config_var("EXT_SUFFIX")


def _environ(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMATERS_COMPILE", "CC")}
    env.update(changes)
    return env


def _wheel(tmp_path: Path, **environ: str) -> tuple[Path, str]:
    """A wheel of a copy of this tree (nothing built before reused) made with this interpreter's
    setuptools and mypy, and pip's output."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "dropin.cache")
    for name in ("amaters", "twisted"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            ".",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=source,
        env=_environ(**environ),
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("amaters-*.whl")
    return wheel, build.stdout + build.stderr


def _compiled_in(wheel: Path) -> set[str]:
    names = zipfile.ZipFile(wheel).namelist()
    return {n[: -len(EXTENSION)].replace("/", ".") for n in names if n.endswith(EXTENSION)}


needs_compiler = pytest.mark.skipif(
    shutil.which(sysconfig.get_config_var("CC").split()[0]) is None, reason="no C compiler"
)


@needs_compiler
def test_the_unit_tests_pass_against_the_compiled_build(tmp_path: Path) -> None:
    """Every module of MODULES is in the wheel compiled, and the unit tests pass with it imported
    (tests/conftest.py refuses to run if any of them is not compiled)."""
    wheel, _ = _wheel(tmp_path)
    assert _compiled_in(wheel) == {*MODULES, "amaters__mypyc"}
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(ROOT),
            str(ROOT / "tests" / "unit"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # not the source tree, whose amaters would be imported first
        env=_environ(PYTHONPATH=str(site), AMATERS_TEST_COMPILED="1"),
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert " passed" in summary and "skipped" in summary, summary


@needs_compiler
def test_a_failed_compilation_installs_the_pure_build_whole(tmp_path: Path) -> None:
    """No working C compiler: the build warns and the wheel holds no extension module at all (a
    part of them would not import without the rest)."""
    wheel, output = _wheel(tmp_path, CC="false")
    assert _compiled_in(wheel) == set()
    assert "the C extensions could not be built" in output
    assert "the pure-Python build is installed" in output
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.replace(".", "/") + ".py" for name in MODULES} <= set(names)


def test_amaters_compile_0_builds_pure_python(tmp_path: Path) -> None:
    wheel, output = _wheel(tmp_path, AMATERS_COMPILE="0")
    assert _compiled_in(wheel) == set()
    assert wheel.name.endswith("-py3-none-any.whl")
    assert "AMATERS_COMPILE=0" in output

"""Builds amaters with its request path compiled by mypyc; everything else is in pyproject.toml.

The modules listed in ``amaters/compiled.py`` become C extension modules in a wheel (``pip install
.``).  They stay pure Python, with a warning and nothing else changed, when:

- the install is editable (``pip install -e .``): an edit to a source file must take effect, and a
  compiled module next to it would be imported instead;
- ``AMATERS_COMPILE=0`` is set;
- mypyc cannot compile them, or the C compiler or Python's headers are missing.

A build is all or nothing: if any extension fails, none is installed.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
#: The setup.py commands that build or install code; pip runs others first, for the metadata.
_BUILDING = {"bdist_wheel", "build", "build_ext", "install"}


def _warn(message: str) -> None:
    print(f"amaters: {message}; the pure-Python build is installed", file=sys.stderr)


def _modules() -> list[str]:
    """``MODULES`` of amaters/compiled.py, read without importing the package."""
    tree = ast.parse((HERE / "amaters" / "compiled.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODULES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("amaters/compiled.py has no MODULES")


def _ext_modules() -> list[Any]:
    if os.environ.get("AMATERS_COMPILE", "1").strip() == "0":
        _warn("AMATERS_COMPILE=0")
        return []
    if "editable_wheel" in sys.argv or "develop" in sys.argv:
        return []
    if not _BUILDING.intersection(sys.argv):
        return []  # the metadata steps of a build: nothing is compiled for them
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not installed")
        return []
    paths = [name.replace(".", "/") + ".py" for name in _modules()]
    # The same types wherever it is built: the listed modules' own, with everything they import
    # unknown (Any), never what happens to be installed.  The project's mypy configuration
    # (strict, its zope plugin, the dependencies' types) is for the type check in CI; here,
    # without the attrs classes' types, their constructors' arguments cannot be checked.
    options = [
        "--config-file=",
        "--no-site-packages",
        "--ignore-missing-imports",
        "--follow-imports=skip",
        "--disable-error-code=call-arg",
    ]
    try:
        return list(mypycify(options + paths, opt_level="3", debug_level="0", group_name="amaters"))
    except (Exception, SystemExit) as e:  # mypyc reports a failed type check by exiting
        _warn(f"mypyc could not compile the request path ({e})")
        return []


class _AllOrNothing(build_ext):
    """Build every extension, or none: a missing compiler leaves the pure-Python build."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # CCompilerError, CompileError, LinkError, a missing Python.h
            for output in self.get_outputs():
                Path(output).unlink(missing_ok=True)
            self.extensions = []
            _warn(f"the C extensions could not be built ({type(e).__name__}: {e})")


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": _AllOrNothing})

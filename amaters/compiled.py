"""The modules a wheel compiles with mypyc, and which of them this process runs compiled.

``pip install .`` builds the modules below into C extension modules (``setup.py``): the request
path's parsing (a pipelining read's runs of keyed frames among it), validation, pipeline and
stages, where a request's interpreted work is spent.
They are the same source either way; compiled, a request costs less CPU.  An editable install
(``pip install -e``), ``AMATERS_COMPILE=0``, or a machine without a C compiler or Python's headers
gives the pure-Python build, which behaves the same.

Left out: modules with classes that interpreted code subclasses (a compiled class cannot be
subclassed) or that derive from a dependency's classes (the build does not see the dependencies'
types, and mypyc then builds a class that fails at run time; ``tests/unit/test_compiled.py``
checks), and :mod:`amaters.protocols.server`: its classes derive from Twisted's, so compiled they
are not native classes, and a request through them costs more than interpreted (measured in
docs/benchmarks.md, "The compiled build").
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys

__all__ = ["MODULES", "build_name", "compiled_modules", "loaded_compiled"]

#: Read by ``setup.py`` without importing the package: a literal tuple of module names.
MODULES = (
    "amaters.auth.rbac",
    "amaters.auth.stage",
    "amaters.ops.metrics",
    "amaters.ops.stages",
    "amaters.protect.cache",
    "amaters.protect.compression",
    "amaters.protect.shedding",
    "amaters.protocols.keyed",
    "amaters.proto.answers",
    "amaters.proto.convert",
    "amaters.proto.requests",
    "amaters.query.executor",
    "amaters.query.pipeline",
    "amaters.query.validation",
)


def loaded_compiled(file: str | None) -> bool:
    """Whether a module whose ``__file__`` is ``file`` was loaded from a C extension module."""
    return (file or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled_modules() -> list[str]:
    """Those of :data:`MODULES` this process loaded from a C extension module (importing them)."""
    found = []
    for name in MODULES:
        module = sys.modules.get(name) or importlib.import_module(name)
        if loaded_compiled(getattr(module, "__file__", None)):
            found.append(name)
    return found


def build_name() -> str:
    """``"compiled"`` when every module of :data:`MODULES` runs compiled, ``"interpreted"`` when
    none does, ``"partial"`` otherwise (a tree copied over an installed build, say)."""
    count = len(compiled_modules())
    return "compiled" if count == len(MODULES) else "interpreted" if count == 0 else "partial"

"""The modules a wheel compiles (amaters/compiled.py) stay compilable into working code.

The build type-checks them with everything they import unknown.  mypyc makes a class without a
decorator a native class, and a native class derived from a class it does not know fails when
used (``SystemError: bad argument to internal function``); a decorated class (``@implementer``,
``@attrs.frozen``), built as an ordinary Python class, loses such a base without a word and
derives from ``object`` alone.  So no class of these modules may derive from a class the build
does not know: bases may be builtins, the standard library's (whose types mypyc has) or classes of
the compiled modules themselves.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import sys
from pathlib import Path

import amaters
from amaters.compiled import MODULES, build_name, compiled_modules

PACKAGE = Path(amaters.__file__).resolve().parent


def _source(module: str) -> Path:
    return PACKAGE.parent / (module.replace(".", "/") + ".py")


def _origins(tree: ast.Module) -> dict[str, str]:
    """Each name the module binds by an import: the module it comes from."""
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found[(alias.asname or alias.name).split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                found[alias.asname or alias.name] = node.module
    return found


def _base_module(base: ast.expr, origins: dict[str, str], local: set[str]) -> str | None:
    """The module a base class expression comes from, or None for a local class or a builtin."""
    if isinstance(base, ast.Subscript):  # Generic[T], Protocol[T]
        base = base.value
    if isinstance(base, ast.Name):
        if base.id in local or hasattr(builtins, base.id):
            return None
        return origins.get(base.id, "?")
    if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
        return origins.get(base.value.id, base.value.id)
    return "?"


def _unknown_bases(module: str, source: str) -> list[str]:
    tree = ast.parse(source)
    origins = _origins(tree)
    local = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for base in node.bases:
            origin = _base_module(base, origins, local)
            if origin is None or origin.split(".")[0] in sys.stdlib_module_names or origin in MODULES:
                continue
            problems.append(f"{module}.{node.name} derives from {ast.unparse(base)} ({origin})")
    return problems


def test_every_listed_module_exists_once() -> None:
    assert len(set(MODULES)) == len(MODULES)
    assert all(_source(name).is_file() for name in MODULES)


def test_no_compiled_class_derives_from_a_class_the_build_does_not_know() -> None:
    problems = [problem for name in MODULES for problem in _unknown_bases(name, _source(name).read_text())]
    assert not problems, "\n".join(problems)


def test_the_check_finds_such_a_class() -> None:
    """The check above is not vacuous: a collector in a compiled module is caught, decorated or
    not; a stage, an enum and an exception are not."""
    source = (
        "from prometheus_client.registry import Collector\n"
        "from twisted.application import service\n"
        "from amaters.query.pipeline import PipelineStage\n"
        "import attrs, enum\n"
        "class A(Collector): pass\n"
        "class B(PipelineStage): pass\n"
        "class C(enum.IntEnum): pass\n"
        "class D(ValueError): pass\n"
        "class E(D): pass\n"
        "class F(service.Service): pass\n"
        "@attrs.define\n"
        "class G(Collector): pass\n"
    )
    assert _unknown_bases("m", source) == [
        "m.A derives from Collector (prometheus_client.registry)",
        "m.F derives from service.Service (twisted.application)",
        "m.G derives from Collector (prometheus_client.registry)",
    ]


def _base_name(base: ast.expr) -> str:
    if isinstance(base, ast.Subscript):  # Generic[T], Protocol[T]
        base = base.value
    return ast.unparse(base).rsplit(".", 1)[-1]


def test_every_class_keeps_its_bases() -> None:
    """Each class of the listed modules derives, as loaded, from the classes its source names: in
    a compiled build too, where a base the build did not know would be gone."""
    for name in MODULES:
        module = importlib.import_module(name)
        for node in ast.parse(_source(name).read_text()).body:
            if isinstance(node, ast.ClassDef) and node.bases:
                loaded = [base.__name__ for base in getattr(module, node.name).__bases__]
                assert loaded == [_base_name(base) for base in node.bases], f"{name}.{node.name}"


def test_the_build_name_says_what_runs() -> None:
    """In this test run the listed modules are either all compiled or all interpreted."""
    count = len(compiled_modules())
    assert count in (0, len(MODULES))
    assert build_name() == ("compiled" if count else "interpreted")

"""Homomorphic FILTER and UPDATE: encrypted records the server selects and updates blindly.

Client side: :class:`FheKeys` (imported lazily: it needs the ``fhe`` extra for the concrete
evaluator), :func:`field`, :func:`set_`, :func:`add`, :func:`mul`.  Server side:
:mod:`amaters.fhe.service`.  See docs/fhe.md.
"""

from __future__ import annotations

from typing import Any

from amaters.fhe.predicate import add, field, mul, set_
from amaters.fhe.schema import Schema, SchemaError


def __getattr__(name: str) -> Any:
    if name == "FheKeys":
        from amaters.fhe.keys import FheKeys

        return FheKeys
    raise AttributeError(name)


__all__ = ["FheKeys", "Schema", "SchemaError", "add", "field", "mul", "set_"]

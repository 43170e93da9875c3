"""The value types built for every request (``CipherBlob``, the operations): frozen for the type
checker, compared and hashed by value, and their keys and values kept out of ``repr``."""

from __future__ import annotations

import textwrap
import zlib
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from amaters.query import operations as ops
from amaters.types import CipherBlob, Compression, crc32

ROOT = Path(__file__).resolve().parents[2]


def test_values_compare_and_hash_by_value() -> None:
    blob = CipherBlob(b"ciphertext", 7, 10, Compression.NONE, 5, 2)
    same = CipherBlob(b"ciphertext", 7, 10, Compression.NONE, 5, 2)
    assert blob == same and hash(blob) == hash(same)
    assert blob != CipherBlob(b"ciphertext", 7, 10, Compression.NONE, 5, 3)
    assert len({ops.Get("c", b"k"), ops.Get("c", b"k"), ops.Get("c", b"j")}) == 2
    assert ops.Set("c", b"k", blob) == ops.Set("c", b"k", same)
    assert ops.Get("c", b"k") != ops.Delete("c", b"k")
    assert attrs.evolve(blob, version=3).version == 3 and blob.version == 2


def test_operations_keep_keys_and_values_out_of_repr() -> None:
    shown = repr(ops.Set("people", b"secret-key", CipherBlob.wrap(b"secret-value")))
    assert "people" in shown
    assert "secret" not in shown and "<hidden>" in shown


def test_the_type_checker_refuses_an_assignment_to_a_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing refuses it at run time (that would cost a third of a request's decoding), so this is
    what keeps the types immutable: mypy, as CI runs it, reports every assignment to a field."""
    mypy_api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "assigns.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from amaters.query import operations as ops
            from amaters.types import CipherBlob

            blob = CipherBlob(b"x", 1)
            blob.data = b"y"
            op = ops.Set("c", b"k", blob)
            op.key = b"j"
            ops.Get("c", b"k").collection = "d"
            """
        ).lstrip()
    )
    monkeypatch.setenv("MYPYPATH", str(ROOT))
    out, _, status = mypy_api.run(
        [
            str(snippet),
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--follow-imports",
            "silent",
        ]
    )
    assert status == 1, out
    refused = sorted(line.split(":")[1] for line in out.splitlines() if "is read-only" in line)
    assert refused == ["5", "7", "8"], out


@given(data=st.binary(max_size=5000), start=st.integers(min_value=0, max_value=2**32 - 1))
def test_crc32_is_zlibs(data: bytes, start: int) -> None:
    """The checksum every value carries is zlib's CRC32 (IEEE, as AmateRS and every client compute
    it), whichever code computes it: of bytes, of a memoryview, and continued from a start value."""
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)) == zlib.crc32(data)
    assert crc32(data, start) == zlib.crc32(data, start)


def test_crc32_of_a_large_value_is_zlibs() -> None:
    data = bytes(range(256)) * 8192 + b"tail"  # 2 MiB and 4 bytes: the SIMD loop and its remainder
    assert crc32(data) == zlib.crc32(data)
    assert CipherBlob.wrap(data).checksum_ok()

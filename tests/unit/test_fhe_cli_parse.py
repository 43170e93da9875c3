"""The CLI's predicate, update and record syntax."""

from __future__ import annotations

import pytest

from amaters.cli.fhe import ParseError, parse_predicate, parse_record, parse_updates
from amaters.fhe.predicate import evaluate_plain


@pytest.mark.parametrize(
    ("text", "record", "want"),
    [
        ("age > 30 and not balance == 0", {"age": 42, "balance": 1}, True),
        ("age > 30 and not balance == 0", {"age": 42, "balance": 0}, False),
        ("age <= 17 or age >= 65", {"age": 65, "balance": 0}, True),
        ("not (age < 18 or balance != 5)", {"age": 20, "balance": 5}, True),
        ("age == 1 or age == 2 and balance == 3", {"age": 1, "balance": 0}, True),  # and binds tighter
    ],
)
def test_predicates_parse_with_usual_precedence(text: str, record: dict[str, int], want: bool) -> None:
    assert evaluate_plain(parse_predicate(text), record) is want


@pytest.mark.parametrize(
    "text", ["age >> 3", "age >", "(age > 1", "and > 1", "age > 1 age", "age ~ 1", "age > x"]
)
def test_bad_predicates_give_one_line(text: str) -> None:
    with pytest.raises(ParseError) as e:
        parse_predicate(text)
    assert "\n" not in str(e.value)


def test_updates_and_records() -> None:
    ups = parse_updates("age=40, balance+=5,balance*=2")
    assert [(u.op, u.field, u.value) for u in ups] == [
        ("set", "age", 40),
        ("add", "balance", 5),
        ("mul", "balance", 2),
    ]
    assert parse_record("age=42,balance=1000") == {"age": 42, "balance": 1000}
    with pytest.raises(ParseError, match="FIELD=N"):
        parse_updates("age-=1")
    with pytest.raises(ParseError, match="FIELD=N"):
        parse_record("age:42")

"""API keys: peppered hashes, the keys file, and the checker's hit, miss and expiry answers."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from amaters.auth.apikeys import (
    APIKeyChecker,
    APIKeyEntry,
    generate_api_key,
    hash_api_key,
    load_api_keys,
    parse_api_keys,
)
from amaters.auth.files import AuthConfigError
from amaters.auth.principal import APIKey, ExpiredCredentials, Principal

PEPPER = b"pepper-0123456789abcdef"
NOW = 1_750_000_000.0


def checker_for(*entries: APIKeyEntry, now: float = NOW) -> APIKeyChecker:
    clock = Clock()
    clock.advance(now)
    return APIKeyChecker(entries, PEPPER, clock)


def entry_for(key: str, key_id: str, roles: tuple[str, ...] = ("reader",), **kw: float) -> APIKeyEntry:
    return APIKeyEntry(key_id, f"{key_id} service", hash_api_key(PEPPER, key), roles, kw.get("expires_at"))


def test_hash_is_hmac_sha256_of_the_whole_key_with_the_pepper() -> None:
    """key_hash is hex HMAC-SHA256(pepper, key): not a bare SHA-256, and it depends on the pepper."""
    key = "ak_1.secret"
    assert hash_api_key(PEPPER, key) == hmac.new(PEPPER, key.encode(), hashlib.sha256).hexdigest()
    assert hash_api_key(PEPPER, key) != hashlib.sha256(key.encode()).hexdigest()
    assert hash_api_key(PEPPER + b"x", key) != hash_api_key(PEPPER, key)


def test_generated_keys_carry_their_id_and_256_bits() -> None:
    """new keys look like <id>.<secret>; two keys never repeat; a bad id is refused."""
    key_id, key = generate_api_key()
    assert key.startswith(key_id + ".") and key_id.startswith("ak_")
    assert len(key.split(".", 1)[1]) >= 43
    assert generate_api_key("svc")[1] != generate_api_key("svc")[1]
    with pytest.raises(ValueError):
        generate_api_key("bad.id")


def test_known_key_logs_in_with_its_roles() -> None:
    """A key whose HMAC matches its entry logs in as that entry, with its roles."""
    key_id, key = generate_api_key("billing")
    checker = checker_for(entry_for(key, key_id, ("user",)))
    assert checker.verify(key) == Principal("billing", "billing service", ("user",), "api_key")
    case = SynchronousTestCase()
    assert case.successResultOf(checker.requestAvatarId(APIKey(key))).id == "billing"


def test_wrong_secret_and_unknown_keys_get_the_same_answer() -> None:
    """A known id with a wrong secret, an unknown id and garbage all fail with "invalid API key"."""
    key_id, key = generate_api_key("billing")
    checker = checker_for(entry_for(key, key_id))
    for attempt in (key + "x", "billing.wrong", "other." + key.split(".", 1)[1], "no-dot", "", "x" * 5000):
        with pytest.raises(UnauthorizedLogin) as caught:
            checker.verify(attempt)
        assert str(caught.value) == "invalid API key"
    case = SynchronousTestCase()
    case.failureResultOf(checker.requestAvatarId(APIKey("billing.wrong")), UnauthorizedLogin)


def test_keys_without_an_id_prefix_are_found_by_comparing_every_entry() -> None:
    """A key minted elsewhere (no <id>. prefix) matches the entry holding its hash."""
    legacy = "0123456789abcdef0123456789abcdef"
    checker = checker_for(entry_for("a.b", "a"), entry_for(legacy, "legacy"), entry_for("c.d", "c"))
    assert checker.verify(legacy).id == "legacy"


def test_expired_key_is_refused_as_expired_only_with_the_right_secret() -> None:
    """Past expires_at the right key gets AUTH_EXPIRED; a wrong secret still gets "invalid API key"."""
    key_id, key = generate_api_key("old")
    checker = checker_for(entry_for(key, key_id, expires_at=NOW + 10))
    assert checker.verify(key).id == "old"
    checker.clock.advance(10)  # type: ignore[attr-defined]
    with pytest.raises(ExpiredCredentials, match="expired"):
        checker.verify(key)
    with pytest.raises(UnauthorizedLogin, match="invalid API key"):
        checker.verify(key_id + ".guess")


def test_checker_refuses_a_short_pepper() -> None:
    """A pepper under 16 bytes is refused when the checker is built."""
    with pytest.raises(AuthConfigError, match="16 bytes"):
        APIKeyChecker([], b"short", Clock())


def test_checker_repr_shows_no_hash_or_pepper() -> None:
    """Neither the pepper nor a key hash appears in the checker's or an entry's repr."""
    _, key = generate_api_key("svc")
    entry = entry_for(key, "svc")
    checker = checker_for(entry)
    for text in (repr(checker), repr(entry)):
        assert PEPPER.decode() not in text
        assert entry.key_hash not in text


def test_toml_keys_file(tmp_path: Path) -> None:
    """A TOML keys file with [[keys]] tables, an optional TOML date-time expiry, uppercase hex."""
    _, key = generate_api_key("svc")
    path = tmp_path / "keys.toml"
    path.write_text(
        "[[keys]]\n"
        'id = "svc"\n'
        'name = "the service"\n'
        f'key_hash = "{hash_api_key(PEPPER, key).upper()}"\n'
        'roles = ["user"]\n'
        "expires_at = 2030-01-01T00:00:00Z\n"
        "[[keys]]\n"
        'id = "ops"\n'
        f'key_hash = "{"ab" * 32}"\n'
    )
    entries = load_api_keys(str(path))
    assert entries["svc"].roles == ("user",) and entries["svc"].name == "the service"
    assert entries["svc"].expires_at == 1893456000.0
    assert entries["ops"].roles == () and entries["ops"].name == "ops"
    assert checker_for(*entries.values()).verify(key).id == "svc"


def test_json_keys_file(tmp_path: Path) -> None:
    """A JSON keys file ({"keys": [...]}) with an RFC 3339 string expiry."""
    _, key = generate_api_key("svc")
    path = tmp_path / "keys.json"
    item = {
        "id": "svc",
        "key_hash": hash_api_key(PEPPER, key),
        "roles": [],
        "expires_at": "2030-01-01T01:00:00+01:00",
    }
    path.write_text(json.dumps({"keys": [item]}))
    entries = load_api_keys(str(path))
    assert entries["svc"].expires_at == 1893456000.0


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"id": "a.b", "key_hash": "ab" * 32}, "'id'"),
        ({"id": "a", "key_hash": "xyz"}, "key_hash"),
        ({"id": "a", "key_hash": "ab" * 32, "role": ["admin"]}, "unknown field"),
        ({"id": "a", "key_hash": "ab" * 32, "roles": "admin"}, "roles"),
        ({"id": "a", "key_hash": "ab" * 32, "expires_at": "2030-01-01T00:00:00"}, "UTC offset"),
        ({"id": "a", "key_hash": "ab" * 32, "expires_at": "soon"}, "expires_at"),
    ],
)
def test_bad_entries_are_reported(item: dict[str, object], message: str) -> None:
    """Each malformed entry is named with what is wrong."""
    with pytest.raises(AuthConfigError, match=message):
        parse_api_keys({"keys": [item]})


def test_duplicate_ids_and_every_problem_are_reported() -> None:
    """Duplicate ids are refused, and all problems of a file are listed together."""
    with pytest.raises(AuthConfigError) as caught:
        parse_api_keys(
            {"keys": [{"id": "a", "key_hash": "ab" * 32}, {"id": "a", "key_hash": "cd" * 32}, {"id": "b"}]}
        )
    assert len(caught.value.problems) == 2


def test_unreadable_files_are_reported_without_their_content(tmp_path: Path) -> None:
    """A missing file, bad TOML and bad JSON are reported by path and position, never content."""
    with pytest.raises(AuthConfigError, match="does not exist"):
        load_api_keys(str(tmp_path / "missing.toml"))
    bad = tmp_path / "keys.toml"
    bad.write_text('[[keys]]\nkey_hash = "deadbeefsecret\n')
    with pytest.raises(AuthConfigError) as caught:
        load_api_keys(str(bad))
    assert "deadbeefsecret" not in str(caught.value)
    bad_json = tmp_path / "keys.json"
    bad_json.write_text('{"keys": [{"key_hash": "deadbeefsecret" ')
    with pytest.raises(AuthConfigError) as caught:
        load_api_keys(str(bad_json))
    assert "deadbeefsecret" not in str(caught.value)

"""The JWT checker: every accepted algorithm with real keys, and each way a token must be refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from amaters.auth.files import AuthConfigError
from amaters.auth.jwt import JWTChecker, load_jwt_keys
from amaters.auth.principal import BearerToken, ExpiredCredentials, Principal, SecurityViolation
from amaters.compose import load_server_config
from amaters.config import ConfigError, JWTConfig

NOW = 1_750_000_000
SECRET = "s" * 64  # long enough for HS512


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "ed448": ed448.Ed448PrivateKey.generate(),
    }


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_public(tmp_path: Path, private_key: Any, name: str = "jwt.pub") -> str:
    path = tmp_path / name
    path.write_bytes(public_pem(private_key))
    return str(path)


def make_checker(settings: JWTConfig, now: float = NOW) -> JWTChecker:
    keys = load_jwt_keys(settings)
    assert keys is not None
    clock = Clock()
    clock.advance(now)
    return JWTChecker(keys, settings, clock)


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": NOW + 300, "roles": ["reader"]}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], signing_key: bytes | None) -> str:
    """A token built by hand (PyJWT refuses to sign some of the attacks)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    signature = b""
    if signing_key is not None:
        signature = hmac.new(signing_key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


SIGNERS = {
    "RS256": "rsa",
    "RS384": "rsa",
    "RS512": "rsa",
    "ES256": "p256",
    "ES384": "p384",
    "EdDSA": "ed25519",
}


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_hmac_algorithms_accept_a_valid_token(algorithm: str) -> None:
    """A token signed with the configured secret and an allowed HS algorithm logs in as its subject."""
    settings = JWTConfig(algorithms=[algorithm], secret=SECRET)
    token = jwt.encode(claims(name="Alice A."), SECRET, algorithm=algorithm)
    principal = make_checker(settings).verify(token)
    assert principal == Principal("alice", "Alice A.", ("reader",), "jwt")


@pytest.mark.parametrize("algorithm", sorted(SIGNERS))
def test_public_key_algorithms_accept_a_valid_token(
    algorithm: str, keys: dict[str, Any], tmp_path: Path
) -> None:
    """RS256/384/512, ES256, ES384 and EdDSA tokens verify with the matching public key."""
    private_key = keys[SIGNERS[algorithm]]
    settings = JWTConfig(algorithms=[algorithm], public_key=write_public(tmp_path, private_key))
    token = jwt.encode(claims(), private_key, algorithm=algorithm)
    assert make_checker(settings).verify(token).id == "alice"


def test_eddsa_accepts_ed448(keys: dict[str, Any], tmp_path: Path) -> None:
    """EdDSA also verifies with an Ed448 public key."""
    settings = JWTConfig(algorithms=["EdDSA"], public_key=write_public(tmp_path, keys["ed448"]))
    token = jwt.encode(claims(), keys["ed448"], algorithm="EdDSA")
    assert make_checker(settings).verify(token).id == "alice"


def test_request_avatar_id_fires_with_the_principal() -> None:
    """As a cred checker, requestAvatarId fires with the Principal, or fails with UnauthorizedLogin."""
    checker = make_checker(JWTConfig(secret=SECRET))
    case = SynchronousTestCase()
    good = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert case.successResultOf(checker.requestAvatarId(BearerToken(good))).id == "alice"
    failure = case.failureResultOf(checker.requestAvatarId(BearerToken("not.a.token")), UnauthorizedLogin)
    assert "malformed" in str(failure.value)


def test_expired_token_is_refused_as_expired() -> None:
    """A token whose exp is more than the leeway in the past fails with ExpiredCredentials."""
    checker = make_checker(JWTConfig(secret=SECRET, leeway=30))
    with pytest.raises(ExpiredCredentials, match="expired"):
        checker.verify(jwt.encode(claims(exp=NOW - 31), SECRET, algorithm="HS256"))


def test_leeway_tolerates_small_clock_skew() -> None:
    """A token expired by less than the leeway is still accepted; with no leeway it is not."""
    token = jwt.encode(claims(exp=NOW - 10), SECRET, algorithm="HS256")
    assert make_checker(JWTConfig(secret=SECRET, leeway=30)).verify(token).id == "alice"
    with pytest.raises(ExpiredCredentials):
        make_checker(JWTConfig(secret=SECRET, leeway=0)).verify(token)


def test_expiry_follows_the_injected_clock() -> None:
    """The checker reads time from its clock: the same token expires when the clock moves on."""
    checker = make_checker(JWTConfig(secret=SECRET, leeway=0))
    token = jwt.encode(claims(exp=NOW + 5), SECRET, algorithm="HS256")
    assert checker.verify(token).id == "alice"
    checker.clock.advance(6)  # type: ignore[attr-defined]
    with pytest.raises(ExpiredCredentials):
        checker.verify(token)


def test_not_yet_valid_token_is_refused() -> None:
    """A token whose nbf is beyond now plus the leeway is refused; within the leeway it passes."""
    checker = make_checker(JWTConfig(secret=SECRET, leeway=30))
    with pytest.raises(UnauthorizedLogin, match="not valid yet"):
        checker.verify(jwt.encode(claims(nbf=NOW + 120), SECRET, algorithm="HS256"))
    assert checker.verify(jwt.encode(claims(nbf=NOW + 20), SECRET, algorithm="HS256")).id == "alice"


def test_missing_exp_is_refused() -> None:
    """exp is required: a token without it is refused even with a valid signature."""
    checker = make_checker(JWTConfig(secret=SECRET))
    with pytest.raises(UnauthorizedLogin, match="'exp'"):
        checker.verify(jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"))


def test_non_numeric_exp_is_refused() -> None:
    """An exp that is not a number (a string, a boolean) is refused."""
    checker = make_checker(JWTConfig(secret=SECRET))
    for bad in ("tomorrow", True):
        token = hand_made({"alg": "HS256", "typ": "JWT"}, claims(exp=bad), SECRET.encode())
        with pytest.raises(UnauthorizedLogin):
            checker.verify(token)


def test_wrong_issuer_is_refused() -> None:
    """With auth.jwt.issuer set, a token from another issuer, or with no iss, is refused."""
    checker = make_checker(JWTConfig(secret=SECRET, issuer="https://idp.example"))
    with pytest.raises(UnauthorizedLogin, match="issuer"):
        checker.verify(jwt.encode(claims(iss="https://evil.example"), SECRET, algorithm="HS256"))
    with pytest.raises(UnauthorizedLogin, match="'iss'"):
        checker.verify(jwt.encode(claims(), SECRET, algorithm="HS256"))
    good = jwt.encode(claims(iss="https://idp.example"), SECRET, algorithm="HS256")
    assert checker.verify(good).id == "alice"


def test_wrong_audience_is_refused() -> None:
    """With auth.jwt.audience set, the token's aud must name one of the accepted audiences."""
    checker = make_checker(JWTConfig(secret=SECRET, audience=["amaters", "amaters-eu"]))
    with pytest.raises(UnauthorizedLogin, match="audience"):
        checker.verify(jwt.encode(claims(aud="billing"), SECRET, algorithm="HS256"))
    with pytest.raises(UnauthorizedLogin, match="'aud'"):
        checker.verify(jwt.encode(claims(), SECRET, algorithm="HS256"))
    assert checker.verify(jwt.encode(claims(aud="amaters-eu"), SECRET, algorithm="HS256")).id == "alice"
    assert checker.verify(jwt.encode(claims(aud=["x", "amaters"]), SECRET, algorithm="HS256")).id == "alice"


def test_audience_is_not_checked_when_not_configured() -> None:
    """Without auth.jwt.audience, a token's aud claim is ignored."""
    checker = make_checker(JWTConfig(secret=SECRET))
    assert checker.verify(jwt.encode(claims(aud="anything"), SECRET, algorithm="HS256")).id == "alice"


def test_alg_none_is_refused() -> None:
    """An unsigned token (alg none) is refused as a security violation, in any spelling."""
    checker = make_checker(JWTConfig(secret=SECRET))
    for alg in ("none", "None", "NONE"):
        token = hand_made({"alg": alg, "typ": "JWT"}, claims(roles=["admin"]), None)
        with pytest.raises(SecurityViolation, match="not accepted"):
            checker.verify(token)


def test_hs256_signed_with_the_rsa_public_key_is_refused(keys: dict[str, Any], tmp_path: Path) -> None:
    """Algorithm confusion: an HS256 token whose HMAC key is the server's RSA public key PEM is refused.

    With only the public key configured, HS256 is not on the allow-list; with a secret configured
    too, HS256 verifies with the secret only, so the forged signature does not match.
    """
    pem = public_pem(keys["rsa"])
    forged = hand_made({"alg": "HS256", "typ": "JWT"}, claims(roles=["admin"]), pem)
    only_rsa = make_checker(JWTConfig(public_key=write_public(tmp_path, keys["rsa"])))
    with pytest.raises(SecurityViolation):
        only_rsa.verify(forged)
    both = make_checker(
        JWTConfig(
            algorithms=["HS256", "RS256"], secret=SECRET, public_key=write_public(tmp_path, keys["rsa"])
        )
    )
    with pytest.raises(UnauthorizedLogin, match="signature"):
        both.verify(forged)


def test_public_key_algorithm_is_refused_when_only_a_secret_is_configured(keys: dict[str, Any]) -> None:
    """An RS256 token is refused when only an HMAC secret is configured (no family crossing)."""
    checker = make_checker(JWTConfig(secret=SECRET))
    with pytest.raises(SecurityViolation, match="RS256"):
        checker.verify(jwt.encode(claims(), keys["rsa"], algorithm="RS256"))


def test_algorithm_outside_the_allow_list_is_refused(keys: dict[str, Any], tmp_path: Path) -> None:
    """With algorithms = [RS512], an RS256 token signed by the right key is still refused."""
    settings = JWTConfig(algorithms=["RS512"], public_key=write_public(tmp_path, keys["rsa"]))
    with pytest.raises(SecurityViolation, match="RS256"):
        make_checker(settings).verify(jwt.encode(claims(), keys["rsa"], algorithm="RS256"))


def test_tampered_payload_is_refused(keys: dict[str, Any], tmp_path: Path) -> None:
    """Changing the payload of a signed token (granting admin) breaks its signature."""
    checker = make_checker(JWTConfig(public_key=write_public(tmp_path, keys["p256"])))
    token = jwt.encode(claims(), keys["p256"], algorithm="ES256")
    header, _, signature = token.split(".")
    forged_payload = b64(json.dumps(claims(roles=["admin"])).encode())
    with pytest.raises(UnauthorizedLogin, match="signature"):
        checker.verify(f"{header}.{forged_payload}.{signature}")
    hs_checker = make_checker(JWTConfig(secret=SECRET))
    hs_token = jwt.encode(claims(), SECRET, algorithm="HS256")
    h, _, s = hs_token.split(".")
    with pytest.raises(UnauthorizedLogin, match="signature"):
        hs_checker.verify(f"{h}.{forged_payload}.{s}")


def test_token_signed_by_another_key_is_refused(keys: dict[str, Any], tmp_path: Path) -> None:
    """A well-formed ES256 token signed by a key other than the configured one is refused."""
    checker = make_checker(JWTConfig(public_key=write_public(tmp_path, keys["p256"])))
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(UnauthorizedLogin, match="signature"):
        checker.verify(jwt.encode(claims(), other, algorithm="ES256"))
    wrong_secret = jwt.encode(claims(), "x" * 64, algorithm="HS256")
    with pytest.raises(UnauthorizedLogin, match="signature"):
        make_checker(JWTConfig(secret=SECRET)).verify(wrong_secret)


def test_malformed_and_oversized_tokens_are_refused() -> None:
    """Garbage, an empty string and a token over 16 KiB are refused without parsing trouble."""
    checker = make_checker(JWTConfig(secret=SECRET))
    for token in ("", "abc", "a.b.c", "a" * 20_000):
        with pytest.raises(UnauthorizedLogin):
            checker.verify(token)


def test_subject_is_required() -> None:
    """A token without sub names nobody and is refused."""
    checker = make_checker(JWTConfig(secret=SECRET))
    with pytest.raises(UnauthorizedLogin, match="'sub'"):
        checker.verify(jwt.encode(claims(sub=None), SECRET, algorithm="HS256"))


def test_roles_from_roles_list_or_role_string() -> None:
    """Roles come from a roles list, else a role string; none gives no roles; bad types are refused."""
    checker = make_checker(JWTConfig(secret=SECRET))
    assert checker.verify(jwt.encode(claims(roles=["user", "reader"]), SECRET)).roles == ("user", "reader")
    assert checker.verify(jwt.encode(claims(roles=None, role="admin"), SECRET)).roles == ("admin",)
    assert checker.verify(jwt.encode(claims(roles=None), SECRET)).roles == ()
    with pytest.raises(UnauthorizedLogin, match="roles"):
        checker.verify(jwt.encode(claims(roles="admin"), SECRET))
    with pytest.raises(UnauthorizedLogin, match="role"):
        checker.verify(jwt.encode(claims(roles=None, role=["admin"]), SECRET))


def test_algorithms_are_inferred_from_the_keys(keys: dict[str, Any], tmp_path: Path) -> None:
    """With no algorithms listed: HS256 for a secret, and the public key's own algorithm."""
    assert load_jwt_keys(JWTConfig(secret=SECRET)).algorithms == ("HS256",)  # type: ignore[union-attr]
    for name, expected in (("rsa", "RS256"), ("p256", "ES256"), ("p384", "ES384"), ("ed25519", "EdDSA")):
        found = load_jwt_keys(JWTConfig(public_key=write_public(tmp_path, keys[name], f"{name}.pub")))
        assert found is not None and found.algorithms == (expected,)
    assert load_jwt_keys(JWTConfig()) is None


def test_key_type_must_fit_each_algorithm(keys: dict[str, Any], tmp_path: Path) -> None:
    """Configured algorithms whose key is missing or of the wrong type are configuration errors."""
    rsa_path = write_public(tmp_path, keys["rsa"], "rsa.pub")
    p256_path = write_public(tmp_path, keys["p256"], "p256.pub")
    cases = [
        (JWTConfig(algorithms=["ES256"], public_key=rsa_path), "ES256 cannot be verified"),
        (JWTConfig(algorithms=["ES384"], public_key=p256_path), "ES384 cannot be verified"),
        (JWTConfig(algorithms=["RS256"], public_key=p256_path), "RS256 cannot be verified"),
        (JWTConfig(algorithms=["HS256"], public_key=rsa_path), "HS256 needs auth.jwt.secret"),
        (JWTConfig(algorithms=["RS256"], secret=SECRET), "RS256 needs auth.jwt.public_key"),
        (JWTConfig(algorithms=["HS512"], secret="s" * 32), "at least 64 bytes"),
        (JWTConfig(secret="short"), "at least 32 bytes"),
    ]
    for settings, message in cases:
        with pytest.raises(AuthConfigError, match=message):
            load_jwt_keys(settings)


def test_small_rsa_keys_and_private_keys_are_refused(tmp_path: Path) -> None:
    """An RSA key under 2048 bits, or a private key given as public_key, is a configuration error."""
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(AuthConfigError, match="2048"):
        load_jwt_keys(JWTConfig(public_key=write_public(tmp_path, small)))
    private = tmp_path / "private.pem"
    private.write_bytes(
        small.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(AuthConfigError, match="private key"):
        load_jwt_keys(JWTConfig(public_key=str(private)))


def test_config_refuses_unknown_algorithms_and_never_shows_the_secret() -> None:
    """auth.jwt.algorithms accepts only the allow-list names; a bad secret is reported, not shown."""
    with pytest.raises(ConfigError) as caught:
        load_server_config(None, ['auth.jwt.algorithms=["none"]'], {})
    assert "auth.jwt.algorithms" in str(caught.value)
    secret = "tooshort-secret-value"
    with pytest.raises(ConfigError) as caught:
        load_server_config(None, [f"auth.jwt.secret={secret}"], {})
    assert "at least 32 bytes" in str(caught.value)
    assert secret not in str(caught.value)


def test_secret_file_is_read_without_trailing_newline(tmp_path: Path) -> None:
    """auth.jwt.secret_file holds the secret; its trailing newline is not part of it."""
    path = tmp_path / "jwt.secret"
    path.write_text(SECRET + "\n")
    checker = make_checker(JWTConfig(secret_file=str(path)))
    assert checker.verify(jwt.encode(claims(), SECRET, algorithm="HS256")).id == "alice"
    with pytest.raises(AuthConfigError, match="not both"):
        load_jwt_keys(JWTConfig(secret=SECRET, secret_file=str(path)))

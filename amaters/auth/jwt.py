"""JWT bearer tokens: :class:`JWTChecker`, a ``twisted.cred`` checker built on PyJWT.

Rules (``docs/security.md`` explains them to operators):

- Only algorithms on the allow-list are accepted (``auth.jwt.algorithms``, a subset of HS256/384/512,
  RS256/384/512, ES256/384 and EdDSA); ``none`` never is.
- Each algorithm is bound to one key of its own family: HS* verify with ``auth.jwt.secret`` only,
  RS* with an RSA public key, ES256 with a P-256 key, ES384 with a P-384 key, EdDSA with an Ed25519
  or Ed448 key.  A token's header picks the algorithm, the server picks the key: an HS256 token
  can never be checked against the RSA public key (the classic algorithm-confusion attack), and an
  RS256 token is refused when only a secret is configured.
- ``exp`` is required; ``nbf`` is honoured when present; both with ``auth.jwt.leeway`` seconds of
  slack, against the reactor's clock (so tests can use ``task.Clock``).  ``iss`` and ``aud`` are
  required to match when ``auth.jwt.issuer`` / ``auth.jwt.audience`` are set.
- ``sub`` is required: it is the principal's id.  ``name`` (optional) is its display name.  Roles
  come from ``roles`` (a list of strings) or ``role`` (one string).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from amaters.auth.files import AuthConfigError, read_secret
from amaters.auth.principal import (
    AUTH_JWT,
    ExpiredCredentials,
    IBearerToken,
    Principal,
    SecurityViolation,
)
from amaters.config import JWT_ALGORITHMS, JWTConfig

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

#: Longest token accepted, in characters (a token is parsed before its signature is checked).
MAX_TOKEN_LENGTH = 16 * 1024

#: Smallest HMAC secret per algorithm, in bytes: the hash's output size (RFC 7518 section 3.2).
HMAC_MIN_SECRET = {"HS256": 32, "HS384": 48, "HS512": 64}

#: Smallest RSA modulus accepted, in bits.
RSA_MIN_BITS = 2048


def _family(algorithm: str) -> str:
    return "HS" if algorithm.startswith("HS") else "RS" if algorithm.startswith("RS") else algorithm


def key_fits(algorithm: str, key: PublicKey) -> bool:
    """Whether ``key`` is of the one type ``algorithm`` may be verified with."""
    family = _family(algorithm)
    if family == "RS":
        return isinstance(key, rsa.RSAPublicKey)
    if algorithm == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    if algorithm == "ES384":
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)
    if algorithm == "EdDSA":
        return isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    return False


def _default_algorithm(key: PublicKey) -> str | None:
    for algorithm in ("RS256", "ES256", "ES384", "EdDSA"):
        if key_fits(algorithm, key):
            return algorithm
    return None


def _key_description(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"an RSA key ({key.key_size} bits)"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC key on {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "an Ed25519 key"
    return "an Ed448 key"


def load_public_key(path: str) -> PublicKey:
    """The public key in a PEM file (a public key, or a certificate whose key is used)."""
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AuthConfigError(
            [f"auth.jwt.public_key: cannot read {path!r} ({e.strerror or type(e).__name__})"]
        ) from None
    key: Any
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        message = f"auth.jwt.public_key: {path!r} holds no PEM public key or certificate"
        if b"PRIVATE KEY" in data:
            message += " (it looks like a private key: give the public half only)"
        raise AuthConfigError([message]) from None
    if not isinstance(
        key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
    ):
        raise AuthConfigError([f"auth.jwt.public_key: {path!r} is not an RSA, EC or EdDSA public key"])
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < RSA_MIN_BITS:
        raise AuthConfigError(
            [f"auth.jwt.public_key: the RSA key has {key.key_size} bits; at least {RSA_MIN_BITS} are needed"]
        )
    return key


@attrs.frozen
class JWTKeys:
    """The verification keys and the algorithms they serve (each algorithm bound to one key)."""

    algorithms: tuple[str, ...]
    secret: bytes | None = attrs.field(default=None, repr=False)
    public_key: PublicKey | None = None

    def key_for(self, algorithm: str) -> bytes | PublicKey:
        """The key that verifies ``algorithm``; only call for an allowed algorithm."""
        if _family(algorithm) == "HS":
            assert self.secret is not None
            return self.secret
        assert self.public_key is not None
        return self.public_key


def load_jwt_keys(settings: JWTConfig) -> JWTKeys | None:
    """The keys ``settings`` configure, or None when JWT login is not configured.

    Raises :class:`AuthConfigError` listing every problem: an algorithm without its key, a key of
    the wrong type, a secret shorter than the hash, an unreadable file.
    """
    problems: list[str] = []
    secret: bytes | None = None
    public_key: PublicKey | None = None
    try:
        secret = read_secret(settings.secret, settings.secret_file, "auth.jwt.secret", "auth.jwt.secret_file")
    except AuthConfigError as e:
        problems += e.problems
    if settings.public_key:
        try:
            public_key = load_public_key(settings.public_key)
        except AuthConfigError as e:
            problems += e.problems
    if problems:
        raise AuthConfigError(problems)
    if secret is None and public_key is None:
        if settings.algorithms:
            raise AuthConfigError(
                ["auth.jwt.algorithms: set auth.jwt.secret (HS*) or auth.jwt.public_key for them"]
            )
        return None
    algorithms = list(settings.algorithms)
    if not algorithms:
        if secret is not None:
            algorithms.append("HS256")
        if public_key is not None:
            default = _default_algorithm(public_key)
            if default is None:  # an EC key on another curve
                problems.append(
                    f"auth.jwt.public_key: {_key_description(public_key)} fits none of "
                    + ", ".join(a for a in JWT_ALGORITHMS if _family(a) != "HS")
                )
            else:
                algorithms.append(default)
    for algorithm in algorithms:
        if _family(algorithm) == "HS":
            if secret is None:
                problems.append(f"auth.jwt.algorithms: {algorithm} needs auth.jwt.secret (or secret_file)")
            elif len(secret) < HMAC_MIN_SECRET[algorithm]:
                problems.append(
                    f"auth.jwt.secret: {algorithm} needs a secret of at least"
                    f" {HMAC_MIN_SECRET[algorithm]} bytes (this one has {len(secret)})"
                )
        elif public_key is None:
            problems.append(f"auth.jwt.algorithms: {algorithm} needs auth.jwt.public_key")
        elif not key_fits(algorithm, public_key):
            problems.append(
                f"auth.jwt.algorithms: {algorithm} cannot be verified with auth.jwt.public_key,"
                f" which is {_key_description(public_key)}"
            )
    if problems:
        raise AuthConfigError(problems)
    return JWTKeys(tuple(algorithms), secret, public_key)


@implementer(ICredentialsChecker)
class JWTChecker:
    """Checks :class:`~amaters.auth.principal.IBearerToken` credentials; the avatar id is a Principal.

    Fails with ``UnauthorizedLogin`` (``ExpiredCredentials`` for an expired token,
    ``SecurityViolation`` for a refused algorithm) carrying a client-safe reason.
    """

    credentialInterfaces = (IBearerToken,)

    def __init__(self, keys: JWTKeys, settings: JWTConfig, clock: IReactorTime) -> None:
        self.keys = keys
        self.clock = clock
        self.leeway = settings.leeway
        self.issuer = settings.issuer or None
        self.audience = list(settings.audience) or None
        self._allowed = frozenset(keys.algorithms)

    def requestAvatarId(self, credentials: IBearerToken) -> defer.Deferred[Principal]:  # type: ignore[override]
        # cred types avatar ids as bytes; ours is the Principal, as roles come with the credentials.
        try:
            return defer.succeed(self.verify(credentials.token))
        except UnauthorizedLogin:
            return defer.fail()

    def verify(self, token: str) -> Principal:
        """The principal a token names, or ``UnauthorizedLogin`` saying why not."""
        if not isinstance(token, str) or not token:
            raise UnauthorizedLogin("empty bearer token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise UnauthorizedLogin(f"bearer token longer than {MAX_TOKEN_LENGTH} characters")
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError:
            raise UnauthorizedLogin("malformed bearer token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._allowed:
            # Attacker-chosen text: name it only when it is a known algorithm.
            shown = algorithm if algorithm in (*JWT_ALGORITHMS, "none") else "unsupported"
            raise SecurityViolation(f"token algorithm {shown!r} is not accepted by this server")
        claims = self._decode(token, algorithm)
        self._check_times(claims)
        return self._principal(claims)

    def _decode(self, token: str, algorithm: str) -> dict[str, Any]:
        options: Any = {
            "verify_signature": True,
            # Times are checked against the injected clock in _check_times.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": self.audience is not None,
            "verify_iss": self.issuer is not None,
            "require": ["exp"],
        }
        try:
            return pyjwt.decode(
                token,
                self.keys.key_for(algorithm),
                algorithms=[algorithm],
                options=options,
                audience=self.audience,
                issuer=self.issuer,
            )
        except pyjwt.InvalidSignatureError:
            raise UnauthorizedLogin("token signature is not valid") from None
        except pyjwt.MissingRequiredClaimError as e:
            raise UnauthorizedLogin(f"token has no {e.claim!r} claim") from None
        except pyjwt.InvalidAudienceError:
            raise UnauthorizedLogin("token audience is not accepted") from None
        except pyjwt.InvalidIssuerError:
            raise UnauthorizedLogin("token issuer is not accepted") from None
        except pyjwt.DecodeError:
            raise UnauthorizedLogin("malformed bearer token") from None
        except pyjwt.PyJWTError:
            raise UnauthorizedLogin("bearer token rejected") from None

    def _check_times(self, claims: dict[str, Any]) -> None:
        now = self.clock.seconds()
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise UnauthorizedLogin("token 'exp' claim is not a number")
        if now > exp + self.leeway:
            raise ExpiredCredentials("token expired")
        if "nbf" in claims:
            nbf = claims["nbf"]
            if not isinstance(nbf, (int, float)) or isinstance(nbf, bool):
                raise UnauthorizedLogin("token 'nbf' claim is not a number")
            if now + self.leeway < nbf:
                raise UnauthorizedLogin("token is not valid yet")

    def _principal(self, claims: dict[str, Any]) -> Principal:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise UnauthorizedLogin("token has no 'sub' claim")
        if "roles" in claims:
            roles = claims["roles"]
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise UnauthorizedLogin("token 'roles' claim must be a list of strings")
        elif "role" in claims:
            role = claims["role"]
            if not isinstance(role, str):
                raise UnauthorizedLogin("token 'role' claim must be a string")
            roles = [role]
        else:
            roles = []
        name = claims.get("name")
        return Principal(
            id=subject,
            name=name if isinstance(name, str) and name else subject,
            roles=tuple(dict.fromkeys(r for r in roles if r)),
            auth_method=AUTH_JWT,
        )


__all__ = ["JWTChecker", "JWTKeys", "key_fits", "load_jwt_keys", "load_public_key"]

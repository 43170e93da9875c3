"""Everything auth reads from disk, loaded and checked together: :func:`load_auth_material`.

The configuration's validation calls :func:`auth_problems`, so ``amaters validate-config`` and a
starting server report a bad key file, an unknown role or a JWT key of the wrong type along with
every other configuration problem; the ``auth`` service loads the same material when it starts and
again on reload.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from amaters.auth.apikeys import APIKeyEntry, check_pepper, load_api_keys
from amaters.auth.certs import CertificateVerifier
from amaters.auth.files import AuthConfigError, read_secret
from amaters.auth.jwt import JWTKeys, load_jwt_keys
from amaters.auth.rbac import RBACPolicy
from amaters.config import Config


@attrs.frozen
class AuthMaterial:
    """Keys, API keys, roles and the client-certificate verifier, as the configuration names them.

    ``jwt``, ``api_keys`` and ``verifier`` are None for login methods that are not configured.
    """

    policy: RBACPolicy
    jwt: JWTKeys | None = None
    api_keys: tuple[APIKeyEntry, ...] | None = None
    pepper: bytes | None = attrs.field(default=None, repr=False)
    verifier: CertificateVerifier | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        """The configured login methods, as a client would be told to present them."""
        found = []
        if self.jwt is not None:
            found.append("a bearer token")
        if self.api_keys is not None:
            found.append("an API key")
        if self.verifier is not None:
            found.append("a client certificate")
        return tuple(found)


def _is_file(path: str) -> bool:
    return bool(path) and Path(path).is_file()


def load_auth_material(config: Config) -> AuthMaterial:
    """Read and check every auth file ``config`` names.  Raises AuthConfigError listing every problem."""
    auth = config.auth
    problems: list[str] = []
    jwt_keys = None
    try:
        jwt_keys = load_jwt_keys(auth.jwt)
    except AuthConfigError as e:
        problems += e.problems

    api_keys: tuple[APIKeyEntry, ...] | None = None
    pepper = None
    try:
        pepper = read_secret(
            auth.api_key_pepper, auth.api_key_pepper_file, "auth.api_key_pepper", "auth.api_key_pepper_file"
        )
        if pepper is not None:
            check_pepper(pepper)
    except AuthConfigError as e:
        problems += e.problems
        pepper = None
    if auth.api_keys_file:
        if pepper is None and not (auth.api_key_pepper or auth.api_key_pepper_file):
            problems.append("auth.api_keys_file: needs auth.api_key_pepper or auth.api_key_pepper_file")
        try:
            api_keys = tuple(load_api_keys(auth.api_keys_file).values())
        except AuthConfigError as e:
            problems += e.problems

    policy = RBACPolicy()
    if auth.roles_file:
        try:
            policy = RBACPolicy.load(auth.roles_file)
        except AuthConfigError as e:
            problems += e.problems

    verifier = None
    if config.tls.client_auth != "none":
        # tls.ca and tls.crl being missing files is reported by the configuration's own checks.
        if _is_file(config.tls.ca) and (not config.tls.crl or _is_file(config.tls.crl)):
            try:
                verifier = CertificateVerifier.from_files(config.tls.ca, config.tls.crl)
            except AuthConfigError as e:
                problems += e.problems
    elif auth.mtls.allowed_organizations or auth.mtls.role_map:
        problems.append(
            "auth.mtls: client certificates are not requested while tls.client_auth = 'none';"
            " set it to 'optional' or 'required'"
        )

    for entry in api_keys or ():
        for role in entry.roles:
            if role not in policy.roles:
                problems.append(f"auth.api_keys_file: key {entry.id!r} has unknown role {role!r}")
    for name, roles in auth.mtls.role_map.items():
        for role in roles:
            if role not in policy.roles:
                problems.append(f"auth.mtls.role_map: {name!r} has unknown role {role!r}")

    material = AuthMaterial(policy, jwt_keys, api_keys, pepper if api_keys is not None else None, verifier)
    if auth.enabled and not material.methods and config.tls.client_auth == "none":
        problems.append(
            "auth.enabled: no login method is configured; set auth.jwt.secret or auth.jwt.public_key,"
            " auth.api_keys_file, or tls.client_auth with tls.ca"
        )
    if problems:
        raise AuthConfigError(problems)
    return material


def auth_problems(config: Config) -> list[str]:
    """Every problem :func:`load_auth_material` finds (empty when all is well)."""
    try:
        load_auth_material(config)
    except AuthConfigError as e:
        return e.problems
    return []


__all__ = ["AuthMaterial", "auth_problems", "load_auth_material"]

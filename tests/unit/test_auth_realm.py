"""The authenticator the handshake calls: portal login per credential kind, error mapping, audit,
throttling, logout; and the auth service that builds it from the configuration."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from amaters.auth.apikeys import APIKeyChecker, APIKeyEntry, hash_api_key
from amaters.auth.audit import AuditService
from amaters.auth.certs import CertificateVerifier, ClientCertChecker
from amaters.auth.jwt import JWTChecker, load_jwt_keys
from amaters.auth.principal import IAPIKey, Principal
from amaters.auth.realm import AmatersRealm, PortalAuthenticator, build_portal
from amaters.auth.service import AuthService, build_checkers
from amaters.auth.settings import auth_problems, load_auth_material
from amaters.auth.throttle import AuthThrottle
from amaters.compose import load_server_config
from amaters.config import ConfigError, JWTConfig, MTLSConfig, load_config
from amaters.errors import AuthError, AuthExpired, ErrorCategory, ErrorCode, InvalidCertificate, Unavailable
from amaters.interfaces import IPrincipal
from amaters.protocols.server import Credentials
from amaters.tls.certs import generate_ca, issue_certificate

SECRET = "j" * 32
PEPPER = b"pepper-0123456789abcdef"
API_KEY = "svc.0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"
NOW = datetime.datetime.now(datetime.UTC).timestamp()
#: Certificates are checked at the clock's time (NOW), however long after the import a test runs.
VALID_FROM = datetime.datetime.fromtimestamp(NOW - 300, datetime.UTC)


class Sink:
    """An audit sink that keeps events in a list."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: object) -> None:
        assert isinstance(event, dict)
        self.events.append(event)


@attrs.define
class Setup:
    authenticator: PortalAuthenticator
    realm: AmatersRealm
    audit: Sink
    clock: Clock
    pki: dict[str, Any]
    case: SynchronousTestCase = attrs.Factory(SynchronousTestCase)

    def login(self, credentials: Any = None, peer: Any = None, source: str = "10.0.0.5:4000") -> Any:
        return self.authenticator(credentials, peer, source)

    def ok(self, *args: Any, **kw: Any) -> IPrincipal:
        return self.case.successResultOf(self.login(*args, **kw))

    def refused(self, *args: Any, **kw: Any) -> AuthError:
        failure = self.case.failureResultOf(self.login(*args, **kw), AuthError)
        assert isinstance(failure.value, AuthError)
        return failure.value


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    ca_key, ca = generate_ca(not_before=VALID_FROM)
    return {"ca_key": ca_key, "ca": ca, "other": generate_ca("other", not_before=VALID_FROM)}


@pytest.fixture()
def setup(pki: dict[str, Any]) -> Setup:
    clock = Clock()
    clock.advance(NOW)
    keys = load_jwt_keys(JWTConfig(secret=SECRET))
    assert keys is not None
    entries = [
        APIKeyEntry("svc", "service", hash_api_key(PEPPER, API_KEY), ("user",)),
        APIKeyEntry("old", "old", hash_api_key(PEPPER, "old.k"), ("user",), NOW - 1),
    ]
    checkers = [
        JWTChecker(keys, JWTConfig(secret=SECRET), clock),
        APIKeyChecker(entries, PEPPER, clock),
        ClientCertChecker(
            CertificateVerifier([pki["ca"]]), MTLSConfig(role_map={"id:carol": ["reader"]}), clock
        ),
    ]
    portal, realm = build_portal(checkers)
    audit = Sink()
    authenticator = PortalAuthenticator(
        portal, AuthThrottle(clock, 3), audit, ("a bearer token", "an API key", "a client certificate")
    )
    return Setup(authenticator, realm, audit, clock, pki)


def token(**claims: Any) -> Credentials:
    body = {"sub": "alice", "exp": NOW + 60, "roles": ["admin"], **claims}
    return Credentials("bearer_token", jwt.encode(body, SECRET, algorithm="HS256"))


def test_each_credential_kind_logs_in(setup: Setup) -> None:
    """A bearer token, an API key and a verified client certificate each log in with their roles."""
    assert setup.ok(token()).id == "alice"
    principal = setup.ok(Credentials("api_key", API_KEY))
    assert (principal.id, principal.roles, principal.auth_method) == ("svc", ("user",), "api_key")
    cert = issue_certificate(
        setup.pki["ca_key"], setup.pki["ca"], "carol", client=True, not_before=VALID_FROM
    )[1]
    principal = setup.ok(None, cert)
    assert (principal.id, principal.roles, principal.auth_method) == ("carol", ("reader",), "mtls")
    assert [e["result"] for e in setup.audit.events] == ["success"] * 3
    assert {e["event_type"] for e in setup.audit.events} == {"authentication"}


def test_credentials_win_over_the_certificate(setup: Setup) -> None:
    """With both a token and a certificate the token decides, and a bad token is not rescued by it."""
    cert = issue_certificate(
        setup.pki["ca_key"], setup.pki["ca"], "carol", client=True, not_before=VALID_FROM
    )[1]
    assert setup.ok(token(), cert).auth_method == "jwt"
    assert setup.refused(Credentials("bearer_token", "garbage"), cert).code == ErrorCode.AUTH_FAILED


def test_anonymous_client_is_refused(setup: Setup) -> None:
    """No credentials and no certificate: AUTH_FAILED naming what to present, audited, not throttled."""
    error = setup.refused()
    assert error.code == ErrorCode.AUTH_FAILED and error.category == ErrorCategory.AUTH
    assert "a bearer token or an API key or a client certificate" in error.message
    assert setup.audit.events[-1]["result"] == "failure"
    for _ in range(5):
        setup.refused()
    assert setup.authenticator.throttle.tracked == 0


def test_failures_map_to_the_right_codes(setup: Setup) -> None:
    """Expired credentials → AUTH_EXPIRED, a rejected certificate → AUTH_INVALID_CERTIFICATE, else AUTH_FAILED."""
    assert isinstance(setup.refused(token(exp=NOW - 3600), source="10.0.1.1:1"), AuthExpired)
    assert isinstance(setup.refused(Credentials("api_key", "old.k"), source="10.0.2.1:1"), AuthExpired)
    foreign = issue_certificate(*setup.pki["other"], "mallory", client=True)[1]
    assert isinstance(setup.refused(None, foreign, source="10.0.3.1:1"), InvalidCertificate)
    assert (
        setup.refused(Credentials("api_key", "svc.wrong"), source="10.0.4.1:1").message == "invalid API key"
    )
    assert (
        setup.refused(Credentials("password", "hunter2"), source="10.0.5.1:1").code == ErrorCode.AUTH_FAILED
    )


def test_refused_algorithms_are_audited_as_security_violations(setup: Setup) -> None:
    """An alg=none token is refused and audited as a security violation."""
    unsigned = jwt.encode({"sub": "alice", "exp": NOW + 60}, None, algorithm="none")
    setup.refused(Credentials("bearer_token", unsigned))
    event = setup.audit.events[-1]
    assert (event["event_type"], event["result"], event["auth_method"]) == (
        "security_violation",
        "failure",
        "jwt",
    )


def test_secrets_never_reach_the_audit_log_or_the_client(setup: Setup) -> None:
    """Neither a presented API key nor a token appears in audit events or error messages."""
    attempts = [
        Credentials("api_key", API_KEY + "x"),
        token(exp=NOW - 3600),
        Credentials("api_key", "nodot-secret"),
    ]
    for credentials in attempts:
        error = setup.refused(credentials)
        assert credentials.secret not in error.message
    text = repr(setup.audit.events)
    for credentials in attempts:
        assert credentials.secret not in text
    assert "nodot-secret" not in text


def test_repeated_failures_throttle_the_source(setup: Setup) -> None:
    """After the limit, the address is refused with a retryable error before credentials are checked."""
    for _ in range(3):
        setup.refused(Credentials("api_key", "svc.wrong"), source="10.0.0.9:1")
    error = setup.refused(Credentials("api_key", API_KEY), source="10.0.0.9:2")
    assert error.code == ErrorCode.AUTH_FAILED and error.retryable
    assert error.retry_after_ms is not None and 0 < error.retry_after_ms <= 60_000
    assert setup.audit.events[-1]["event_type"] == "security_violation"
    # The key 'svc' was guessed at: it is throttled from every network; other credentials are not.
    assert setup.refused(Credentials("api_key", API_KEY), source="10.0.99.1:1").retryable
    assert setup.ok(token(), source="10.0.99.1:2") is not None
    setup.clock.advance(61)
    assert setup.ok(Credentials("api_key", API_KEY), source="10.0.0.9:3").id == "svc"


def test_logout_is_tracked_and_idempotent(setup: Setup) -> None:
    """Each login counts as a session until its avatar's logout is called; calling twice is harmless."""
    first, second = setup.ok(token()), setup.ok(token())
    assert setup.realm.session_count == 2
    first.logout()  # type: ignore[attr-defined]
    first.logout()  # type: ignore[attr-defined]
    assert setup.realm.session_count == 1
    second.logout()  # type: ignore[attr-defined]
    assert setup.realm.session_count == 0


def test_unexpected_checker_errors_are_logged_and_answered_generically() -> None:
    """A checker that crashes yields a generic AUTH_FAILED; the traceback goes to the log only."""

    @implementer(ICredentialsChecker)
    class Exploding:
        credentialInterfaces = (IAPIKey,)

        def requestAvatarId(self, credentials: Any) -> Any:
            return defer.fail(RuntimeError("database password is hunter2"))

    portal, _ = build_portal([Exploding()])
    audit = Sink()
    authenticator = PortalAuthenticator(portal, AuthThrottle(Clock(), 3), audit)
    logged: list[LogEvent] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        failure = SynchronousTestCase().failureResultOf(
            authenticator(Credentials("api_key", "a.b"), None, "10.0.0.1:1"), AuthError
        )
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert failure.value.message == "authentication failed"
    assert any(e.get("log_failure") is not None for e in logged)
    assert "hunter2" not in repr(audit.events)


def test_realm_refuses_foreign_interfaces_and_avatar_ids() -> None:
    """The realm only hands out IPrincipal avatars for Principal avatar ids."""
    realm = AmatersRealm()
    with pytest.raises(NotImplementedError):
        realm.requestAvatar(Principal("a", "a", (), "jwt"), None, UnauthorizedLogin)
    with pytest.raises(TypeError):
        realm.requestAvatar(b"alice", None, IPrincipal)


# -- configuration and the auth service ------------------------------------------------------------


def write_keys(tmp_path: Path, roles: str = '["user"]') -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nid = "svc"\nkey_hash = "{hash_api_key(PEPPER, API_KEY)}"\nroles = {roles}\n')
    return path


def test_config_validation_reports_auth_problems(tmp_path: Path) -> None:
    """load_server_config lists auth problems: no method, a missing pepper, unknown roles, bad files."""
    with pytest.raises(ConfigError, match="no login method"):
        load_server_config(None, ["auth.enabled=true"], {})
    with pytest.raises(ConfigError, match=r"needs auth\.api_key_pepper"):
        load_server_config(None, [f"auth.api_keys_file={write_keys(tmp_path)}"], {})
    keys = write_keys(tmp_path, '["superuser"]')
    with pytest.raises(ConfigError, match="unknown role 'superuser'"):
        load_server_config(None, [f"auth.api_keys_file={keys}", f"auth.api_key_pepper={PEPPER.decode()}"], {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_server_config(None, [f"auth.roles_file={tmp_path / 'nope.toml'}"], {})
    with pytest.raises(ConfigError, match=r"tls\.client_auth = 'none'"):
        load_server_config(None, ['auth.mtls.allowed_organizations=["Acme"]'], {})
    with pytest.raises(ConfigError) as caught:
        load_server_config(None, ["auth.api_key_pepper=short-pepper"], {})
    assert "short-pepper" not in str(caught.value)


def test_valid_auth_config_loads(tmp_path: Path) -> None:
    """A config with JWT, API keys and a roles file validates and yields every login method."""
    roles = tmp_path / "roles.json"
    roles.write_text('{"roles": {"svc": {"inherits": ["user"]}}}')
    keys = write_keys(tmp_path, '["svc"]')
    config = load_config(
        None,
        [
            "auth.enabled=true",
            f"auth.jwt.secret={SECRET}",
            f"auth.api_keys_file={keys}",
            f"auth.api_key_pepper={PEPPER.decode()}",
            f"auth.roles_file={roles}",
        ],
        {},
    )
    assert auth_problems(config) == []
    material = load_auth_material(config)
    assert material.methods == ("a bearer token", "an API key")
    assert len(build_checkers(material, config, Clock())) == 2
    assert PEPPER.decode() not in repr(material) and SECRET not in repr(material)


def test_auth_service_loads_on_start_and_reloads_all_or_nothing(tmp_path: Path) -> None:
    """The auth service is not ready before it starts; a reload with a bad file changes nothing."""
    keys = write_keys(tmp_path)
    config = load_config(
        None,
        ["auth.enabled=true", f"auth.api_keys_file={keys}", f"auth.api_key_pepper={PEPPER.decode()}"],
        {},
    )
    clock = Clock()
    audit = AuditService(config.audit, tmp_path, clock)
    auth = AuthService(config, clock, audit)
    case = SynchronousTestCase()
    case.failureResultOf(auth.authenticate(Credentials("api_key", API_KEY), None, "1.2.3.4:5"), Unavailable)
    auth.startService()
    principal = case.successResultOf(auth.authenticate(Credentials("api_key", API_KEY), None, "1.2.3.4:5"))
    assert principal.roles == ("user",)
    keys.write_text("[[keys]]\nid = 1\n")
    with pytest.raises(ConfigError, match="'id'"):
        auth.reload(config)
    assert case.successResultOf(auth.authenticate(Credentials("api_key", API_KEY), None, "1.2.3.4:5"))
    write_keys(tmp_path, '["reader"]')
    auth.reload(config)
    principal = case.successResultOf(auth.authenticate(Credentials("api_key", API_KEY), None, "1.2.3.4:5"))
    assert principal.roles == ("reader",)
    auth.stopService()


def test_private_keys_in_public_key_setting_are_not_echoed(tmp_path: Path) -> None:
    """A private key given as auth.jwt.public_key is refused without its content in the message."""
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "k.pem"
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        load_server_config(None, [f"auth.jwt.public_key={path}"], {})
    assert data.decode().splitlines()[1] not in str(caught.value)


def test_service_tree_wiring(tmp_path: Path) -> None:
    """With auth on, 'audit' and 'auth' start before the listener, the listener logs in through the
    auth service, RBAC is the first pipeline stage; with auth and audit off, no stage is added."""
    from twisted.internet.testing import MemoryReactorClock

    from amaters.tap import build_service

    config = load_config(
        None,
        [
            f"server.data_dir={tmp_path}",
            "storage.backend=memory",
            "auth.enabled=true",
            f"auth.jwt.secret={SECRET}",
            "audit.enabled=true",
        ],
        {},
    )
    root = build_service(config, MemoryReactorClock())
    names = [child.name for child in root]
    assert names.index("audit") < names.index("auth") < names.index("listener")
    listener = root.getServiceNamed("listener")
    assert listener.factory.authenticate is root.components.authenticate
    # Every front end logs in through the auth service: before it has started, it refuses.
    refused = root.components.authenticate(Credentials("bearer_token", "x"), None, "127.0.0.1:1")
    assert "starting" in SynchronousTestCase().failureResultOf(refused).getErrorMessage()
    stages = [stage.name for stage in root.components.pipeline.stages]
    assert "rbac" in stages and "audit" in stages
    assert stages.index("rbac") < stages.index("audit")
    # After the admission stages (shedding, rate limits), before everything else that does work.
    assert next(s for s in stages if s not in ("tracing", "shed", "ratelimit")) == "rbac"
    assert stages.index("rbac") > stages.index("ratelimit")
    assert root.components.auth in root.components.reloader.components
    assert not (tmp_path / "audit.log").exists()  # wiring does no I/O

    plain = build_service(
        load_config(None, [f"server.data_dir={tmp_path}", "storage.backend=memory"], {}), MemoryReactorClock()
    )
    anonymous = plain.components.authenticate(None, None, "127.0.0.1:1")
    assert SynchronousTestCase().successResultOf(anonymous).auth_method == "anonymous"
    assert not {"rbac", "audit"} & {stage.name for stage in plain.components.pipeline.active_stages}

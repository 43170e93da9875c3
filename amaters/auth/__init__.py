"""Authentication, authorization and audit: ``twisted.cred`` checkers, realm, RBAC and the audit log.

How the pieces fit (``docs/security.md`` has the operator's view)::

    handshake ──▶ PortalAuthenticator (realm.py)        throttle.py: failures per source address
                    └─ Portal(AmatersRealm, checkers)   jwt.py, apikeys.py, certs.py
                         └─ Principal (principal.py), held by the session; logout on disconnect
    request ───▶ QueryPipeline
                    ├─ AuthorizationStage (stage.py)     rbac.py: read < write < admin, deny by default
                    └─ AuditStage (stage.py)             audit.py: JSON lines, rotated by size

:mod:`amaters.auth.service` builds all of it from the configuration (``build_auth``) and owns the
``auth`` and ``audit`` services; :mod:`amaters.auth.settings` reads and validates the files the
configuration names (keys, roles, API keys) so ``amaters validate-config`` reports their problems.

Importing this package does nothing else: the configuration module imports
:mod:`amaters.auth.settings` while validating.
"""

"""RBAC: built-in roles, the operation → permission mapping, roles files, and property tests for
inheritance, globs, deny-by-default and cycle detection."""

from __future__ import annotations

import fnmatch
import graphlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amaters.auth.files import AuthConfigError
from amaters.auth.rbac import (
    Access,
    Grant,
    Permission,
    RBACPolicy,
    Role,
    required_access,
)
from amaters.query import operations as ops
from amaters.types import CipherBlob

BLOB = CipherBlob.wrap(b"x")
READ, WRITE, ADMIN = Permission.READ, Permission.WRITE, Permission.ADMIN

ALL_OPS = [
    (ops.Get("c", b"k"), "get", "collection:c", READ),
    (ops.Range("c", b"a", None), "range", "collection:c", READ),
    (ops.Set("c", b"k", BLOB), "set", "collection:c", WRITE),
    (ops.Delete("c", b"k"), "delete", "collection:c", WRITE),
    (ops.CreateCollection("c"), "create_collection", "collection:c", Permission.CREATE),
    (ops.DropCollection("c"), "drop_collection", "collection:c", ADMIN),
    (ops.ListCollections(), "list_collections", "server", READ),
    (ops.ServerInfo(), "server_info", "server", READ),
    (ops.HealthCheck(), "health_check", "server", READ),
]


@pytest.mark.parametrize(("op", "name", "resource", "permission"), ALL_OPS)
def test_every_operation_maps_to_a_permission_and_resource(
    op: object, name: str, resource: str, permission: Permission
) -> None:
    """GET/RANGE need read, SET/DELETE write, create collection create, drop collection admin,
    server ops read on server."""
    assert required_access(op) == (Access(name, resource, permission),)


def test_batch_needs_what_each_item_needs() -> None:
    """A batch needs each item's permission on each item's own collection."""
    batch = ops.Batch((ops.Get("a", b"k"), ops.Set("b", b"k", BLOB)))
    assert required_access(batch) == (
        Access("batch (get)", "collection:a", READ),
        Access("batch (set)", "collection:b", WRITE),
    )
    policy = RBACPolicy([Role("mixed", (Grant("collection:a", READ), Grant("collection:b", WRITE)))])
    assert policy.denial(("mixed",), batch) is None
    swapped = ops.Batch((ops.Set("a", b"k", BLOB),))
    assert policy.denial(("mixed",), swapped) == Access("batch (set)", "collection:a", WRITE)


def test_unknown_operations_need_admin_on_the_server() -> None:
    """An operation without a known kind needs admin on the server (deny by default)."""

    class Mystery:
        name = "mystery"
        collection = None

    assert required_access(Mystery()) == (Access("mystery", "server", ADMIN),)


def test_builtin_roles() -> None:
    """admin may do everything; user reads and writes collections but not admin; reader only reads."""
    policy = RBACPolicy()
    for op, _, _, needed in ALL_OPS:
        assert policy.denial(("admin",), op) is None
        assert (policy.denial(("user",), op) is None) == (needed <= WRITE)
        assert (policy.denial(("reader",), op) is None) == (needed <= READ)
    assert policy.allowed(("admin",), "server", ADMIN)
    assert not policy.allowed(("user",), "server", WRITE)


def test_no_roles_and_unknown_roles_are_denied_everything() -> None:
    """A principal without roles, or with only undefined roles, is denied every operation."""
    policy = RBACPolicy()
    for op, *_ in ALL_OPS:
        assert policy.denial((), op) is not None
        assert policy.denial(("superuser",), op) is not None


def test_roles_file_in_toml_and_json(tmp_path: Path) -> None:
    """Custom roles load from TOML or JSON, inherit built-in and custom roles, and use globs."""
    toml = tmp_path / "roles.toml"
    toml.write_text(
        "[roles.analyst]\n"
        'inherits = ["reader"]\n'
        'permissions = [{ resource = "collection:reports_*", permission = "write" }]\n'
        "[roles.lead]\n"
        'inherits = ["analyst"]\n'
        "[[roles.lead.permissions]]\n"
        'resource = "collection:reports_2025"\n'
        'permission = "admin"\n'
    )
    policy = RBACPolicy.load(str(toml))
    assert policy.allowed(("analyst",), "collection:reports_q1", WRITE)
    assert not policy.allowed(("analyst",), "collection:orders", WRITE)
    assert policy.allowed(("analyst",), "collection:orders", READ)
    assert policy.allowed(("lead",), "collection:reports_2025", ADMIN)
    assert not policy.allowed(("lead",), "collection:reports_2024", ADMIN)
    json_file = tmp_path / "roles.json"
    json_file.write_text(
        '{"roles": {"ops": {"permissions": [{"resource": "server", "permission": "admin"}]}}}'
    )
    assert RBACPolicy.load(str(json_file)).allowed(("ops",), "server", ADMIN)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[roles.admin]\npermissions = []\n", "built in"),
        ('[roles.a]\ninherits = ["nobody"]\n', "unknown role 'nobody'"),
        ('[roles.a]\ninherits = ["b"]\n[roles.b]\ninherits = ["a"]\n', "cycle: a -> b -> a"),
        ('[roles.a]\ninherits = ["a"]\n', "cycle: a -> a"),
        ('[roles.a]\npermissions = [{ resource = "table:x", permission = "read" }]\n', "resource"),
        ('[roles.a]\npermissions = [{ resource = "server", permission = "root" }]\n', "permission"),
        ("[roles.a]\npermisions = []\n", "unknown field"),
        ('[roles."bad name"]\n', "role names"),
        ("[rolez.a]\n", "unknown top-level"),
    ],
)
def test_bad_roles_files_are_reported(tmp_path: Path, body: str, message: str) -> None:
    """Redefined built-ins, unknown parents, cycles, bad resources and typos are configuration errors."""
    path = tmp_path / "roles.toml"
    path.write_text(body)
    with pytest.raises(AuthConfigError, match=message):
        RBACPolicy.load(str(path))


def test_denial_names_the_first_missing_access() -> None:
    """denial() names the operation, resource and permission that is missing."""
    assert RBACPolicy().denial(("reader",), ops.Set("orders", b"k", BLOB)) == Access(
        "set", "collection:orders", WRITE
    )


# -- properties ---------------------------------------------------------------------------------

names = st.text(alphabet="abcdefgh_.-0", min_size=1, max_size=6)
patterns = st.one_of(
    st.just("*"),
    st.just("server"),
    st.builds(lambda n: "collection:" + n, st.text(alphabet="abc*?_", min_size=1, max_size=5)),
)
grants = st.builds(Grant, patterns, st.sampled_from(list(Permission)))
resources = st.one_of(st.just("server"), st.builds(lambda n: "collection:" + n, names))
permissions = st.sampled_from(list(Permission))


@st.composite
def acyclic_roles(draw: st.DrawFn) -> list[Role]:
    """Custom roles r0..rn where a role inherits only earlier ones (or built-ins): never a cycle."""
    count = draw(st.integers(0, 6))
    roles: list[Role] = []
    for index in range(count):
        parents = draw(
            st.lists(st.sampled_from([r.name for r in roles] + ["admin", "user", "reader"]), max_size=3)
        )
        roles.append(Role(f"r{index}", tuple(draw(st.lists(grants, max_size=3))), tuple(parents)))
    return roles


@settings(max_examples=200, deadline=None)
@given(acyclic_roles(), resources, permissions)
def test_inheritance_only_adds_permissions(roles: list[Role], resource: str, permission: Permission) -> None:
    """A role may do everything each role it inherits may do (and whatever its own grants add)."""
    policy = RBACPolicy(roles)
    for role in policy.roles.values():
        for parent in role.inherits:
            if policy.allowed((parent,), resource, permission):
                assert policy.allowed((role.name,), resource, permission)


@settings(max_examples=200, deadline=None)
@given(acyclic_roles(), resources, permissions)
def test_decisions_equal_a_direct_reading_of_the_grants(
    roles: list[Role], resource: str, permission: Permission
) -> None:
    """allowed() is true exactly when some grant reachable through inheritance covers the resource
    at that permission or higher: nothing is allowed that no grant gives (deny by default)."""
    policy = RBACPolicy(roles)
    for name in policy.roles:
        reachable, stack = set(), [name]
        while stack:
            current = stack.pop()
            if current not in reachable:
                reachable.add(current)
                stack.extend(policy.roles[current].inherits)
        expected = False
        for role_name in reachable:
            for grant in policy.roles[role_name].grants:
                if grant.permission < permission:
                    continue
                pattern = grant.pattern
                if pattern == "*" or (pattern == "server" and resource == "server"):
                    expected = True
                elif pattern.startswith("collection:") and resource.startswith("collection:"):
                    expected = expected or fnmatch.fnmatchcase(resource[11:], pattern[11:])
        assert policy.allowed((name,), resource, permission) == expected


@settings(max_examples=200, deadline=None)
@given(resources, permissions, permissions)
def test_higher_permissions_include_lower_ones(resource: str, granted: Permission, asked: Permission) -> None:
    """A grant of one permission allows every lower one and none higher."""
    policy = RBACPolicy([Role("r", (Grant("*", granted),))])
    assert policy.allowed(("r",), resource, asked) == (asked <= granted)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab*?", min_size=1, max_size=4), names)
def test_collection_globs_match_like_fnmatch(glob: str, collection: str) -> None:
    """collection:<glob> covers exactly the collections the glob matches, and never the server."""
    policy = RBACPolicy([Role("r", (Grant("collection:" + glob, ADMIN),))])
    assert policy.allowed(("r",), "collection:" + collection, READ) == fnmatch.fnmatchcase(collection, glob)
    assert not policy.allowed(("r",), "server", READ)


@settings(max_examples=200, deadline=None)
@given(st.lists(names, max_size=3), resources, permissions)
def test_undefined_roles_grant_nothing(role_names: list[str], resource: str, permission: Permission) -> None:
    """Roles that are not defined (not built-in, not custom) never allow anything."""
    policy = RBACPolicy()
    unknown = [n for n in role_names if n not in policy.roles]
    assert not policy.allowed(tuple(unknown), resource, permission)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from("abcdef"), st.lists(st.sampled_from("abcdef"), max_size=3), max_size=6)
)
def test_cycles_are_detected_exactly(graph: dict[str, list[str]]) -> None:
    """A set of roles is refused as cyclic exactly when its inheritance graph has a cycle."""
    roles = [Role(name, (), tuple(p for p in parents if p in graph)) for name, parents in graph.items()]
    sorter = graphlib.TopologicalSorter({r.name: r.inherits for r in roles})
    try:
        sorter.prepare()
        cyclic = False
    except graphlib.CycleError:
        cyclic = True
    if cyclic:
        with pytest.raises(AuthConfigError, match="cycle"):
            RBACPolicy(roles)
    else:
        RBACPolicy(roles)


@settings(max_examples=100, deadline=None)
@given(
    acyclic_roles(), st.lists(st.sampled_from(["admin", "user", "reader", "r0", "r1", "nobody"]), max_size=2)
)
def test_remembered_decisions_match_fresh_ones(roles: list[Role], principal_roles: list[str]) -> None:
    """denial() remembers decisions per (roles, operation type, collection): asking twice, or asking
    a policy that never saw the question, gives the same answer for every operation."""
    remembering = RBACPolicy(roles)
    for op, *_ in ALL_OPS:
        first = remembering.denial(tuple(principal_roles), op)
        assert remembering.denial(tuple(principal_roles), op) == first
        assert RBACPolicy(roles).denial(tuple(principal_roles), op) == first

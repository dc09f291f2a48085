"""Host names are admin-only: HostMask on the bodies a member receives."""

from __future__ import annotations

from services.api.auth import Principal
from services.api.config import Role
from services.api.visibility import HostMask, host_alias

KEY = "k" * 64
MEMBER = Principal("alice", Role.MEMBER)
ADMIN = Principal("ops", Role.ADMIN)


def mask(caller: Principal = MEMBER, hosts: tuple[str, ...] = ("node-1", "node-10")) -> HostMask:
    return HostMask.for_caller(caller, lambda: hosts, lambda: KEY)


def test_alias_is_stable_within_a_project_and_differs_across_projects() -> None:
    assert host_alias(KEY, "alice", "node-1") == host_alias(KEY, "alice", "node-1")
    assert host_alias(KEY, "alice", "node-1") != host_alias(KEY, "alice", "node-2")
    assert host_alias(KEY, "alice", "node-1") != host_alias(KEY, "bob", "node-1")
    assert "node" not in host_alias(KEY, "alice", "node-1")
    # Keyed: hashing guessed host names does not give the alias without the registry's key.
    assert host_alias(KEY, "alice", "node-1") != host_alias("x" * 64, "alice", "node-1")


def test_an_admin_sees_everything_unchanged() -> None:
    body = {"host": "node-1", "detail": "node-1 is full", "filtered": {"memory": ["node-10"]}}
    assert mask(ADMIN).body(body) == body
    assert mask(ADMIN).name("node-1") == "node-1"


def test_host_fields_filtered_lists_and_free_text_are_masked() -> None:
    m = mask()
    a1, a10, a7 = (host_alias(KEY, "alice", h) for h in ("node-1", "node-10", "node-7"))
    body = {
        "detail": "2 host(s) refused: node-10 (no_capacity), node-1 (spawn_failed); node-7 down",
        "attempts": [{"host": "node-10", "code": "no_capacity", "message": "node-10: full"}],
        "filtered": {"group_policy": ["node-1"], "alive": ["node-7"]},
        "event": {"source_host": "node-7", "name": "node-1-web", "reason": "moved to node-1."},
    }
    assert m.body(body) == {
        "detail": f"2 host(s) refused: {a10} (no_capacity), {a1} (spawn_failed); {a7} down",
        "attempts": [{"host": a10, "code": "no_capacity", "message": f"{a10}: full"}],
        "filtered": {"group_policy": [a1], "alive": [a7]},
        # A domain's own name is not free text, and `node-1-web` is not the host `node-1`.
        "event": {"source_host": a7, "name": "node-1-web", "reason": f"moved to {a1}."},
    }


def test_matches_takes_the_alias_from_a_member_and_the_name_from_an_admin() -> None:
    assert mask().matches("node-1", host_alias(KEY, "alice", "node-1"))
    assert not mask().matches("node-1", "node-1")
    assert mask(ADMIN).matches("node-1", "node-1")
    assert not mask().matches(None, "node-1")

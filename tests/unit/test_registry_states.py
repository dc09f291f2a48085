"""The registry's saves and snapshot trees: parent, current, re-parenting on delete, quota."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos.bindings import StateRef
from protos.domain import PowerState
from protos.replies import DomainInfo, SavedState
from services.api.registry import Registry
from services.api.saved_states import SnapshotNameInUse, StateQuotaExceeded
from services.api.snapshot_models import snapshot_views

DOMAIN = uuid.uuid4()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry.open(f"sqlite:///{tmp_path / 'reg.db'}")
    yield reg
    reg.close()


def saved(size: int = 100, domain_id: uuid.UUID = DOMAIN) -> SavedState:
    info = DomainInfo(
        domain_id=domain_id,
        name="d",
        host="node-1",
        state=PowerState.RUNNING,
        vcpus=1,
        memory_mib=64,
        seq=1,
    )
    return SavedState(
        domain_id=domain_id,
        state=StateRef(state_id=uuid.uuid4(), host="node-1"),
        memory=True,
        power=PowerState.RUNNING,
        bytes=size,
        taken_at=time.time(),
        domain=info,
    )


def snap(registry: Registry, name: str, size: int = 100, limit: int | None = None) -> uuid.UUID:
    record = registry.states.add(saved(size), project="p", kind="snapshot", limit=limit, name=name)
    return record.id


def tree(registry: Registry) -> dict[str, tuple[str | None, list[str], bool]]:
    views = snapshot_views(registry.states.of_domain(DOMAIN, "snapshot"))
    return {v.name: (v.parent, v.children, v.current) for v in views}


def test_snapshots_chain_from_the_current_one_and_revert_moves_it(registry: Registry) -> None:
    a = snap(registry, "a")
    snap(registry, "b")
    registry.states.set_current(DOMAIN, a)
    snap(registry, "c")  # a sibling of b: its parent is the current snapshot, a
    assert tree(registry) == {
        "a": (None, ["b", "c"], False),
        "b": ("a", [], False),
        "c": ("a", [], True),
    }


def test_deleting_a_middle_node_reparents_its_children(registry: Registry) -> None:
    snap(registry, "a")
    b = snap(registry, "b")
    snap(registry, "c")
    registry.states.set_current(DOMAIN, b)
    removed = registry.states.remove(b)
    assert removed is not None
    assert removed.name == "b"
    assert tree(registry) == {"a": (None, ["c"], True), "c": ("a", [], False)}
    assert registry.states.remove(b) is None


def test_names_are_unique_per_domain(registry: Registry) -> None:
    snap(registry, "a")
    with pytest.raises(SnapshotNameInUse):
        snap(registry, "a")
    other = saved(domain_id=uuid.uuid4())
    registry.states.add(other, project="p", kind="snapshot", limit=None, name="a")


def test_the_quota_counts_every_state_of_the_project(registry: Registry) -> None:
    snap(registry, "a", 600, limit=1000)
    registry.states.add(saved(300), project="p", kind="save", limit=1000)
    with pytest.raises(StateQuotaExceeded) as exc:
        snap(registry, "b", 200, limit=1000)
    assert (exc.value.used, exc.value.requested) == (900, 200)
    assert registry.states.usage("p") == 900
    assert list(tree(registry)) == ["a"]  # nothing stored
    registry.states.add(saved(50), project="q", kind="save", limit=100)  # another project's

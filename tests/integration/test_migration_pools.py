"""The scheduler's `pools` filter end to end: the API, the storage service, the scheduler and
three fake-driver compute nodes on a real broker, whose `dir` pools differ. A shut-off domain
whose volume is on a host-local pool migrates only to a host with a pool of that name, even
when another host would weigh better; with no such host the answer is `no_valid_host`
naming the filter (docs/migration.md, "The control plane: API, scheduler")."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute_node.config import ComputeConfig, PoolConfig
from compute_node.fake import FakeDriver
from compute_node.node import ComputeNode
from services.api import ApiConfig, TokenEntry
from services.api.config import Role
from services.network.config import NetworkConfig
from services.network.service import NetworkServer
from services.scheduler import Scheduler, SchedulerConfig
from services.storage.config import StorageConfig
from services.storage.server import StorageServer
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.brokers import API_EVENTS, STORAGE_EVENTS, purge_queues
from tests.integration.test_api import ADMIN, ApiServer, Cloud, auth

pytestmark = pytest.mark.integration

# Host 0 has `fast` and `solo`, host 1 `fast`, host 2 neither but the most room: the weighers
# would pick it for any domain that may go there.
POOLS = (("fast", "solo"), ("fast",), ())
SIZES = ((4, 2048), (4, 2048), (16, 16384))


@pytest.fixture
def cloud(amqp_url: str, tmp_path: Path) -> Iterator[Cloud]:
    tag = uuid.uuid4().hex[:6]
    hosts = [f"pl-{tag}-{i}" for i in range(3)]
    nodes: dict[str, ComputeNode] = {}
    stops: list[Any] = []
    purge_queues(amqp_url, API_EVENTS, STORAGE_EVENTS)
    try:
        network = NetworkServer(
            NetworkConfig(
                amqp_url=amqp_url,
                database_url=f"sqlite:///{tmp_path}/network.db",
                replica=f"pools-{tag}",
            )
        ).start()
        stops.append(network)
        for host, names, (vcpus, memory) in zip(hosts, POOLS, SIZES, strict=True):
            pools = [PoolConfig(name="default", path=tmp_path / host / "pools" / "default")]
            pools += [PoolConfig(name=n, path=tmp_path / host / "pools" / n) for n in names]
            config = ComputeConfig(
                host=host,
                state_dir=tmp_path / host,
                amqp_url=amqp_url,
                driver="fake",
                allowed_boot_dirs=[BOOT_DIR],
                cpu_allocation_ratio=1.0,
                reserved_host_memory_mib=0,
                heartbeat_interval_s=0.3,
                pools=pools,
            )
            nodes[host] = ComputeNode(config, FakeDriver(vcpus, memory)).start()
        storage = StorageServer(
            StorageConfig(
                amqp_url=amqp_url,
                database_url=f"sqlite:///{tmp_path}/storage.db",
                replica=f"pools-{tag}",
                agent_hosts=tuple(hosts),
                default_pool="default",
            )
        ).start()
        stops.append(storage)
        scheduler = Scheduler(SchedulerConfig(amqp_url=amqp_url, replica=f"pools-{tag}", top_n=1))
        scheduler.start().wait_for_hosts(3)
        stops.append(scheduler)
        server = ApiServer(
            ApiConfig(
                amqp_url=amqp_url,
                database_url=f"sqlite:///{tmp_path}/registry.db",
                tokens=[TokenEntry(token=ADMIN, project="ops", role=Role.ADMIN)],
                rpc_timeout_s=20,
                schedule_timeout_s=30,
            )
        )
        stops.append(server)
        cloud = Cloud(server.start(), nodes, f"sqlite:///{tmp_path}/registry.db")
        yield cloud
        cloud.http.close()
    finally:
        for service in reversed(stops):
            service.stop()
        for node in nodes.values():
            node.stop()


def admin_view(cloud: Cloud, path: str) -> dict[str, Any]:
    r = cloud.http.get(path, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    view: dict[str, Any] = r.json()
    return view


def volume(cloud: Cloud, pool: str) -> dict[str, Any]:
    """A 1 MiB volume on `pool`, once it is available."""
    r = cloud.http.post(
        "/v1/volumes",
        json={"name": f"v-{uuid.uuid4().hex[:8]}", "size": 1 << 20, "pool": pool},
        headers=auth(ADMIN),
    )
    assert r.status_code in (201, 202), r.text
    volume_id = r.json()["id"]
    deadline = time.monotonic() + 15
    while (view := admin_view(cloud, f"/v1/volumes/{volume_id}"))["state"] != "available":
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    return view


def shut_off_with(cloud: Cloud, vol: dict[str, Any]) -> dict[str, Any]:
    """A shut-off domain with `vol` as its disk vdb, defined on the volume's host."""
    r = cloud.http.post(
        "/v1/domains",
        json={
            "name": f"p-{uuid.uuid4().hex[:8]}",
            "boot": {"kernel": KERNEL},
            "memory_mib": 64,
            "start": False,
            "disks": [{"target": "vdb", "volume_id": vol["id"]}],
        },
        headers=auth(ADMIN),
    )
    assert r.status_code in (201, 202), r.text
    domain_id = r.json()["id"]
    deadline = time.monotonic() + 15
    while (view := admin_view(cloud, f"/v1/domains/{domain_id}"))["host"] is None:
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    assert view["host"] == vol["host"]  # its volume's host is where it may be defined
    return view


@pytest.mark.slow  # its stack of three nodes and every service takes ~15 s to start
def test_a_cold_migration_goes_only_where_the_volumes_pool_is(cloud: Cloud) -> None:
    first, second, roomy = sorted(cloud.nodes)
    fast = volume(cloud, "fast")
    assert fast["host"] in (first, second)
    domain = shut_off_with(cloud, fast)
    # The only other host with a `fast` pool, though the third one has far more room.
    [expected] = [h for h in (first, second) if h != fast["host"]]
    r = cloud.http.post(f"/v1/domains/{domain['id']}/migrate", headers=auth(ADMIN))
    assert r.status_code == 202, r.text
    assert (r.json()["live"], r.json()["target"]) == (False, expected)
    deadline = time.monotonic() + 20
    while (view := admin_view(cloud, f"/v1/domains/{domain['id']}"))["host"] != expected:
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    assert admin_view(cloud, f"/v1/volumes/{fast['id']}")["host"] == expected

    # `solo` is on the first host only: nowhere to go.
    solo = volume(cloud, "solo")
    assert solo["host"] == first
    lonely = shut_off_with(cloud, solo)
    r = cloud.http.post(f"/v1/domains/{lonely['id']}/migrate", headers=auth(ADMIN))
    assert r.status_code == 503, r.text
    problem = r.json()
    assert problem["code"] == "no_valid_host", problem
    assert sorted(problem["filtered"]["pools"]) == [second, roomy], problem
    assert "pools" in problem["detail"], problem
    # Nothing moved and nothing is under way.
    view = admin_view(cloud, f"/v1/domains/{lonely['id']}")
    assert (view["host"], view["task"]) == (first, "none")
    assert admin_view(cloud, f"/v1/volumes/{solo['id']}")["host"] == first

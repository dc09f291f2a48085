"""Bus.call_read over a real broker: a reply read from its bytes by a reader of its own
(a page of volumes by protos.volume_wire) answers as `call` does, refusals included."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import msgspec
import pytest

from protos import routing
from protos.codec import DecodeError
from protos.volume_wire import VolumeRow, read_volume_page
from protos.volumes import ListVolumes, VolumePage
from services.bus import Bus, Context, RemoteError, Service, ServiceError, ServiceRunner, handles
from tests.integration.conftest import MakeBus

pytestmark = pytest.mark.integration


def _row(name: str, size: int = 512) -> VolumeRow:
    return VolumeRow(
        str(uuid.uuid5(uuid.NAMESPACE_URL, name)), "p1", name, "default", "h1", size,
        "available", None, None, None, None, 1, 1764500000.5,
    )  # fmt: skip


class PageService(Service):
    """ListVolumes: pool `gone` is refused, pool `broken` answers a volume of size -1."""

    name = "call-read-test"

    @handles(ListVolumes)
    def page(self, cmd: ListVolumes, _ctx: Context) -> VolumePage:
        if cmd.pool == "gone":
            raise ServiceError("not_found", "no pool gone", {"field": "pool"})
        if cmd.pool == "broken":
            return VolumePage.of_wire([_row("a", size=-1)], None)
        return VolumePage.of_wire([_row(f"v{i:04d}") for i in range(cmd.limit)], "p1/next")


@pytest.fixture
def served(make_bus: MakeBus) -> Iterator[tuple[Bus, str]]:
    queue = routing.compute_queue(f"test-{uuid.uuid4().hex[:8]}")
    runner = ServiceRunner(make_bus("server"), PageService(), queue=queue).start()
    try:
        yield make_bus("client"), queue
    finally:
        runner.stop()


def test_a_page_read_by_its_reader_is_the_page_the_model_reads(served: tuple[Bus, str]) -> None:
    client, queue = served
    command = ListVolumes(project="p1", limit=3000)
    page = client.call_read(queue, command, read_volume_page, timeout=20)
    model = client.call(queue, command, timeout=20)
    assert isinstance(model, VolumePage)
    assert [v.name for v in page.volumes] == [f"v{i:04d}" for i in range(3000)]
    assert page.next == model.next == "p1/next"
    assert len(model.volumes) == 3000
    assert msgspec.to_builtins(page.volumes[0]) == model.volumes[0].model_dump(mode="json")


def test_an_error_reply_is_a_remote_error(served: tuple[Bus, str]) -> None:
    client, queue = served
    with pytest.raises(RemoteError) as caught:
        client.call_read(queue, ListVolumes(pool="gone"), read_volume_page, timeout=20)
    assert (caught.value.code, caught.value.details["field"]) == ("not_found", "pool")


def test_a_page_its_reader_refuses_is_a_decode_error(served: tuple[Bus, str]) -> None:
    client, queue = served
    with pytest.raises(DecodeError, match="size"):
        client.call_read(queue, ListVolumes(pool="broken"), read_volume_page, timeout=20)
    with pytest.raises(DecodeError, match="size"):  # as the model refuses it
        client.call(queue, ListVolumes(pool="broken"), timeout=20)

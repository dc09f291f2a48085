"""protos.volume_wire and the listing's JSON: the fast path says what the models say.

A page of volumes is written from msgspec records and read into msgspec records instead of
pydantic models (the models cost more than the rest of a 10,000-volume listing); these tests
hold the two to the same fields, the same accepted pages, the same refusals, and the API's
JSON to what VolumeList itself renders.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
from pydantic import ValidationError

from protos.base import Message
from protos.codec import Envelope, pack
from protos.commands import Command
from protos.volume_wire import (
    AttachmentRecord,
    VolumePageRecord,
    VolumeRecord,
    VolumeRow,
    read_volume_page,
)
from protos.volumes import Attachment, ListVolumes, Volume, VolumePage
from services.api.config import ApiConfig
from services.api.context import ApiContext
from services.api.registry import Registry
from services.api.visibility import HostMask
from services.api.volume_models import VolumeList, VolumeView, volume_list_json


def _volume(name: str, **changes: Any) -> Volume:
    fields: dict[str, Any] = {
        "volume_id": uuid.uuid4(),
        "project": "p1",
        "name": name,
        "pool": "default",
        "host": "node-1",
        "size": 1 << 30,
        "state": "available",
        "seq": 3,
        "created_at": 1764500000.25,
    }
    return Volume(**{**fields, **changes})


def _page() -> VolumePage:
    return VolumePage(
        volumes=[
            _volume("a"),
            _volume(
                "b",
                state="attached",
                attachment=Attachment(domain_id=uuid.uuid4(), target="vdc", readonly=True),
                source_id=uuid.uuid4(),
                image="sha256:ab",
            ),
            _volume("c", host=None, fault="lost", size=0, seq=0, created_at=1764500001),
            _volume("d", host="node-2", state="creating"),
        ],
        next="p1/d",
    )


def _body(page: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(page, use_bin_type=True)
    return data


def test_the_records_have_the_models_fields() -> None:
    assert list(VolumeRow.__struct_fields__) == list(Volume.model_fields)  # in order
    assert set(VolumeRecord.__struct_fields__) == set(Volume.model_fields)
    assert set(AttachmentRecord.__struct_fields__) == set(Attachment.model_fields)
    assert set(VolumePageRecord.__struct_fields__) == set(VolumePage.model_fields)


def test_a_page_reads_as_the_model_reads_it() -> None:
    model = _page()
    wire = model.model_dump(mode="json")
    read = read_volume_page(_body(wire))
    assert msgspec.to_builtins(read) == wire
    assert read.volumes[1].attachment == AttachmentRecord(
        domain_id=str(model.volumes[1].attachment.domain_id),  # type: ignore[union-attr]
        target="vdc",
        readonly=True,
    )
    assert read.volumes[1].source_id == str(model.volumes[1].source_id)
    assert read.next == "p1/d"


def test_unknown_volume_fields_are_ignored_by_both() -> None:
    wire = _page().model_dump(mode="json")
    wire["volumes"][0]["added_in_1_1"] = [1, 2]
    assert VolumePage.model_validate(wire).volumes[0].name == "a"
    assert read_volume_page(_body(wire)).volumes[0].name == "a"


BROKEN: list[tuple[str, Any]] = [
    ("volume_id", "not-a-uuid"),
    ("volume_id", None),
    ("project", None),
    ("name", 7),
    ("host", 5),
    ("size", -1),
    ("size", 1.5),
    ("seq", -1),
    ("state", "lost"),
    ("created_at", "yesterday"),
    ("created_at", None),
    ("source_id", "nope"),
    ("attachment", {"domain_id": "5d113fd6-2c13-4526-b6cc-d91cc08a6ab1", "target": "sda"}),
    ("attachment", {"domain_id": "x", "target": "vdb"}),
    ("attachment", {"target": "vdb"}),
    (
        "attachment",
        {"domain_id": "0d1ffaf9-ca2d-4b7f-b5af-9f0c92f0c368", "target": "vdb", "extra": 1},
    ),
    ("attachment", "vdb"),
]


@pytest.mark.parametrize(("field", "value"), BROKEN, ids=[f"{f}={v!r}" for f, v in BROKEN])
def test_what_the_model_refuses_the_reader_refuses(field: str, value: Any) -> None:
    wire = _page().model_dump(mode="json")
    wire["volumes"][2][field] = value
    with pytest.raises(ValidationError):
        VolumePage.model_validate(wire)
    with pytest.raises(ValueError, match=field):
        read_volume_page(_body(wire))


@pytest.mark.parametrize(
    "wire",
    [
        {"next": None},
        {"volumes": {"a": 1}},
        {"volumes": [], "next": 5},
        {"volumes": [None]},
    ],
)
def test_broken_pages_are_refused_by_both(wire: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        VolumePage.model_validate(wire)
    with pytest.raises(ValueError):  # noqa: PT011  (msgspec's message varies)
        read_volume_page(_body(wire))


def test_missing_required_fields_are_refused_and_defaults_kept() -> None:
    wire = _page().model_dump(mode="json")
    for optional in ("attachment", "source_id", "image", "fault"):
        del wire["volumes"][0][optional]
    read = read_volume_page(_body(wire))
    assert msgspec.to_builtins(read.volumes[0]) == VolumePage.model_validate(wire).volumes[
        0
    ].model_dump(mode="json")
    for required in ("volume_id", "project", "name", "pool", "host", "size", "state", "seq"):
        broken = _page().model_dump(mode="json")
        del broken["volumes"][1][required]
        with pytest.raises(ValidationError):
            VolumePage.model_validate(broken)
        with pytest.raises(ValueError, match=required):
            read_volume_page(_body(broken))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", "5"),
        ("volume_id", "12345678123456781234567812345678"),
        ("volume_id", "12345678-1234-5678-1234-56781234567A"),
        ("source_id", "{12345678-1234-5678-1234-567812345678}"),
    ],
)
def test_the_reader_is_no_looser_than_the_model(field: str, value: str) -> None:
    """pydantic's lax mode turns "5" into 5 and reads a UUID in several spellings; the
    reader takes only what the catalog writes (and the API then sends on as it is)."""
    wire = _page().model_dump(mode="json")
    wire["volumes"][0][field] = value
    VolumePage.model_validate(wire)
    with pytest.raises(ValueError, match=field):
        read_volume_page(_body(wire))


@pytest.mark.parametrize("project", [None, "p1"], ids=["admin", "member"])
def test_the_listing_json_is_volume_list_s_own(project: str | None) -> None:
    model = _page()
    mask = HostMask(project, lambda: ["node-1", "node-2"], key="k" * 32)
    read = read_volume_page(_body(model.model_dump(mode="json")))
    expected = VolumeList(
        volumes=[VolumeView.of(v, mask) for v in model.volumes], next=model.next
    ).model_dump(mode="json")
    rendered = json.loads(volume_list_json(read, mask))
    assert rendered == expected
    assert [list(v) for v in rendered["volumes"]] == [list(v) for v in expected["volumes"]]
    hosts = [v["host"] for v in rendered["volumes"]]
    if project is None:
        assert hosts == ["node-1", "node-1", None, "node-2"]
    else:  # aliases: one per host, never the name
        assert hosts[0] == hosts[1] != hosts[3]
        assert hosts[2] is None
        assert not {"node-1", "node-2"} & set(hosts)


def test_the_last_page_has_no_next() -> None:
    page = read_volume_page(_body({"volumes": [], "next": None}))
    assert json.loads(volume_list_json(page, HostMask(None, list))) == {"volumes": []}


@pytest.mark.parametrize(
    "body",
    [
        {"code": "x", "message": "é ü 中", "details": {"n": -(2**63), "big": 2**64 - 1}},
        {"f": 1.5, "neg": -33, "small": -1, "t": True, "none": None, "raw": b"\x00\xff"},
        {"nested": [[1, [2.25]], {"k": "v" * 40}], "long": "x" * 70000, "list": list(range(20))},
    ],
)
def test_pack_writes_what_msgpack_writes(body: dict[str, Any]) -> None:
    envelope = Envelope(type="reply.error", body=body, source="storage", correlation_id="c")
    assert pack(envelope) == msgpack.packb(envelope.to_map(), use_bin_type=True)


def test_pack_writes_rows_as_their_maps() -> None:
    row = VolumeRow(
        str(uuid.uuid4()),
        "p1",
        "a",
        "default",
        None,
        512,
        "available",
        None,
        None,
        None,
        None,
        1,
        2.5,
    )
    envelope = Envelope(type="reply.catalog_volume_page", body={"volumes": [row], "next": None})
    body = msgpack.unpackb(pack(envelope))["body"]
    assert body["volumes"] == [msgspec.to_builtins(row)]
    assert Volume.model_validate(body["volumes"][0]).name == "a"


class _ModelsOnlyBus:
    """A bus that returns only models, like the API unit tests' fakes."""

    def __init__(self, page: VolumePage) -> None:
        self.page = page

    def call(self, queue: str, command: Command, *, timeout: float = 30.0, **_: Any) -> Message:
        return self.page


def test_a_bus_without_readers_has_its_reply_read_all_the_same(tmp_path: Path) -> None:
    model = _page()
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        ctx = ApiContext(config=ApiConfig(), registry=registry, bus=_ModelsOnlyBus(model))
        page = ctx.call_read("storage", ListVolumes(), read_volume_page)
    finally:
        registry.close()
    assert msgspec.to_builtins(page) == model.model_dump(mode="json")

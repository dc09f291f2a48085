"""Size limits: request bodies (413), metadata, strict types, and that nothing the API accepts
can outgrow a bus message."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from protos.codec import MAX_MESSAGE_BYTES, EncodeError, encode
from protos.commands import DefineDomain
from protos.domain import (
    MAX_CMDLINE,
    MAX_DISKS,
    MAX_METADATA_BYTES,
    BootSpec,
    DiskSpec,
    DomainSpec,
    NicSpec,
)
from protos.scheduler import ScheduleDomain
from services.api import ApiConfig, TokenEntry, create_app
from services.api.limits import DEFAULT_MAX_BODY_BYTES
from services.api.registry import Registry
from tests.unit.test_api import ADMIN, ALICE, CONFIG, FakeCloud, auth, body, problem

# The regex parser's width of a pattern (typeshed has no stubs for re._parser).
sre_parse: Any = importlib.import_module("re._parser")
WIDE = "\U0001f600"  # four bytes of UTF-8 per character: the worst case for a length limit


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeCloud]:
    """The scheduler and a compute node in-process, answering the API's calls."""
    registry = Registry.open(f"sqlite:///{tmp_path}/registry.db")
    cloud = FakeCloud(tmp_path, registry)
    yield cloud
    cloud.close()
    registry.close()


@pytest.fixture
def client(fake: FakeCloud) -> Iterator[TestClient]:
    with TestClient(create_app(CONFIG, registry=fake.registry, bus=fake)) as c:
        yield c


def domains(client: TestClient) -> list[Any]:
    listed: list[Any] = client.get("/v1/domains", headers=auth(ALICE)).json()["domains"]
    return listed


# ---- the request body limit ----------------------------------------------------------------


def test_a_body_over_the_limit_is_413_and_nothing_is_stored(
    client: TestClient, fake: FakeCloud
) -> None:
    huge = body(metadata={"blob": "x" * (20 * 1024 * 1024)})
    r = client.post("/v1/domains", json=huge, headers=auth(ALICE))
    p = problem(r, 413)
    assert p["code"] == "too_large"
    assert str(DEFAULT_MAX_BODY_BYTES) in p["detail"]
    assert domains(client) == []
    assert fake.calls == []


def test_a_chunked_body_is_counted_as_it_arrives(client: TestClient) -> None:
    data = json.dumps(body(metadata={"blob": "x" * (2 * 1024 * 1024)})).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    r = client.post(
        "/v1/domains",
        content=chunks(),
        headers={**auth(ALICE), "Content-Type": "application/json"},
    )
    assert "content-length" not in r.request.headers
    assert problem(r, 413)["code"] == "too_large"
    assert domains(client) == []


def test_the_limit_is_a_setting(fake: FakeCloud) -> None:
    config = ApiConfig(tokens=[TokenEntry(token=ALICE, project="alice")], max_body_bytes=4096)
    with TestClient(create_app(config, registry=fake.registry, bus=fake)) as small:
        r = small.post("/v1/domains", json=body(cmdline="x" * 5000), headers=auth(ALICE))
        assert problem(r, 413)["code"] == "too_large"
        ok = small.post("/v1/domains", json=body(), headers=auth(ALICE))
        assert ok.status_code == 201, ok.text


# ---- metadata limits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"k" * 256: "v"}, "metadata.kkkk"),
        ({"": "v"}, "metadata."),
        ({"k": "v" * 4097}, "metadata.k"),
        ({f"k{i}": "v" for i in range(65)}, "metadata"),
        ({f"k{i:02}": WIDE * 300 for i in range(60)}, "metadata"),  # 60 x 1200 bytes > 64 KiB
    ],
    ids=["long-key", "empty-key", "long-value", "too-many", "too-many-bytes"],
)
def test_metadata_limits(client: TestClient, metadata: dict[str, str], field: str) -> None:
    r = client.post("/v1/domains", json=body(metadata=metadata), headers=auth(ALICE))
    p = problem(r, 422)
    assert p["field"].startswith(field), p
    assert domains(client) == []


def test_metadata_at_the_limits_is_accepted(client: TestClient) -> None:
    # 16 pairs of 255-byte keys and 3841-byte values: 65536 bytes exactly.
    metadata = {f"{i:02}" + "k" * 253: "v" * 3841 for i in range(16)}
    assert sum(len(k) + len(v) for k, v in metadata.items()) == MAX_METADATA_BYTES
    r = client.post("/v1/domains", json=body(metadata=metadata), headers=auth(ALICE))
    assert r.status_code == 201, r.text


# ---- strict types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"memory_mib": False}, "memory_mib"),
        ({"vcpus": "2"}, "vcpus"),
        ({"vcpus": 2.5}, "vcpus"),
        ({"autostart": "yes"}, "autostart"),
        ({"autostart": 1}, "autostart"),
        ({"start": 0}, "start"),
        ({"serial": {"ring_kib": "64"}}, "serial.ring_kib"),
        ({"disks": [{"target": "vda", "path": "/d", "readonly": "true"}]}, "disks.0.readonly"),
    ],
)
def test_numbers_and_booleans_are_strict(
    client: TestClient, patch: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/domains", json=body(**patch), headers=auth(ALICE))
    assert problem(r, 422)["field"] == field
    assert domains(client) == []


def test_an_integral_number_is_an_integer_as_in_json_schema(client: TestClient) -> None:
    r = client.post("/v1/domains", json=body(vcpus=2.0, memory_mib=1.28e2), headers=auth(ALICE))
    assert r.status_code == 201, r.text
    assert (r.json()["vcpus"], r.json()["memory_mib"]) == (2, 128)


def test_a_mac_is_checked_by_the_schema_and_normalised(client: TestClient) -> None:
    for mac, message in (("0000000000000000", "look like"), ("01:00:00:00:00:01", "unicast")):
        nic = {"network": "n", "mac": mac}
        r = client.post("/v1/domains", json=body(nics=[nic]), headers=auth(ALICE))
        assert message in problem(r, 422)["detail"]
    nic = {"network": "n", "mac": "52:54:00:AB:CD:EF"}
    r = client.post("/v1/domains", json=body(nics=[nic], start=False), headers=auth(ALICE))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["nics"][0]["mac"] == "52:54:00:ab:cd:ef"


def test_action_options_are_strict(client: TestClient) -> None:
    d = client.post("/v1/domains", json=body(), headers=auth(ALICE)).json()
    url = f"/v1/domains/{d['id']}/actions"
    for bad in ({"force": "true"}, {"timeout_s": "5"}, {"timeout_s": True}, {"wait": 1}):
        r = client.post(url, json={"action": "shutdown", **bad}, headers=auth(ALICE))
        assert problem(r, 422)["field"] == next(iter(bad))


# ---- nothing the API accepts outgrows the bus ------------------------------------------------


def _max_bytes(schema: dict[str, Any], node: dict[str, Any], path: str) -> int:
    """An upper bound of the msgpack size of any value `node` (a JSON Schema) accepts; fails
    the test for a string, list or map without a bound."""
    if "$ref" in node:
        return _max_bytes(schema, schema["$defs"][node["$ref"].rsplit("/", 1)[1]], path)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node and "type" not in node:  # an object's oneOf only narrows its fields
            return max(_max_bytes(schema, n, path) for n in node[key])
    if "enum" in node or "const" in node:
        values = node.get("enum", [node.get("const")])
        return max(len(json.dumps(v).encode()) for v in values) + 5
    kind = node.get("type")
    if kind == "string":
        return 4 * _max_chars(node, path) + 5
    if kind in ("integer", "number"):
        return 9
    if kind in ("boolean", "null"):
        return 1
    if kind == "array":
        assert "maxItems" in node, f"{path}: a list without maxItems"
        return int(node["maxItems"]) * _max_bytes(schema, node["items"], f"{path}[]") + 5
    if kind == "object":
        total = 5
        for name, prop in node.get("properties", {}).items():
            total += len(name) + 5 + _max_bytes(schema, prop, f"{path}.{name}")
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            assert "maxProperties" in node, f"{path}: a map without maxProperties"
            keys = node.get("propertyNames", {})
            key_bytes = 4 * _max_chars({"type": "string", **keys}, f"{path}.<key>") + 5
            value_bytes = _max_bytes(schema, extra, f"{path}.<value>")
            total += int(node["maxProperties"]) * (key_bytes + value_bytes)
        return total
    raise AssertionError(f"{path}: no bound known for {node}")


def _max_chars(node: dict[str, Any], path: str) -> int:
    if "maxLength" in node:
        return int(node["maxLength"])
    if node.get("format") == "uuid":
        return 36
    if node.get("format") in ("ipv4", "ipv4interface"):
        return 18  # 255.255.255.255/32
    if "pattern" in node:
        _low, high = sre_parse.parse(node["pattern"]).getwidth()
        assert high < sre_parse.MAXREPEAT, f"{path}: pattern {node['pattern']} is unbounded"
        return int(high)
    raise AssertionError(f"{path}: a string without maxLength")


@pytest.mark.parametrize("model", [ScheduleDomain, DefineDomain], ids=lambda m: m.TYPE)
def test_commands_built_from_requests_fit_in_a_bus_message(model: Any) -> None:
    schema = model.model_json_schema(mode="validation")
    bound = _max_bytes(schema, schema, model.__name__) + 1024  # the envelope around it
    assert bound < MAX_MESSAGE_BYTES, f"{model.__name__} may need {bound} bytes"


def test_a_maximal_spec_encodes_well_under_the_bus_limit() -> None:
    spec = DomainSpec(
        name="n" * 63,
        vcpus=64,
        boot=BootSpec(kernel=WIDE * 4096, initrd=WIDE * 4096, cmdline=WIDE * MAX_CMDLINE),
        disks=[DiskSpec(target=f"vd{chr(97 + i)}", path=WIDE * 4096) for i in range(MAX_DISKS)],
        nics=[NicSpec(network="n" * 63) for _ in range(8)],
        metadata={f"{i:02}" + "k" * 253: "v" * 3841 for i in range(16)},
    )
    data, _ = encode(ScheduleDomain(spec=spec, project="p" * 63), source="api")
    assert len(data) < DEFAULT_MAX_BODY_BYTES < MAX_MESSAGE_BYTES


def test_the_codec_refuses_to_send_what_no_reader_accepts() -> None:
    spec = DomainSpec.model_construct(
        name="x", boot=BootSpec(kernel="/k"), metadata={"k": "v" * MAX_MESSAGE_BYTES}
    )
    with pytest.raises(EncodeError, match="exceeds the bus limit"):
        encode(DefineDomain.model_construct(spec=spec), source="test")


def test_quotas_are_strict_and_bounded(client: TestClient) -> None:
    url = "/v1/projects/alice/quota"
    for bad in ({"domains": 2**63}, {"vcpus": "4"}, {"memory_mib": True}, {"domains": 1.5}):
        r = client.put(url, json=bad, headers=auth(ADMIN))
        assert problem(r, 422)["field"] == next(iter(bad))
    assert client.put(url, json={"domains": 2**31 - 1}, headers=auth(ADMIN)).status_code == 200


def test_the_models_disk_limit_is_the_runtimes_slot_count() -> None:
    """A spec the API accepts never has more disks than the runtime has virtio-blk slots."""
    vmm = importlib.import_module("native._vmm")
    assert vmm.lib.FL_MAX_DISKS == MAX_DISKS
    disks = [DiskSpec(target=f"vd{chr(97 + i)}", path="/d") for i in range(MAX_DISKS + 1)]
    with pytest.raises(ValueError, match="at most 4"):
        DomainSpec(name="d", boot=BootSpec(kernel="/k"), disks=disks)

"""Request and response bodies of /v1/pools and /v1/volumes."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field, StrictBool, WithJsonSchema

from protos.domain import NAME_PATTERN
from protos.storage import MAX_VOLUME_BYTES, SECTOR, PoolCapabilities, PoolKindName
from protos.volume_wire import AttachmentRecord, VolumeListingRecord, VolumePageRecord
from protos.volumes import Attachment, Pool, Volume, VolumeName, VolumeStateName
from services.api.visibility import HostMask

_SIZE = Field(
    gt=0,
    le=MAX_VOLUME_BYTES,
    multiple_of=SECTOR,
    description="bytes: a positive multiple of 512, at most 64 TiB",
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The validator's rule as the JSON Schema says it (NAME_PATTERN without two dots in a row),
# so a client generating from the schema makes only names that are accepted; the validator
# keeps its messages that say which rule a name breaks.
ApiVolumeName = Annotated[
    VolumeName,
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": 63,
            "pattern": r"^[A-Za-z0-9](\.?[A-Za-z0-9_-])*\.?$",
        }
    ),
]


class DiskAttach(_Body):
    """Volume `volume_id` as disk `target` (`vdb`…) of a stopped domain."""

    target: str = Field(pattern=r"^vd[a-z]$")
    volume_id: uuid.UUID
    readonly: StrictBool = False


class VolumeCreate(_Body):
    """A new empty volume. `name`: unique in the project, 1-63 letters, digits, `.`, `_`,
    `-` (no `/`, `..` or NUL)."""

    name: ApiVolumeName
    size: int = _SIZE
    pool: str | None = Field(default=None, pattern=NAME_PATTERN)


class VolumeClone(_Body):
    name: ApiVolumeName
    size: int | None = Field(
        default=None, gt=0, le=MAX_VOLUME_BYTES, multiple_of=SECTOR, description="grow to"
    )


class VolumeResize(_Body):
    size: int = _SIZE


class VolumeView(BaseModel):
    """A volume as the caller may see it (`host`: an alias for a member, None for a volume
    in a shared pool)."""

    id: uuid.UUID
    name: str
    project: str
    pool: str
    host: str | None
    size: int
    state: VolumeStateName
    attachment: Attachment | None
    source_id: uuid.UUID | None
    seq: int
    created_at: float

    @classmethod
    def of(cls, volume: Volume, mask: HostMask) -> VolumeView:
        return cls.model_validate(cls.json_of(volume, mask))

    @staticmethod
    def json_of(volume: Volume, mask: HostMask) -> dict[str, Any]:
        """The view as JSON-ready data, without building the model (long lists)."""
        attachment = volume.attachment
        return {
            "id": str(volume.volume_id),
            "name": volume.name,
            "project": volume.project,
            "pool": volume.pool,
            "host": mask.name(volume.host),
            "size": volume.size,
            "state": volume.state,
            "attachment": None
            if attachment is None
            else {
                "domain_id": str(attachment.domain_id),
                "target": attachment.target,
                "readonly": attachment.readonly,
            },
            "source_id": None if volume.source_id is None else str(volume.source_id),
            "seq": volume.seq,
            "created_at": volume.created_at,
        }


class VolumeList(BaseModel):
    volumes: list[VolumeView]
    next: str | None = Field(default=None, description="the cursor of the next page")


class _VolumeViewRecord(msgspec.Struct, gc=False):
    """VolumeView's JSON, field for field, for msgspec's encoder (ids are the canonical
    UUID strings protos.volume_wire checked)."""

    id: str
    name: str
    project: str
    pool: str
    host: str | None
    size: int
    state: str
    attachment: AttachmentRecord | None
    source_id: str | None
    seq: int
    created_at: float


_JSON = msgspec.json.Encoder()


def volume_list_json(page: VolumePageRecord, mask: HostMask) -> bytes:
    """The page as VolumeList's JSON (`next` left out after the last page), from a page
    already checked (protos.volume_wire): one record per volume and one call of a C
    encoder, where VolumeList through pydantic would build and serialize a model each.
    tests/unit/test_volume_wire.py holds it to VolumeList's own output."""
    aliases: dict[str | None, str | None] = {}
    views = [
        _VolumeViewRecord(
            v.volume_id,
            v.name,
            v.project,
            v.pool,
            aliases[v.host] if v.host in aliases else aliases.setdefault(v.host, mask.name(v.host)),
            v.size,
            v.state,
            v.attachment,
            v.source_id,
            v.seq,
            v.created_at,
        )
        for v in page.volumes
    ]
    body: dict[str, object] = {"volumes": views}
    if page.next is not None:
        body["next"] = page.next
    return _JSON.encode(body)


def volume_listing_json(listing: VolumeListingRecord) -> bytes:
    """The listing as VolumeList's JSON (`next` left out after the last page): the storage
    service's rendering of the volumes (protos.volumes.VolumeListing, its structure checked
    by protos.volume_wire.read_volume_listing) spliced in as it is.
    tests/unit/test_volume_wire.py holds it to volume_list_json's output."""
    tail = b"}" if listing.next is None else b',"next":' + _JSON.encode(listing.next) + b"}"
    return b"".join((b'{"volumes":', listing.volumes.encode(), tail))


class PoolView(BaseModel):
    name: str
    kind: PoolKindName
    host: str | None
    capacity: int
    allocation: int
    available: int
    capabilities: PoolCapabilities
    volumes: int
    updated_at: float

    @classmethod
    def of(cls, pool: Pool, mask: HostMask) -> PoolView:
        return cls(
            name=pool.name,
            kind=pool.kind,
            host=mask.name(pool.host),
            capacity=pool.capacity,
            allocation=pool.allocation,
            available=pool.available,
            capabilities=pool.capabilities,
            volumes=pool.volumes,
            updated_at=pool.updated_at,
        )


class PoolList(BaseModel):
    pools: list[PoolView]

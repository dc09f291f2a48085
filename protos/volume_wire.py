"""A page of volumes (`reply.catalog_volume_page`) written and read without a model per volume.

A page holds up to `protos.volumes.MAX_PAGE` (10,000) volumes; building and validating a
pydantic model per volume costs more than the query and the transport together. So:
- the storage service writes a page from its rows as `VolumeRow`s, which msgspec's encoder
  (protos.codec.pack) writes as exactly the map `Volume.model_dump(mode="json")` gives;
- the API reads it with `read_volume_page`: one pass of msgspec's C decoder from the body's
  bytes into `VolumeRecord`s, under the rules of the models (protos.volumes.Volume,
  Attachment): the same fields and types, `size` and `seq` not negative, `state` one of the
  volume states, a disk target `vd[a-z]`, no unknown field in an attachment (a volume's
  unknown fields are ignored, as by a reader of an older minor version). It accepts nothing
  the model refuses and reads no more loosely: a number sent as a string, which pydantic's
  lax mode would take, is refused here, and so is a UUID in any but its canonical form.
tests/unit/test_volume_wire.py holds the records and the models to the same answers.

A listing (`reply.catalog_volume_listing`, protos.volumes.VolumeListing) goes further: the
storage service writes the page as the JSON the API sends (`VolumeViewRow`, one call of
msgspec's JSON encoder), and the API reads it with `read_volume_listing`, which checks its
structure only (a JSON array of `count` objects: msgspec's C parser, without building the
volumes) and passes the bytes on. docs/storage.md says why that is the trust boundary.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from protos.volumes import VolumeStateName

_NOT_NEGATIVE = msgspec.Meta(ge=0)
# A UUID as the catalog writes it (`str(uuid.UUID(...))`: lowercase, hyphenated), kept as the
# string the API sends on: a uuid.UUID per id would be 10,000 objects per page for the
# garbage collector to track, and in the API's large heap that set off a full collection in
# about one read of six (~130 ms of CPU each, measured), where a read is ~13 ms.
UuidText = Annotated[
    str, msgspec.Meta(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
]


class AttachmentRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """protos.volumes.Attachment."""

    domain_id: UuidText
    target: Annotated[str, msgspec.Meta(pattern=r"^vd[a-z]$")]
    readonly: bool = False


class VolumeRecord(msgspec.Struct, frozen=True, gc=False):
    """protos.volumes.Volume, field for field (not tracked by the garbage collector: a page
    of 10,000 would otherwise set off collections while it is read)."""

    volume_id: UuidText
    project: str
    name: str
    pool: str
    host: str | None
    size: Annotated[int, _NOT_NEGATIVE]
    state: VolumeStateName
    seq: Annotated[int, _NOT_NEGATIVE]
    created_at: float
    attachment: AttachmentRecord | None = None
    source_id: UuidText | None = None
    image: str | None = None
    fault: str | None = None


class VolumePageRecord(msgspec.Struct, frozen=True):
    """protos.volumes.VolumePage: `volumes` in the catalog's order, `next` the cursor."""

    volumes: list[VolumeRecord]
    next: str | None = None


_READER = msgspec.msgpack.Decoder(VolumePageRecord)


class AttachmentRow(msgspec.Struct, frozen=True, gc=False):
    """An attachment as sent (protos.volumes.Attachment in its JSON form)."""

    domain_id: str
    target: str
    readonly: bool


class VolumeRow(msgspec.Struct, frozen=True, gc=False):
    """A volume as sent: Volume's JSON form, key for key and in its order, built by the
    catalog from its columns (the sender vouches for the values; the reader checks them)."""

    volume_id: str
    project: str
    name: str
    pool: str
    host: str | None
    size: int
    state: str
    attachment: AttachmentRow | None
    source_id: str | None
    image: str | None
    fault: str | None
    seq: int
    created_at: float


def read_volume_page(body: bytes) -> VolumePageRecord:
    """The page whose msgpack body is `body` (an envelope's `body`, as sent); ValueError
    (msgspec.ValidationError or DecodeError, both ValueErrors) saying which field is wrong
    for anything `VolumePage` would refuse."""
    return _READER.decode(body)


class VolumeViewRow(msgspec.Struct, frozen=True, gc=False):
    """A volume as the API's listing shows it (services.api.volume_models.VolumeView's JSON,
    key for key and in its order), written by the storage service (VolumeListing)."""

    id: str
    name: str
    project: str
    pool: str
    host: str | None
    size: int
    state: str
    attachment: AttachmentRow | None
    source_id: str | None
    seq: int
    created_at: float


class VolumeListingRecord(msgspec.Struct, frozen=True):
    """protos.volumes.VolumeListing as read: `volumes` the JSON array's text (msgpack `str`:
    UTF-8, which msgspec checks as it reads it)."""

    volumes: str
    count: Annotated[int, _NOT_NEGATIVE]
    next: str | None = None


class _AnyObject(msgspec.Struct, gc=False):
    """Any JSON object: its members are skipped (parsed, not built)."""


_LISTING_READER = msgspec.msgpack.Decoder(VolumeListingRecord)
# As cheap as counting raw items (~3.5 ms for 10,000 here) and says each is an object.
_JSON_ITEMS = msgspec.json.Decoder(list[_AnyObject])


def read_volume_listing(body: bytes) -> VolumeListingRecord:
    """The listing whose msgpack body is `body`, its structure checked: `volumes` is UTF-8
    and one well-formed JSON array (nothing after it) of exactly `count` objects. Their
    members are not read (see the module doc). ValueError saying what is wrong."""
    listing = _LISTING_READER.decode(body)
    items = len(_JSON_ITEMS.decode(listing.volumes))
    if items != listing.count:
        raise ValueError(f"volumes holds {items} items, count says {listing.count}")
    return listing

"""The storage service's wire contract: the catalog of pools and volumes (queue `storage`).

The API sends these to the `storage` queue, where any replica of the storage service takes
them; the service keeps the catalog in SQL and has the file work done by the agent of the
pool's host (`storage.<host>`, protos.storage) or, for a `shared` pool it serves, by itself.
Command names are `cmd.catalog.*`, apart from the agent's `cmd.storage.*`.

Every command names the caller's `project`; a volume of another project is `not_found`, as
one that does not exist (None: an admin, who sees every project). Refusals are `ErrorReply`s:
`invalid` (with `details.field`), `not_found`, `conflict` (`details.reason`: `name_in_use`,
`attached`, `state`, `shrink`), `no_space`, `over_quota` (`details`: resource, limit, used,
requested), `unavailable` (the pool's host does not answer), `unmapped_host` (a listing's
`hosts` lacks a host of the page: `details.hosts` names them).
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr

from protos.base import Message
from protos.commands import Command
from protos.domain import NAME_PATTERN
from protos.storage import MAX_VOLUME_BYTES, SECTOR, PoolCapabilities, PoolKindName

VolumeStateName = Literal["creating", "available", "attached", "deleting", "error"]
# The largest page of volumes: 10,000 listed in one round trip. A volume is under 600 bytes
# of msgpack (names, project and pool at most 63 characters each), so a full page stays far
# below the bus's 16 MiB message limit (protos.codec.MAX_MESSAGE_BYTES).
MAX_PAGE = 10_000


def check_volume_name(name: str) -> str:
    """`name` if it is a volume name; a ValueError saying why otherwise (the message the API
    shows). 1-63 letters, digits, `.`, `_`, `-`, starting with a letter or digit, no `..`."""
    if "\0" in name:
        raise ValueError("a name may not contain a NUL byte")
    if "/" in name:
        raise ValueError("a name may not contain '/'")
    if ".." in name:
        raise ValueError("a name may not contain '..'")
    if not 1 <= len(name) <= 63:
        raise ValueError(f"a name is 1-63 characters, got {len(name)}")
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(
            "a name holds only letters, digits, '.', '_' and '-' and starts with a letter or digit"
        )
    return name


VolumeName = Annotated[str, AfterValidator(check_volume_name)]
Size = Field(gt=0, le=MAX_VOLUME_BYTES, multiple_of=SECTOR)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Attachment(_Frozen):
    """The domain a volume is attached to, as disk `target`."""

    domain_id: uuid.UUID
    target: str = Field(pattern=r"^vd[a-z]$")
    readonly: bool = False


class VolumeQuota(_Frozen):
    """A project's limits (None: unlimited), enforced by the catalog in the create's
    transaction: the number of volumes, and the sum of their sizes in GiB (rounded up)."""

    volumes: int | None = Field(default=None, ge=0)
    gib: int | None = Field(default=None, ge=0)


# ---- replies -----------------------------------------------------------------------------


class Pool(Message):
    """A pool in the catalog: `host` is its host for a `dir` pool, None for a `shared` pool
    (served by the storage service itself); bytes as its host last reported them."""

    TYPE = "reply.catalog_pool"
    name: str
    kind: PoolKindName
    host: str | None
    capacity: int = Field(ge=0)
    allocation: int = Field(ge=0)
    available: int = Field(ge=0)
    capabilities: PoolCapabilities
    volumes: int = Field(ge=0)
    updated_at: float


class Pools(Message):
    TYPE = "reply.catalog_pools"
    pools: list[Pool]


class Volume(Message):
    """A volume in the catalog; `size` in bytes; `seq` its last event's number."""

    TYPE = "reply.catalog_volume"
    volume_id: uuid.UUID
    project: str
    name: str
    pool: str
    host: str | None
    size: int = Field(ge=0)
    state: VolumeStateName
    attachment: Attachment | None = None
    source_id: uuid.UUID | None = None
    image: str | None = None
    fault: str | None = None
    seq: int = Field(ge=0)
    created_at: float


class VolumePage(Message):
    """Volumes ordered by name (by project, then name, for an admin); `next` is the cursor of
    the next page, None after the last."""

    TYPE = "reply.catalog_volume_page"
    volumes: list[Volume]
    next: str | None = None
    _wire: dict[str, Any] | None = PrivateAttr(default=None)

    @classmethod
    def of_wire(cls, volumes: list[Any], cursor: str | None) -> VolumePage:
        """A page to send whose volumes are wire data already (each a Volume in its JSON
        form, as the catalog builds them from its rows: protos.volume_wire.VolumeRow),
        `cursor` its `next`: it is encoded as it is, without a model per volume, and its
        reader validates it as any reply. Only for sending: its `volumes` hold those rows,
        not models."""
        page = cls.model_construct(volumes=volumes, next=cursor)
        page._wire = {"volumes": volumes, "next": cursor}
        return page


class VolumeListing(Message):
    """A page of volumes already in the form the API's listing shows (rendered by the storage
    service, which the API passes on without parsing each volume): `volumes` is the text of
    a JSON array of `count` objects, each with exactly the keys `id`, `name`, `project`, `pool`,
    `host`, `size`, `state`, `attachment` (null or `domain_id`, `target`, `readonly`),
    `source_id`, `seq`, `created_at`, in that order (the API's `VolumeView`); `host` is as
    the command's `hosts` maps it. `next` is the cursor of the next page, None after the
    last. The storage service builds one with `of_json` (no validation of the long text:
    its reader checks it, protos.volume_wire.read_volume_listing)."""

    TYPE = "reply.catalog_volume_listing"
    volumes: str
    count: int = Field(ge=0)
    next: str | None = None

    @classmethod
    def of_json(cls, volumes: str, count: int, cursor: str | None) -> VolumeListing:
        return cls.model_construct(volumes=volumes, count=count, next=cursor)


# ---- commands ----------------------------------------------------------------------------


class CatalogCommand(Command):
    """`project`: the caller's (None: an admin, every project)."""

    project: str | None = Field(default=None, pattern=NAME_PATTERN)


class VolumeCommand(CatalogCommand):
    volume_id: uuid.UUID
    RESULT: ClassVar[type[Message]] = Volume


class ListPools(CatalogCommand):
    TYPE = "cmd.catalog.pool_list"
    READ_ONLY = True
    RESULT = Pools


class GetPool(CatalogCommand):
    TYPE = "cmd.catalog.pool_info"
    READ_ONLY = True
    RESULT = Pool
    pool: str = Field(pattern=NAME_PATTERN)


class CreateVolume(VolumeCommand):
    """A new volume `volume_id` (chosen by the caller, so a retry finds its first attempt):
    empty, a clone of `source_id` (same pool; size at least the source's, grown to `size`),
    or of disk image `image_id` (in the image's pool; at least the image's size). `pool`
    None: the service's default pool (the source's or the image's for a clone)."""

    TYPE = "cmd.catalog.volume_create"
    VERSION = "1.1"  # 1.1: image_id
    project: str = Field(pattern=NAME_PATTERN)
    name: VolumeName
    pool: str | None = Field(default=None, pattern=NAME_PATTERN)
    size: int | None = Field(default=None, gt=0, le=MAX_VOLUME_BYTES, multiple_of=SECTOR)
    source_id: uuid.UUID | None = None
    quota: VolumeQuota | None = None
    image_id: uuid.UUID | None = None  # a clone of this disk image (in the image's pool)


class DeleteVolume(VolumeCommand):
    """Delete a volume (refused while attached); the reply is the volume as it was."""

    TYPE = "cmd.catalog.volume_delete"


class ResizeVolume(VolumeCommand):
    """Grow to `size` bytes; shrinking is refused (`conflict`, `shrink`)."""

    TYPE = "cmd.catalog.volume_resize"
    size: int = Size
    quota: VolumeQuota | None = None


class WipeVolume(VolumeCommand):
    """Every byte reads as zero afterwards (refused while attached)."""

    TYPE = "cmd.catalog.volume_wipe"


class GetVolume(VolumeCommand):
    TYPE = "cmd.catalog.volume_info"
    READ_ONLY = True


class ListVolumes(CatalogCommand):
    """A page of at most `limit` volumes after cursor `after`, optionally of one pool."""

    TYPE = "cmd.catalog.volume_list"
    VERSION = "1.1"  # 1.1: limit up to 10,000 (was 1000)
    READ_ONLY = True
    RESULT = VolumePage
    pool: str | None = Field(default=None, pattern=NAME_PATTERN)
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)
    after: str | None = Field(default=None, max_length=200)


class ListVolumeListing(CatalogCommand):
    """ListVolumes, answered as the API shows it (VolumeListing): the same page, order and
    cursor. With `hosts` (a member's listing: each host name to the alias the member sees)
    every volume's host is rendered through it, and a page with a host it lacks is refused
    (`unmapped_host`, `details.hosts`: those hosts), so no real name is ever rendered; None
    renders the host names themselves (an admin's listing)."""

    TYPE = "cmd.catalog.volume_listing"
    READ_ONLY = True
    RESULT = VolumeListing
    pool: str | None = Field(default=None, pattern=NAME_PATTERN)
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)
    after: str | None = Field(default=None, max_length=200)
    hosts: dict[str, str] | None = None


class AttachVolume(VolumeCommand):
    """Mark the volume attached to `attachment.domain_id` (refused when attached elsewhere;
    the same attachment again is answered as it is)."""

    TYPE = "cmd.catalog.volume_attach"
    attachment: Attachment


class DetachVolume(VolumeCommand):
    """Mark the volume available again; `domain_id` must be the one it is attached to."""

    TYPE = "cmd.catalog.volume_detach"
    domain_id: uuid.UUID


class MoveVolume(VolumeCommand):
    """Move a `dir` pool's volume to the pool of the same name on `host` (a domain's cold
    migration): its id, attachment and size kept; a sparse copy over the hosts' transfer
    ports, checked by sha256 and synced on `host` before the source file goes. The reply is
    the volume where it is now; one on `host` already is answered as it is. Refused while a
    guest holds it open (`conflict`, busy); a failure leaves it where it was."""

    TYPE = "cmd.catalog.volume_move"
    host: str = Field(pattern=NAME_PATTERN)


class LiveMoveVolume(VolumeCommand):
    """A step of moving a `dir` pool's volume to the pool of the same name on `host` inside
    a domain's live migration (the stream copies the data; docs/storage.md, "Moving a volume
    live"). `prepare`: an empty sparse file of the volume's size there, the pending move held
    under the volume's lease (refused for a shared pool's volume, or one busy with another
    operation); `commit`: the catalog names `host`, then the source's file goes; `abort`:
    the file on `host` goes and the volume stays where it is. Each step is idempotent: a
    commit of a volume on `host` already, or an abort of one with no file there, is answered
    as it is. The reply is the volume where the catalog has it."""

    TYPE = "cmd.catalog.volume_live_move"
    host: str = Field(pattern=NAME_PATTERN)
    step: Literal["prepare", "commit", "abort"]


CATALOG_COMMANDS: tuple[type[Command], ...] = (
    ListPools,
    GetPool,
    CreateVolume,
    DeleteVolume,
    ResizeVolume,
    WipeVolume,
    GetVolume,
    ListVolumes,
    ListVolumeListing,
    AttachVolume,
    DetachVolume,
    MoveVolume,
    LiveMoveVolume,
)

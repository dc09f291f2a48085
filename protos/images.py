"""Images and byte transfers: the catalog's image commands (queue `storage`), the agent's
image and transfer commands (`storage.<host>`), and the image events.

An image is a raw file named by its sha256 in a pool's image store; the catalog gives it a
name in a project (`private`) or to every project (`public`), and a `kind` (`disk`,
`kernel`, `initrd`). Several names may share one file (the same bytes imported twice): the
file goes when its last name does.

Bytes never travel in AMQP messages: whoever holds them (the API) asks for a one-time
`TransferTicket`, connects to the TCP address it names (the agent of the pool's host, or
the storage service for a shared pool), sends the ticket and streams (docs/storage.md,
"Transfers"). The bus carries only the ticket and the outcome.
"""

from __future__ import annotations

import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from protos.base import Message
from protos.bindings import SHA256_PATTERN
from protos.commands import Command
from protos.domain import NAME_PATTERN
from protos.replies import Done
from protos.storage import MAX_VOLUME_BYTES, SECTOR, PoolCommand, VolumeInfo
from protos.volumes import CatalogCommand, Volume, VolumeName, VolumeQuota

ImageKindName = Literal["disk", "kernel", "initrd"]
VisibilityName = Literal["private", "public"]
ImageStateName = Literal["importing", "available"]
ImageFormatName = Literal["raw", "qcow2"]
TransferOpName = Literal["image_import", "volume_upload", "volume_download"]
MAX_IMAGE_BYTES = MAX_VOLUME_BYTES
TICKET_PATTERN = r"^[0-9a-f]{64}$"


class ImageQuota(BaseModel):
    """A project's image limits (None: unlimited), enforced by the catalog in the import's
    transactions: how many image names (an import under way holds one), and the sum of
    their raw sizes in GiB (rounded up; a deduplicated image counts its size too)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    images: int | None = Field(default=None, ge=0)
    image_gib: int | None = Field(default=None, ge=0)


# ---- replies -----------------------------------------------------------------------------


class TransferTicket(Message):
    """Connect to `address`:`port`, send `ticket` and a newline, then the stream
    (docs/storage.md, "Transfers"). Valid once, for a short while."""

    TYPE = "reply.transfer_ticket"
    address: str
    port: int = Field(ge=1, le=65535)
    ticket: str = Field(pattern=TICKET_PATTERN)


class TransferResult(Message):
    """How a transfer ended: `done` with the bytes' size and sha256 (for an import, of the
    raw image stored; `deduplicated` when that content was there already), `failed` with the
    file layer's refusal (`code`, `message`), or `running`/`unknown` (no such ticket here,
    e.g. after the host restarted)."""

    TYPE = "reply.transfer_result"
    state: Literal["running", "done", "failed", "unknown"]
    size: int | None = Field(default=None, ge=0)
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    source_format: ImageFormatName | None = None
    deduplicated: bool = False
    code: str | None = None
    message: str | None = None


class ImageFile(Message):
    """An image file in a pool's image store."""

    TYPE = "reply.image_file"
    pool: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)


class ImageFiles(Message):
    TYPE = "reply.image_files"
    images: list[ImageFile]


class Image(Message):
    """An image in the catalog. `sha256` and `size` are set once imported."""

    TYPE = "reply.catalog_image"
    image_id: uuid.UUID
    project: str
    name: str
    kind: ImageKindName
    visibility: VisibilityName
    pool: str
    host: str | None
    state: ImageStateName
    sha256: str | None = None
    size: int | None = None
    source_format: ImageFormatName | None = None
    created_at: float


class ImageList(Message):
    """The caller's images and every public one, by project and name."""

    TYPE = "reply.catalog_image_list"
    images: list[Image]


class ImageUsage(Message):
    """What a project's image names hold: how many (imports under way included), and the
    sum of their raw sizes, in bytes and in GiB rounded up."""

    TYPE = "reply.catalog_image_usage"
    images: int = Field(ge=0)
    image_bytes: int = Field(ge=0)
    image_gib: int = Field(ge=0)


class ImageImport(Message):
    """An import begun: the image (`importing`) and the ticket to stream its bytes with."""

    TYPE = "reply.catalog_image_import"
    image: Image
    ticket: TransferTicket


# ---- the agent's commands (storage.<host>) -------------------------------------------------


class OpenTransfer(PoolCommand):
    """A ticket for one stream into or out of the pool: `image_import` (into the image store;
    `format` if declared, `size` if known), `volume_upload` (a new volume `volume_id` of
    exactly `size` bytes, `sha256` checked if given), `volume_download` (volume
    `volume_id`'s bytes)."""

    TYPE = "cmd.storage.transfer_open"
    RESULT = TransferTicket
    op: TransferOpName
    volume_id: uuid.UUID | None = None
    size: int | None = Field(default=None, gt=0, le=MAX_IMAGE_BYTES)
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    format: ImageFormatName | None = None
    kind: ImageKindName | None = None  # an import's: a `kernel` is checked to be one


class GetTransferResult(Command):
    TYPE = "cmd.storage.transfer_result"
    RESULT = TransferResult
    ticket: str = Field(pattern=TICKET_PATTERN)


class ImportImageFile(PoolCommand):
    """Import the host's file `path` (an absolute path; admins only, checked by the API)."""

    TYPE = "cmd.storage.image_import_file"
    RESULT = TransferResult
    path: str = Field(min_length=2, max_length=4096, pattern=r"^/[^\x00]*$")
    format: ImageFormatName | None = None
    kind: ImageKindName | None = None


class GetImageFile(PoolCommand):
    TYPE = "cmd.storage.image_info"
    RESULT = ImageFile
    sha256: str = Field(pattern=SHA256_PATTERN)


class ListImageFiles(PoolCommand):
    TYPE = "cmd.storage.image_list"
    RESULT = ImageFiles


class DeleteImageFile(PoolCommand):
    TYPE = "cmd.storage.image_delete"
    RESULT = Done
    sha256: str = Field(pattern=SHA256_PATTERN)


class CreateVolumeFromImage(PoolCommand):
    """A new volume `volume_id`: a clone of image `sha256` (reflink or sparse copy), grown
    to `size` bytes if given."""

    TYPE = "cmd.storage.volume_from_image"
    RESULT = VolumeInfo
    volume_id: uuid.UUID
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int | None = Field(default=None, gt=0, le=MAX_VOLUME_BYTES, multiple_of=SECTOR)


class PushVolume(PoolCommand):
    """Stream volume `volume_id` of this host's pool to another host's transfer port (a
    `volume_upload` ticket there, `TransferTicket`'s fields), under the volume's shared
    lock. The reply: `done` with the size and sha256 of the bytes sent and the receiver's
    answer checked against them; a refusal (`conflict` busy, `not_found`) before any byte."""

    TYPE = "cmd.storage.volume_push"
    RESULT = TransferResult
    volume_id: uuid.UUID
    address: str = Field(max_length=255)
    port: int = Field(ge=1, le=65535)
    ticket: str = Field(pattern=TICKET_PATTERN)


IMAGE_AGENT_COMMANDS: tuple[type[Command], ...] = (
    OpenTransfer,
    PushVolume,
    GetTransferResult,
    ImportImageFile,
    GetImageFile,
    ListImageFiles,
    DeleteImageFile,
    CreateVolumeFromImage,
)


# ---- the catalog's commands (storage) -------------------------------------------------------


class ImageCommand(CatalogCommand):
    image_id: uuid.UUID
    RESULT: ClassVar[type[Message]] = Image


class BeginImageImport(ImageCommand):
    """A new image `name` (unique in the project) in `pool` (the default if None); the reply
    carries the ticket to stream the bytes with, then `EndImageImport` records the outcome."""

    TYPE = "cmd.catalog.image_import_begin"
    VERSION = "1.1"  # 1.1: `quota`
    RESULT = ImageImport
    project: str = Field(pattern=NAME_PATTERN)
    name: VolumeName
    kind: ImageKindName = "disk"
    visibility: VisibilityName = "private"
    pool: str | None = Field(default=None, pattern=NAME_PATTERN)
    format: ImageFormatName | None = None
    size: int | None = Field(default=None, gt=0, le=MAX_IMAGE_BYTES)
    # Checked now (the count, and `size` if given) and again at the end with the real size.
    quota: ImageQuota | None = None


class EndImageImport(ImageCommand):
    """The stream of `image_id` ended: record what the pool's host says it stored (the image
    becomes `available`, event `image.imported`) or forget the image (a refusal is raised)."""

    TYPE = "cmd.catalog.image_import_end"


class ImportImageFromHost(ImageCommand):
    """An admin's import of file `path` on the pool's host (or the service's, for a shared
    pool): begin, import and record in one command."""

    TYPE = "cmd.catalog.image_import_host"
    VERSION = "1.1"  # 1.1: `quota`
    project: str = Field(pattern=NAME_PATTERN)
    name: VolumeName
    kind: ImageKindName = "disk"
    visibility: VisibilityName = "private"
    pool: str | None = Field(default=None, pattern=NAME_PATTERN)
    format: ImageFormatName | None = None
    path: str = Field(min_length=2, max_length=4096, pattern=r"^/[^\x00]*$")
    quota: ImageQuota | None = None


class GetImage(ImageCommand):
    """The image, if the caller's project owns it or it is public."""

    TYPE = "cmd.catalog.image_info"


class FindImage(CatalogCommand):
    """The image named `name` the caller may use: its project's own, else a public one."""

    TYPE = "cmd.catalog.image_find"
    RESULT = Image
    name: VolumeName


class ListImages(CatalogCommand):
    TYPE = "cmd.catalog.image_list"
    RESULT = ImageList


class GetImageUsage(CatalogCommand):
    """What project `project`'s image names hold (for its quota's usage)."""

    TYPE = "cmd.catalog.image_usage"
    RESULT = ImageUsage
    project: str = Field(pattern=NAME_PATTERN)


class DeleteImage(ImageCommand):
    """Remove the image's name (its own project's only); the file goes with its last name.
    The reply is the image as it was."""

    TYPE = "cmd.catalog.image_delete"


IMAGE_CATALOG_COMMANDS: tuple[type[Command], ...] = (
    BeginImageImport,
    EndImageImport,
    ImportImageFromHost,
    GetImage,
    FindImage,
    ListImages,
    GetImageUsage,
    DeleteImage,
)


class VolumeUpload(Message):
    """An upload begun: the volume (`creating`) and the ticket to stream its bytes with."""

    TYPE = "reply.catalog_volume_upload"
    volume: Volume
    ticket: TransferTicket


class UploadedVolume(Message):
    """An upload recorded: the volume and the sha256 of its bytes (computed by its host)."""

    TYPE = "reply.catalog_volume_uploaded"
    volume: Volume
    sha256: str = Field(pattern=SHA256_PATTERN)


class VolumeDownload(Message):
    TYPE = "reply.catalog_volume_download"
    volume: Volume
    ticket: TransferTicket


class BeginVolumeUpload(CatalogCommand):
    """A new volume `name` of exactly `size` bytes from a stream (`sha256` checked if
    given); `EndVolumeUpload` records it. Nothing is visible until the whole stream is on
    disk and synced."""

    TYPE = "cmd.catalog.volume_upload_begin"
    RESULT = VolumeUpload
    volume_id: uuid.UUID
    project: str = Field(pattern=NAME_PATTERN)
    name: VolumeName
    pool: str | None = Field(default=None, pattern=NAME_PATTERN)
    size: int = Field(gt=0, le=MAX_VOLUME_BYTES, multiple_of=SECTOR)
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    quota: VolumeQuota | None = None


class EndVolumeUpload(CatalogCommand):
    """The stream of `volume_id` ended: the host's outcome is recorded (`available`, event
    `volume.created`), or the volume forgotten and the host's refusal raised."""

    TYPE = "cmd.catalog.volume_upload_end"
    RESULT = UploadedVolume
    volume_id: uuid.UUID


class BeginVolumeDownload(CatalogCommand):
    """A ticket to read volume `volume_id`'s bytes (refused while a guest writes it)."""

    TYPE = "cmd.catalog.volume_download"
    RESULT = VolumeDownload
    volume_id: uuid.UUID


# ---- events --------------------------------------------------------------------------------


class ImageEvent(Message):
    EVENT: ClassVar[str] = ""
    image_id: uuid.UUID
    project: str
    name: str
    kind: ImageKindName
    visibility: VisibilityName
    pool: str
    host: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)

    def routing_key(self) -> str:
        return f"image.{self.EVENT}.{self.image_id}"


class ImageImported(ImageEvent):
    """A new image name; `deduplicated`: its content was stored already (no new file)."""

    TYPE = "image.imported"
    EVENT = "imported"
    deduplicated: bool = False


class ImageDeleted(ImageEvent):
    """An image name removed; `file_removed`: it was the content's last name."""

    TYPE = "image.deleted"
    EVENT = "deleted"
    file_removed: bool = False

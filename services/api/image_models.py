"""Request and response bodies of /v1/images."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protos.domain import NAME_PATTERN
from protos.images import (
    Image,
    ImageFormatName,
    ImageKindName,
    ImageStateName,
    VisibilityName,
)
from services.api.visibility import HostMask
from services.api.volume_models import ApiVolumeName

# A volume name's rule as a pattern (no `/`, no `..`, no NUL), for query parameters.
IMAGE_NAME_PATTERN = r"^[A-Za-z0-9](\.?[A-Za-z0-9_-])*\.?$"


class ImageFromHost(BaseModel):
    """An admin's import of a file on the pool's host (the storage service's host for a
    shared pool): `path` is absolute; qcow2 is converted to raw."""

    model_config = ConfigDict(extra="forbid")

    name: ApiVolumeName
    path: str = Field(min_length=2, max_length=4096, pattern=r"^/[^\x00]*$")
    kind: ImageKindName = "disk"
    visibility: VisibilityName = "private"
    format: ImageFormatName | None = None
    pool: str | None = Field(default=None, pattern=NAME_PATTERN)


class ImageView(BaseModel):
    """An image: `sha256` and `size` of its raw content (what guests read), `source_format`
    what was imported."""

    id: uuid.UUID
    name: str
    project: str
    kind: ImageKindName
    visibility: VisibilityName
    pool: str
    host: str | None
    state: ImageStateName
    sha256: str | None
    size: int | None
    source_format: ImageFormatName | None
    created_at: float

    @classmethod
    def of(cls, image: Image, mask: HostMask) -> ImageView:
        return cls.model_validate(cls.json_of(image, mask))

    @staticmethod
    def json_of(image: Image, mask: HostMask) -> dict[str, Any]:
        return {
            "id": str(image.image_id),
            "name": image.name,
            "project": image.project,
            "kind": image.kind,
            "visibility": image.visibility,
            "pool": image.pool,
            "host": mask.name(image.host),
            "state": image.state,
            "sha256": image.sha256,
            "size": image.size,
            "source_format": image.source_format,
            "created_at": image.created_at,
        }


class ImageList(BaseModel):
    images: list[ImageView]

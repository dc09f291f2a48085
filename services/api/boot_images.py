"""`boot.image` and `boot.initrd_image` resolved: the names of a kernel and an initrd image
(the caller's project's own, else a public one) become the `ImageRef`s the compute node
opens; and the check that keeps an image a domain definition boots from from being deleted."""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import ValidationError

from protos.bindings import ImageRef
from protos.domain import DomainSpec
from protos.images import FindImage, Image
from services.api.context import ApiContext
from services.api.problems import Problem
from services.api.routes.volumes import call_storage


class BootImages(NamedTuple):
    kernel: ImageRef | None
    initrd: ImageRef | None


def boot_images(ctx: ApiContext, project: str, spec: DomainSpec) -> BootImages:
    """The ImageRefs of `spec.boot.image` (a kernel) and `spec.boot.initrd_image` (an
    initrd) for a domain of `project`; None for what the spec names by path or not at all.
    422 with `field` (`boot.image`, `boot.initrd_image`) for an image the project may not
    use or of another kind."""
    return BootImages(
        kernel=_resolve(ctx, project, spec.boot.image, "kernel", "boot.image"),
        initrd=_resolve(ctx, project, spec.boot.initrd_image, "initrd", "boot.initrd_image"),
    )


def _resolve(
    ctx: ApiContext, project: str, name: str | None, kind: Literal["kernel", "initrd"], field: str
) -> ImageRef | None:
    if name is None:
        return None
    try:
        image = call_storage(ctx, FindImage.model_validate({"name": name, "project": project}))
    except ValidationError:
        raise Problem(
            422,
            "invalid",
            f"{field}: {name!r} is not an image name",
            title="Invalid request",
            field=field,
        ) from None
    except Problem as problem:
        if problem.code in ("not_found", "invalid"):
            raise Problem(
                422,
                "invalid",
                f"{field}: no image {name!r} in project {project} or public",
                title="Invalid request",
                field=field,
            ) from None
        raise
    assert isinstance(image, Image)
    if image.kind != kind or image.sha256 is None:
        raise Problem(
            422,
            "invalid",
            f"{field}: image {name!r} is a {image.kind} image; {field} needs a {kind} image",
            title="Invalid request",
            field=field,
        )
    return ImageRef(sha256=image.sha256, pool=image.pool, host=image.host, kind=kind)


def domains_booting(ctx: ApiContext, image: Image) -> list[str]:
    """The names of the domains whose definition boots from `image`'s name as its kind (a
    kernel as `boot.image`, an initrd as `boot.initrd_image`; its project's domains, every
    project's for a public image): deleting it would leave them unable to start."""
    project = None if image.visibility == "public" else image.project

    def boots(spec: DomainSpec) -> bool:
        if image.kind == "kernel":
            return spec.boot.image == image.name
        return image.kind == "initrd" and spec.boot.initrd_image == image.name

    return [r.spec.name for r in ctx.registry.domains.matching(project=project) if boots(r.spec)]

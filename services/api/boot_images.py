"""`boot.image` resolved: the name of a kernel image (the caller's project's own, else a
public one) becomes the `ImageRef` the compute node opens; and the check that keeps an image
a domain definition boots from from being deleted."""

from __future__ import annotations

from pydantic import ValidationError

from protos.bindings import ImageRef
from protos.domain import DomainSpec
from protos.images import FindImage, Image
from services.api.context import ApiContext
from services.api.problems import Problem
from services.api.routes.volumes import call_storage


def kernel_image(ctx: ApiContext, project: str, spec: DomainSpec) -> ImageRef | None:
    """The ImageRef of `spec.boot.image` for a domain of `project`; None for a kernel path.
    422 (`boot.image`) for an image the project may not use or that is not a kernel."""
    name = spec.boot.image
    if name is None:
        return None
    try:
        image = call_storage(ctx, FindImage.model_validate({"name": name, "project": project}))
    except ValidationError:
        raise Problem(
            422,
            "invalid",
            f"boot.image: {name!r} is not an image name",
            title="Invalid request",
            field="boot.image",
        ) from None
    except Problem as problem:
        if problem.code in ("not_found", "invalid"):
            raise Problem(
                422,
                "invalid",
                f"boot.image: no image {name!r} in project {project} or public",
                title="Invalid request",
                field="boot.image",
            ) from None
        raise
    assert isinstance(image, Image)
    if image.kind != "kernel" or image.sha256 is None:
        raise Problem(
            422,
            "invalid",
            f"boot.image: image {name!r} is a {image.kind} image; booting needs a kernel image",
            title="Invalid request",
            field="boot.image",
        )
    return ImageRef(sha256=image.sha256, pool=image.pool, host=image.host, kind="kernel")


def domains_booting(ctx: ApiContext, image: Image) -> list[str]:
    """The names of the domains whose definition boots from `image`'s name (its project's;
    every project's for a public image): deleting it would leave them unable to start."""
    project = None if image.visibility == "public" else image.project
    return [
        r.spec.name
        for r in ctx.registry.list_domains(project=project)
        if r.spec.boot.image == image.name
    ]

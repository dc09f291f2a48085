"""Volumes as domain disks: resolved at create, attached and detached on stopped domains.

A spec's `disks: [{target, volume_id, readonly}]` are marked attached to the domain in the
storage catalog (which refuses a volume attached elsewhere, or another project's: 422 naming
the disk) and become `DiskBinding`s (volume, pool, pool's host) on `ScheduleDomain`; they
are detached when the domain is deleted or its create is refused.
"""

from __future__ import annotations

import uuid
from typing import Annotated

import structlog
from fastapi import APIRouter, Path

from protos.bindings import DiskBinding
from protos.commands import DefineDomain
from protos.domain import DiskSpec, DomainSpec, PowerState, TaskState
from protos.images import FindImage, Image
from protos.volumes import (
    Attachment,
    AttachVolume,
    CreateVolume,
    DeleteVolume,
    DetachVolume,
    GetVolume,
    Volume,
)
from services.api import boot_images
from services.api.context import ApiContext
from services.api.models import DomainView
from services.api.problems import Problem, responses
from services.api.registry.domains import DomainRecord
from services.api.routes.deps import Caller, Ctx, Mask
from services.api.routes.volumes import call_storage, volume_quota
from services.api.volume_models import DiskAttach

log = structlog.get_logger("flotilla.api")
router = APIRouter(prefix="/v1/domains", tags=["domains"])


def binding(volume: Volume, target: str, readonly: bool) -> DiskBinding:
    return DiskBinding(
        target=target,
        volume_id=volume.volume_id,
        pool=volume.pool,
        host=volume.host,
        readonly=readonly,
    )


def attach_disks(
    ctx: ApiContext,
    project: str | None,
    domain_id: uuid.UUID,
    spec: DomainSpec,
    *,
    owner: str | None = None,
) -> list[DiskBinding]:
    """Mark every volume disk of `spec` attached to the domain, first making the volume of
    each image disk (a clone of the image, in `owner`'s project); their bindings. On a
    refusal what was attached is detached, what was made deleted, and the problem names the
    disk's field."""
    bindings: list[DiskBinding] = []
    made: list[uuid.UUID] = []
    for i, disk in enumerate(spec.disks):
        if disk.volume_id is None and disk.image is None:
            continue
        field = f"disks.{i}.volume_id" if disk.image is None else f"disks.{i}.image"
        try:
            volume_id = disk.volume_id
            if disk.image is not None:
                volume_id = _volume_from_image(ctx, owner, domain_id, spec, disk)
                made.append(volume_id)
            assert volume_id is not None
            volume = _attach(ctx, project, domain_id, disk, volume_id)
        except Problem as problem:
            detach_disks(ctx, domain_id, [b.volume_id for b in bindings])
            _delete_volumes(ctx, made)
            raise _about_disk(problem, field) from None
        bindings.append(binding(volume, disk.target, disk.readonly))
    return bindings


def local_pools(ctx: ApiContext, domain_id: uuid.UUID, spec: DomainSpec) -> list[str]:
    """The host-local (`dir`) pools the domain's volumes are on, as the storage catalog says
    (a migration's target must have each). A volume the catalog does not answer for is left
    out: the storage service's own checks still stop a move it cannot make."""
    pools: set[str] = set()
    for disk in spec.disks:
        if disk.volume_id is None and disk.image is None:
            continue
        volume_id = disk.volume_id or image_volume_id(domain_id, disk.target)
        try:
            volume = call_storage(ctx, GetVolume(volume_id=volume_id))
        except Problem as problem:
            log.warning("volume pool unknown", volume_id=str(volume_id), error=problem.detail)
            continue
        assert isinstance(volume, Volume)
        if volume.host is not None:
            pools.add(volume.pool)
    return sorted(pools)


def image_volume_id(domain_id: uuid.UUID, target: str) -> uuid.UUID:
    """The id of the volume an image disk `target` of the domain is made as: derived, so a
    retry finds the first attempt's and the domain's delete finds it."""
    return uuid.uuid5(domain_id, f"disk/{target}")


def _volume_from_image(
    ctx: ApiContext, owner: str | None, domain_id: uuid.UUID, spec: DomainSpec, disk: DiskSpec
) -> uuid.UUID:
    assert disk.image is not None
    if owner is None:
        raise Problem(422, "invalid", "an image disk is made at create only")
    image = call_storage(ctx, FindImage(name=disk.image, project=owner))
    assert isinstance(image, Image)
    command = CreateVolume(
        volume_id=image_volume_id(domain_id, disk.target),
        project=owner,
        name=f"{spec.name[:58]}-{disk.target}",
        image_id=image.image_id,
        size=None if disk.size_gib is None else disk.size_gib << 30,
        quota=volume_quota(ctx, owner),
    )
    volume = call_storage(ctx, command)
    assert isinstance(volume, Volume)
    return volume.volume_id


def _delete_volumes(ctx: ApiContext, volume_ids: list[uuid.UUID]) -> None:
    for volume_id in volume_ids:
        try:
            call_storage(ctx, DeleteVolume(volume_id=volume_id))
        except Problem as problem:
            log.warning("volume not deleted", volume_id=str(volume_id), error=problem.detail)


def _attach(
    ctx: ApiContext,
    project: str | None,
    domain_id: uuid.UUID,
    disk: DiskSpec,
    volume_id: uuid.UUID,
) -> Volume:
    attachment = Attachment(domain_id=domain_id, target=disk.target, readonly=disk.readonly)
    volume = call_storage(
        ctx, AttachVolume(volume_id=volume_id, project=project, attachment=attachment)
    )
    assert isinstance(volume, Volume)
    return volume


def _about_disk(problem: Problem, field: str) -> Problem:
    """A storage refusal about one disk of a spec: a missing (or another project's) volume
    is bad input (422), not a missing resource of the URL."""
    status = 422 if problem.code == "not_found" else problem.status
    return Problem(status, problem.code, f"{field}: {problem.detail}", field=field)


def detach_disks(ctx: ApiContext, domain_id: uuid.UUID, volume_ids: list[uuid.UUID]) -> None:
    """Mark the volumes available again (best effort: a failure is logged, and the volume
    stays attached to a domain that is gone, for an operator to detach)."""
    for volume_id in volume_ids:
        try:
            call_storage(ctx, DetachVolume(volume_id=volume_id, domain_id=domain_id))
        except Problem as problem:
            log.warning("volume not detached", volume_id=str(volume_id), error=problem.detail)


def volume_ids(spec: DomainSpec) -> list[uuid.UUID]:
    return [d.volume_id for d in spec.disks if d.volume_id is not None]


def release_disks(ctx: ApiContext, domain_id: uuid.UUID, spec: DomainSpec) -> None:
    """The domain is gone from its host: its volumes are detached, and the volumes made from
    images for it deleted (unless the disk says `keep`)."""
    made = {d.target: image_volume_id(domain_id, d.target) for d in spec.disks if d.image}
    detach_disks(ctx, domain_id, volume_ids(spec) + list(made.values()))
    _delete_volumes(ctx, [made[d.target] for d in spec.disks if d.image and not d.keep])


def _stopped(ctx: ApiContext, caller: Caller, domain_id: uuid.UUID) -> DomainRecord:
    record = ctx.visible_domain(caller, domain_id)
    if (
        record.host is None
        or record.task is not TaskState.NONE
        or record.power
        not in (
            PowerState.SHUTOFF,
            PowerState.CRASHED,
        )
    ):
        raise Problem(
            409,
            "conflict",
            "disks are attached and detached on a stopped domain",
            state=record.power.value,
            task=record.task.value,
        )
    return record


def _redefine(
    ctx: ApiContext, caller: Caller, record: DomainRecord, spec: DomainSpec
) -> DomainRecord:
    """Define `spec` on the domain's host (with every volume disk's binding) and record it."""
    assert record.host is not None
    bindings = []
    for disk in spec.disks:
        volume_id = disk.volume_id
        if disk.image is not None:
            volume_id = image_volume_id(record.id, disk.target)
        if volume_id is not None:
            volume = call_storage(ctx, GetVolume(volume_id=volume_id))
            assert isinstance(volume, Volume)
            bindings.append(binding(volume, disk.target, disk.readonly))
    # The boot images are resolved again by name, as at create.
    boot = boot_images.boot_images(ctx, record.project, spec)
    ctx.call_host(
        record.host,
        DefineDomain(
            spec=spec,
            privileged=caller.is_admin,
            disks=bindings,
            kernel_image=boot.kernel,
            initrd_image=boot.initrd,
        ),
    )
    updated = ctx.registry.domains.set_spec(record.id, spec)
    assert updated is not None
    return updated


@router.post(
    "/{domain_id}/disks",
    response_model=DomainView,
    responses=responses(401, 404, 409, 422, 503, 504),
)
def attach_disk(
    domain_id: uuid.UUID, attach: DiskAttach, ctx: Ctx, caller: Caller, mask: Mask
) -> DomainView:
    """Attach volume `volume_id` as disk `target` of a stopped domain (virsh attach-disk
    --config): 409 if the domain is not stopped or the target is taken, 422 for a volume
    that does not exist, is another project's or is attached elsewhere."""
    body = DiskSpec(target=attach.target, volume_id=attach.volume_id, readonly=attach.readonly)
    assert body.volume_id is not None
    record = _stopped(ctx, caller, domain_id)
    if any(d.target == body.target for d in record.spec.disks):
        raise Problem(
            409, "conflict", f"target {body.target} is taken", field="target", reason="target"
        )
    project = None if caller.is_admin else caller.project
    try:
        _attach(ctx, project, domain_id, body, body.volume_id)
    except Problem as problem:
        raise _about_disk(problem, "volume_id") from None
    spec = record.spec.model_copy(update={"disks": [*record.spec.disks, body]})
    try:
        updated = _redefine(ctx, caller, record, DomainSpec.model_validate(spec.model_dump()))
    except Problem:
        detach_disks(ctx, domain_id, [body.volume_id])
        raise
    return DomainView.of(updated, mask)


@router.delete(
    "/{domain_id}/disks/{target}",
    response_model=DomainView,
    responses=responses(401, 404, 409, 422, 503, 504),
)
def detach_disk(
    domain_id: uuid.UUID,
    target: Annotated[str, Path(pattern=r"^vd[a-z]$")],
    ctx: Ctx,
    caller: Caller,
    mask: Mask,
) -> DomainView:
    """Detach disk `target` from a stopped domain; its volume (also one made from an
    image) is available again."""
    record = _stopped(ctx, caller, domain_id)
    disk = next((d for d in record.spec.disks if d.target == target), None)
    if disk is None:
        raise Problem(404, "not_found", f"domain {domain_id} has no disk {target}")
    spec = DomainSpec.model_validate(
        record.spec.model_copy(
            update={"disks": [d for d in record.spec.disks if d.target != target]}
        ).model_dump()
    )
    updated = _redefine(ctx, caller, record, spec)
    if disk.volume_id is not None:
        detach_disks(ctx, domain_id, [disk.volume_id])
    elif disk.image is not None:  # the volume made from the image stays, available
        detach_disks(ctx, domain_id, [image_volume_id(domain_id, target)])
    return DomainView.of(updated, mask)

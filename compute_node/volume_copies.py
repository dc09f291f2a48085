"""A live migration's host-local volumes: copied by the migration stream.

A running domain whose writable disks are volumes of this host's `dir` pools migrates live
with them: before the target is prepared, the storage service makes an empty sparse file of
each on the target's pool of the same name (`LiveMoveVolume` step `prepare`, the move held
under the volume's lease); the target's VMM opens those files and the stream copies into them
(docs/migration.md, "Block copy"). Committed, and once the source's VMM is gone, the catalog
names the target and the source's file goes (`commit`, kept in the node's store and resent
until the catalog answers: compute_node.storage_steps); not committed, once the target has
forgotten the domain, the target's file goes and the volume stays here (`abort`, kept and
resent the same way: a VMM still closing the file makes it `busy` for a moment).

Read-only host-local volumes are refused: the engine copies only into a writable disk, and a
read-only volume may be shared by other domains of this host, which would lose it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from compute_node.volume_moves import Peer, ask_storage
from protos.bindings import DiskBinding
from protos.domain import DomainSpec
from protos.volumes import LiveMoveVolume, Volume
from services.bus import ServiceError

STEP_TIMEOUT_S = 60.0


def copied_disks(spec: DomainSpec, disks: Sequence[DiskBinding], host: str) -> list[DiskBinding]:
    """The bindings of `host`'s own volumes a live migration copies; ServiceError
    (`invalid`, field `disks`) for a read-only one."""
    readonly = {d.target for d in spec.disks if d.readonly}
    local = [d for d in disks if d.host == host]
    refused = [d.target for d in local if d.readonly or d.target in readonly]
    if refused:
        raise ServiceError(
            "invalid",
            f"disk(s) {', '.join(refused)} are read-only volumes of a host-local pool, which a "
            "live migration does not copy (other domains here may share them): detach them, "
            "or shut the domain off and migrate it cold (live false)",
            {"field": "disks"},
        )
    return local


def disk_indices(spec: DomainSpec, disks: Sequence[DiskBinding]) -> list[int]:
    """The machine's disk slots (target order) of `disks`."""
    order = sorted(d.target for d in spec.disks)
    return [order.index(d.target) for d in disks]


def prepare_copies(
    peer: Peer,
    disks: Sequence[DiskBinding],
    copies: Sequence[DiskBinding],
    target: str,
    abort: Callable[[Sequence[DiskBinding]], None],
) -> list[DiskBinding]:
    """An empty file on `target` for each of `copies`; returns `disks` with those naming
    `target`. On a failure the files made so far go (`abort`: kept until the catalog
    answers) and ServiceError says which disk."""
    done: list[DiskBinding] = []
    for binding in copies:
        try:
            _step(peer, binding, target, "prepare")
        except ServiceError as exc:
            # Unanswered, it may have been prepared: undone too (an abort of none is a no-op).
            unknown = [binding] if exc.code == "unavailable" else []
            abort([*done, *unknown])
            raise ServiceError(
                exc.code,
                f"preparing disk {binding.target} (volume {binding.volume_id}) on {target}: "
                f"{exc.message}",
                {**exc.details, "field": "disks", "target": target},
            ) from None
        done.append(binding)
    moved = {b.target for b in copies}
    return [b.model_copy(update={"host": target}) if b.target in moved else b for b in disks]


def commit_steps(copies: Sequence[DiskBinding], target: str) -> list[LiveMoveVolume]:
    """The steps that make the catalog name `target` for each of `copies` (the guest runs
    there): kept and sent by compute_node.storage_steps until the catalog answers."""
    return [LiveMoveVolume(volume_id=b.volume_id, host=target, step="commit") for b in copies]


def abort_steps(copies: Sequence[DiskBinding], target: str) -> list[LiveMoveVolume]:
    """The steps that remove the target's file of each of `copies` (the volumes stay here):
    kept and sent by compute_node.storage_steps until the catalog answers, as commits are."""
    return [LiveMoveVolume(volume_id=b.volume_id, host=target, step="abort") for b in copies]


def _step(
    peer: Peer, binding: DiskBinding, host: str, step: Literal["prepare", "commit", "abort"]
) -> Volume:
    command = LiveMoveVolume(volume_id=binding.volume_id, host=host, step=step)
    return ask_storage(peer, command, STEP_TIMEOUT_S)

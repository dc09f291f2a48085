"""A live migration's host-local volumes: copied by the migration stream.

A running domain whose writable disks are volumes of this host's `dir` pools migrates live
with them: before the target is prepared, the storage service makes an empty sparse file of
each on the target's pool of the same name (`LiveMoveVolume` step `prepare`, the move held
under the volume's lease); the target's VMM opens those files and the stream copies into them
(docs/migration.md, "Block copy"). Committed, and once the source's VMM is gone, the catalog
names the target and the source's file goes (`commit`, kept in the node's store and resent
until the catalog answers: compute_node.storage_steps); not committed, once the target has
forgotten the domain, the target's file goes and the volume stays here (`abort`).

Read-only host-local volumes are refused: the engine copies only into a writable disk, and a
read-only volume may be shared by other domains of this host, which would lose it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import structlog

from compute_node.volume_moves import Peer, ask_storage
from protos.bindings import DiskBinding
from protos.domain import DomainSpec
from protos.volumes import LiveMoveVolume, Volume
from services.bus import ServiceError

log = structlog.get_logger("flotilla.compute.volume_copies")

STEP_TIMEOUT_S = 60.0
# An abort the storage service did not answer (or refused as busy: a VMM still closing the
# file) is resent this many times, RETRY_S apart. (A commit is kept until it is answered:
# compute_node.storage_steps.)
ATTEMPTS = 10
RETRY_S = 1.0


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
    peer: Peer, disks: Sequence[DiskBinding], copies: Sequence[DiskBinding], target: str
) -> list[DiskBinding]:
    """An empty file on `target` for each of `copies`; returns `disks` with those naming
    `target`. On a failure the files made so far go and ServiceError says which disk."""
    done: list[DiskBinding] = []
    for binding in copies:
        try:
            _step(peer, binding, target, "prepare")
        except ServiceError as exc:
            # Unanswered, it may have been prepared: undone too (an abort of none is a no-op).
            unknown = [binding] if exc.code == "unavailable" else []
            abort_copies(peer, [*done, *unknown], target)
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


def abort_copies(peer: Peer, copies: Sequence[DiskBinding], target: str) -> None:
    """The target's file of each of `copies` goes; the volumes stay here."""
    for binding in copies:
        _retried(peer, binding, target, "abort")


def _retried(peer: Peer, binding: DiskBinding, target: str, step: Literal["abort"]) -> None:
    for attempt in range(ATTEMPTS):
        try:
            _step(peer, binding, target, step)
            return
        except ServiceError as exc:
            again = exc.code == "unavailable" or exc.details.get("reason") == "busy"
            if not again or attempt == ATTEMPTS - 1:
                log.warning(
                    "live move step failed",
                    step=step,
                    volume_id=str(binding.volume_id),
                    target=target,
                    error=exc.message,
                )
                return
        time.sleep(RETRY_S)


def _step(
    peer: Peer, binding: DiskBinding, host: str, step: Literal["prepare", "commit", "abort"]
) -> Volume:
    command = LiveMoveVolume(volume_id=binding.volume_id, host=host, step=step)
    return ask_storage(peer, command, STEP_TIMEOUT_S)

"""A cold migration's host-local volumes: moved to the target by the storage service.

A shut-off domain whose disks are volumes of this host's `dir` pools migrates cold once its
volumes are on the target: the storage service's `MoveVolume` copies each (sparse, checked by
sha256, the source file removed only after the switch; docs/storage.md, "Moving a volume to
another host") and the catalog then names the target. The definition goes to the target with
bindings that name it. If the migration does not commit, the volumes come back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from protos import routing
from protos.base import Message
from protos.bindings import DiskBinding
from protos.commands import Command
from protos.volumes import MoveVolume, Volume
from services.bus import BusError, RemoteError, ServiceError

log = structlog.get_logger("flotilla.compute.volume_moves")

Peer = Callable[[str, Command, float], Message]
# A move copies the whole volume between hosts: minutes for a large one.
MOVE_TIMEOUT_S = 600.0


def local_disks(disks: Sequence[DiskBinding], host: str) -> list[DiskBinding]:
    """The bindings of volumes on `host`'s own `dir` pools."""
    return [d for d in disks if d.host == host]


def move_disks(
    peer: Peer, disks: Sequence[DiskBinding], source: str, target: str
) -> list[DiskBinding]:
    """Every binding of `disks` on `source`'s pools moved to `target`; returns the bindings
    as they are then (the moved ones naming `target`). On a failure the ones already moved
    go back and ServiceError says which disk failed and why (`details.field` `disks`)."""
    moved: list[DiskBinding] = []
    out: list[DiskBinding] = []
    for binding in disks:
        if binding.host != source:
            out.append(binding)
            continue
        try:
            _move(peer, binding, target)
        except ServiceError as exc:
            move_back(peer, moved, source)
            raise ServiceError(
                exc.code,
                f"moving disk {binding.target} (volume {binding.volume_id}) to {target}: "
                f"{exc.message}",
                {**exc.details, "field": "disks", "target": target},
            ) from None
        moved.append(binding)
        out.append(binding.model_copy(update={"host": target}))
    return out


def move_back(peer: Peer, disks: Sequence[DiskBinding], source: str) -> None:
    """Bring moved volumes back to `source` (a migration that did not commit); a volume that
    cannot come back is logged: the catalog names where it is."""
    for binding in disks:
        try:
            _move(peer, binding, source)
        except ServiceError as exc:
            log.warning(
                "a moved volume did not come back",
                volume_id=str(binding.volume_id),
                host=source,
                error=exc.message,
            )


def _move(peer: Peer, binding: DiskBinding, host: str) -> None:
    command = MoveVolume(volume_id=binding.volume_id, host=host)
    reply = ask_storage(peer, command, MOVE_TIMEOUT_S)
    if reply.host != host:
        raise ServiceError(
            "internal", f"the storage service left volume {binding.volume_id} on {reply.host}"
        )


def ask_storage(peer: Peer, command: Command, timeout: float) -> Volume:
    """The storage service's answer to a volume command: the volume, or ServiceError with
    its refusal's code (`unavailable` when it did not answer)."""
    try:
        reply = peer(routing.STORAGE_QUEUE, command, timeout)
    except RemoteError as exc:
        raise ServiceError(exc.code, exc.message, exc.details) from None
    except BusError as exc:
        raise ServiceError("unavailable", f"the storage service did not answer: {exc}") from None
    if not isinstance(reply, Volume):
        raise ServiceError("internal", f"the storage service answered {type(reply).__name__}")
    return reply

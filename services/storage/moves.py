"""Moving a host-local volume to another host (a part of StorageService): a cold migration.

One command reads top to bottom: check the volume (a `dir` pool's, not busy) and take its
lease; a `volume_upload` ticket on the target host's pool of the same name; the source host's
agent pushes the file there (under its shared lock, so a guest writing it refuses the move;
the receiver keeps holes as holes, syncs and names the file only once all of it arrived);
both ends' sizes and sha256 must agree; then the catalog names the new host (with its event,
`volume.moved`), and only then the source file goes. Any failure before the switch removes
the target's copy and leaves the volume where it was. A redelivered command finds the volume
moved (answered as it is) or not (its target's leftover copy is removed and the move runs
again).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from compute_node.storage_agent import ERROR_CODES
from protos.images import OpenTransfer, PushVolume, TransferResult
from protos.volumes import MoveVolume, Volume
from services.bus import Context, ServiceError, handles
from services.storage.catalog import moved_from

if TYPE_CHECKING:
    from services.storage.backends import AgentBackend, PoolBackend
    from services.storage.catalog import Catalog
    from services.storage.config import StorageConfig
    from services.storage.service import Leases

log = structlog.get_logger("flotilla.storage.moves")


class MoveHandlers:
    """Mixed into StorageService, which provides these."""

    config: StorageConfig
    catalog: Catalog
    leases: Leases
    notify: Callable[[], None]

    def backend(self, host: str | None) -> PoolBackend:
        raise NotImplementedError

    def agent(self, host: str) -> AgentBackend:
        raise NotImplementedError

    @handles(MoveVolume)
    def volume_move(self, cmd: MoveVolume, ctx: Context) -> Volume:
        volume = self.catalog.get(cmd.volume_id, cmd.project)
        if volume.host == cmd.host:
            return volume  # moved already (a redelivery, or nothing to do)
        if volume.host is None:
            raise ServiceError(
                "invalid",
                f"volume {volume.volume_id} is on shared pool {volume.pool!r}: it stays",
                {"field": "volume_id"},
            )
        self.catalog.pool_on(volume.pool, cmd.host)  # not_found: the target has no such pool
        volume = self.catalog.guard(
            cmd.volume_id,
            cmd.project,
            states=("available", "attached"),
            action="move",
            lease_s=self.config.lease_s,
        )
        source, target = volume.host, cmd.host
        assert source is not None
        key = f"{ctx.envelope.id}/move"
        with self.leases.hold(volume.volume_id):
            try:
                self._copy(volume, source, target)
                after = self.catalog.change(
                    volume.volume_id,
                    {"host": target, "lease_owner": None, "lease_until": 0},
                    moved_from(source),
                    ctx.cause,
                )
            finally:
                self.catalog.release(volume.volume_id)
        # The catalog names the target now: the source's file is a leftover either way.
        try:
            self.backend(source).delete(volume.pool, volume.volume_id, _key(key, "delete"))
        except ServiceError as exc:
            log.warning(
                "moved volume's source file not removed",
                volume_id=str(volume.volume_id),
                host=source,
                error=exc.message,
            )
        log.info("volume moved", volume_id=str(volume.volume_id), source=source, target=target)
        return after

    def _copy(self, volume: Volume, source: str, target: str) -> None:
        """The volume's file onto `target`, whole and verified, or ServiceError with no copy
        left there."""
        dest = self.backend(target)
        open_cmd = OpenTransfer(
            pool=volume.pool, op="volume_upload", volume_id=volume.volume_id, size=volume.size
        )
        try:
            ticket = dest.open_transfer(open_cmd)
        except ServiceError as exc:
            if exc.details.get("reason") != "exists":
                raise
            # A copy an earlier attempt left (the catalog still names the source): redo it.
            dest.delete(volume.pool, volume.volume_id, None)
            ticket = dest.open_transfer(open_cmd)
        push = PushVolume(
            pool=volume.pool,
            volume_id=volume.volume_id,
            address=ticket.address,
            port=ticket.port,
            ticket=ticket.ticket,
        )
        try:
            pushed = self.agent(source).push(push)
            if pushed.state == "done":
                stored = dest.transfer_result(ticket.ticket)
                if stored.state != "done" or stored.sha256 != pushed.sha256:
                    pushed = TransferResult(
                        state="failed",
                        code="checksum_mismatch",
                        message=f"host {target} stored sha256 {stored.sha256} "
                        f"({stored.state}), {source} sent {pushed.sha256}",
                    )
        except ServiceError:
            _drop(dest, volume)
            raise
        if pushed.state != "done":
            _drop(dest, volume)
            raise ServiceError(
                ERROR_CODES.get(pushed.code or "", "internal"),
                f"moving volume {volume.volume_id} to {target}: {pushed.message}",
                {"field": "volume_id"},
            )


def _key(key: str, step: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{key}/{step}"))


def _drop(dest: PoolBackend, volume: Volume) -> None:
    """Remove a partial or unverified copy on the target (none may be there)."""
    try:
        dest.delete(volume.pool, volume.volume_id, None)
    except ServiceError as exc:
        if exc.code != "not_found":
            log.warning(
                "copy of a volume not moved stays on its target",
                volume_id=str(volume.volume_id),
                error=exc.message,
            )

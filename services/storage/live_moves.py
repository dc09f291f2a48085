"""Moving a host-local volume inside a live migration (a part of StorageService).

The migration stream copies the data (docs/migration.md, "Block copy"); the storage service
owns the files and the catalog around it, in three steps the source's compute node sends
(docs/storage.md, "Moving a volume live"):

- `prepare`: the volume (a `dir` pool's, available or attached, no other operation under
  way, no move prepared) takes a lease this replica renews until the commit or abort, owned
  as the move's (`Catalog.move_owner`) so every other operation is busy meanwhile, this
  replica's too; an empty sparse file of its size is made on the target host's pool of the
  same name (one an earlier attempt left is made anew). The catalog still names the source.
- `commit` (the target runs the guest, the source's VMM is gone): the catalog names the
  target (with its event, `volume.moved`), the lease goes, then the source's file is removed.
- `abort` (the migration did not commit): the target's file is removed, the lease goes,
  the volume stays on the source.

Paths never travel: the target file is named by the volume's pool and id on the host the
catalog knows the pool on. Commit and abort are idempotent, so a compute node may resend
them; a second prepare is busy (the compute node aborts a prepare whose answer it lost).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from protos.volumes import LiveMoveVolume, Volume
from services.bus import Context, ServiceError, handles
from services.storage.catalog import moved_from

if TYPE_CHECKING:
    from services.storage.backends import PoolBackend
    from services.storage.catalog import Catalog
    from services.storage.config import StorageConfig
    from services.storage.service import Leases

log = structlog.get_logger("flotilla.storage.live_moves")


class LiveMoveHandlers:
    """Mixed into StorageService, which provides these."""

    config: StorageConfig
    catalog: Catalog
    leases: Leases
    notify: Callable[[], None]

    def backend(self, host: str | None) -> PoolBackend:
        raise NotImplementedError

    @handles(LiveMoveVolume)
    def volume_live_move(self, cmd: LiveMoveVolume, ctx: Context) -> Volume:
        volume = self.catalog.get(cmd.volume_id, cmd.project)
        if cmd.step == "prepare":
            return self._live_prepare(volume, cmd)
        if cmd.step == "commit":
            return self._live_commit(volume, cmd, ctx)
        return self._live_abort(volume, cmd)

    def _live_prepare(self, volume: Volume, cmd: LiveMoveVolume) -> Volume:
        if volume.host is None:
            raise ServiceError(
                "invalid",
                f"volume {volume.volume_id} is on shared pool {volume.pool!r}: it stays",
                {"field": "volume_id"},
            )
        if volume.host == cmd.host:
            raise ServiceError(
                "invalid",
                f"volume {volume.volume_id} is on host {cmd.host} already",
                {"field": "host"},
            )
        self.catalog.pool_on(volume.pool, cmd.host)  # not_found: the target has no such pool
        volume = self.catalog.guard(
            cmd.volume_id,
            cmd.project,
            states=("available", "attached"),
            action="move",
            lease_s=self.config.lease_s,
        )
        self.leases.keep(volume.volume_id)
        dest = self.backend(cmd.host)
        try:
            try:
                dest.create(volume.pool, volume.volume_id, volume.size, None)
            except ServiceError as exc:
                if exc.details.get("reason") != "exists":
                    raise
                # An earlier attempt's file (the catalog still names the source): anew.
                dest.delete(volume.pool, volume.volume_id, None)
                dest.create(volume.pool, volume.volume_id, volume.size, None)
        except BaseException:
            self.leases.drop(volume.volume_id)
            self.catalog.release(volume.volume_id)
            raise
        # Held as the move's from now on: this replica's own other operations are busy too.
        self.catalog.hand_lease(volume.volume_id, self.catalog.move_owner)
        log.info(
            "live move prepared",
            volume_id=str(volume.volume_id),
            source=volume.host,
            target=cmd.host,
        )
        return volume

    def _live_commit(self, volume: Volume, cmd: LiveMoveVolume, ctx: Context) -> Volume:
        if volume.host == cmd.host:
            self.leases.drop(volume.volume_id)
            return volume  # committed already (a resent commit)
        source = volume.host
        if source is None:
            raise ServiceError(
                "invalid", f"volume {volume.volume_id} is on a shared pool", {"field": "volume_id"}
            )
        if self.backend(cmd.host).size(volume.pool, volume.volume_id) is None:
            raise ServiceError(
                "conflict",
                f"volume {volume.volume_id} has no copy on host {cmd.host}: nothing to commit",
                {"reason": "state"},
            )
        after = self.catalog.change(
            volume.volume_id,
            {"host": cmd.host, "lease_owner": None, "lease_until": 0},
            moved_from(source),
            ctx.cause,
        )
        self.leases.drop(volume.volume_id)
        # The catalog names the target now: the source's file is a leftover either way.
        try:
            self.backend(source).delete(volume.pool, volume.volume_id, None)
        except ServiceError as exc:
            if exc.code != "not_found":
                log.warning(
                    "moved volume's source file not removed",
                    volume_id=str(volume.volume_id),
                    host=source,
                    error=exc.message,
                )
        log.info(
            "volume moved live", volume_id=str(volume.volume_id), source=source, target=cmd.host
        )
        return after

    def _live_abort(self, volume: Volume, cmd: LiveMoveVolume) -> Volume:
        if volume.host == cmd.host:
            raise ServiceError(
                "conflict",
                f"volume {volume.volume_id} moved to host {cmd.host}: too late to abort",
                {"reason": "committed"},
            )
        try:
            self.backend(cmd.host).delete(volume.pool, volume.volume_id, None)
        except ServiceError as exc:
            if exc.code != "not_found":
                raise
        self.leases.drop(volume.volume_id)
        self.catalog.release(volume.volume_id, self.catalog.move_owner)
        log.info("live move aborted", volume_id=str(volume.volume_id), target=cmd.host)
        return self.catalog.get(volume.volume_id, None)

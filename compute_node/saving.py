"""The compute node's save, restore, managed-save and snapshot handlers (docs/snapshots.md).

Mixed into the lifecycle service (compute_node.lifecycle), whose lock, transition check and
launch path they use: a restore opens files, plugs ports and claims exactly as a start does,
and the driver's events become the domain's events there (STOPPED/SAVED, STARTED/RESTORED,
STARTED/FROM_SNAPSHOT, ...), seq continuing. Paths come from compute_node.saved_states,
derived from the StateRef, never from the wire.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from compute_node.boot_sources import BootFiles
from compute_node.causes import PendingCauses
from compute_node.driver import Driver, DriverError, GuestEventKind, NicTap
from compute_node.saved_states import (
    ForeignState,
    Manifest,
    StateAreas,
    StateError,
    allocated_bytes,
    copy_disks,
    make_manifest,
    revert_disks,
    write_manifest,
)
from compute_node.storage import StorageError
from compute_node.storage_sources import StorageSources
from compute_node.store import DomainRecord, Store
from protos.bindings import StateRef
from protos.commands import (
    CreateSnapshot,
    DeleteState,
    RemoveManagedSave,
    RestoreDomain,
    RevertSnapshot,
    SaveDomain,
)
from protos.domain import PowerState
from protos.replies import DomainInfo, SavedState
from protos.states import Action
from services.bus import Cause, Context, ServiceError, handles

K = GuestEventKind
Launch = Callable[[BootFiles, list[NicTap]], None]


class SaveHandlers:
    """Save, restore, managed save and snapshots; the lifecycle service provides the rest."""

    host: str
    store: Store
    driver: Driver
    storage: StorageSources
    causes: PendingCauses
    states: StateAreas
    info: Callable[[uuid.UUID], DomainInfo]
    _lock: Callable[[uuid.UUID], threading.Lock]
    _record: Callable[[uuid.UUID], DomainRecord]
    _check: Callable[[DomainRecord, Action], bool]
    _launch: Callable[..., None]

    # ---- save and restore ------------------------------------------------------------------

    @handles(SaveDomain)
    def save(self, cmd: SaveDomain, ctx: Context) -> SavedState:
        domain_id = cmd.domain_id
        with self._lock(domain_id):
            record = self._record(domain_id)
            self._check(record, Action.SAVE)
            with _state_errors(), self.states.writing(cmd.state) as directory:
                with self.causes.expecting(domain_id, ctx.cause, {K.STOPPED}):
                    saved = _driver(lambda: self.driver.save(domain_id, directory))
                manifest = make_manifest(domain_id, True, saved.power, [], saved.pause_ms)
                write_manifest(directory, manifest)
            if cmd.managed:
                self.store.set_managed_save(domain_id, cmd.state)
            return self._saved(cmd.state, manifest)

    @handles(RestoreDomain)
    def restore(self, cmd: RestoreDomain, ctx: Context) -> DomainInfo:
        domain_id = cmd.domain_id
        with self._lock(domain_id):
            record = self._record(domain_id)
            self._check(record, Action.RESTORE)
            directory, manifest = self._existing(cmd.state, domain_id)
            if not manifest.memory:
                raise ServiceError(
                    "invalid",
                    f"state {cmd.state.state_id} holds disks only: revert to it instead",
                    {"field": "state"},
                )
            self._restore(
                record, directory, manifest, True if cmd.paused else None, "restored", ctx.cause
            )
            if record.managed_save is not None:
                # The machine now runs from another state: the managed one is stale.
                self._drop_managed_save(record.id, record.managed_save)
            if cmd.consume:
                # The running machine maps its memory file copy-on-write: unlinking it is
                # safe (the mapping keeps the pages), rewriting it would not be.
                with _state_errors():
                    self.states.delete(cmd.state)
        return self.info(domain_id)

    def _drop_managed_save(self, domain_id: uuid.UUID, ref: StateRef) -> None:
        self.store.set_managed_save(domain_id, None)
        with _state_errors():
            self.states.delete(ref)

    def start_from_managed_save(
        self, record: DomainRecord, *, paused: bool, cause: Cause | None
    ) -> None:
        """StartDomain of a domain with a managed save (lock held, transition checked):
        restore it (STARTED/RESTORED), then delete it. A managed save that cannot be
        restored is refused as it is (`managedsave-remove` drops it to boot afresh)."""
        ref = record.managed_save
        assert ref is not None
        directory, manifest = self._existing(ref, record.id)
        self._restore(record, directory, manifest, True if paused else None, "restored", cause)
        self.store.set_managed_save(record.id, None)
        self.states.delete(ref)

    def _restore(  # noqa: PLR0917  (one private call path, every argument needed)
        self,
        record: DomainRecord,
        directory: Path,
        manifest: Manifest,
        paused: bool | None,
        detail: str,
        cause: Cause | None,
    ) -> None:
        def launch(files: BootFiles, nics: list[NicTap]) -> None:
            self.driver.restore(
                record.spec, files, directory, paused=paused, nics=nics, detail=detail
            )

        stays_paused = paused if paused is not None else manifest.power is PowerState.PAUSED
        self._launch(record, launch, cause, paused=stays_paused)

    # ---- managed save ------------------------------------------------------------------------

    @handles(RemoveManagedSave)
    def managedsave_remove(self, cmd: RemoveManagedSave, _ctx: Context) -> DomainInfo:
        with self._lock(cmd.domain_id):
            record = self._record(cmd.domain_id)
            self._check(record, Action.MANAGEDSAVE_REMOVE)
            if record.managed_save is not None:
                self._drop_managed_save(record.id, record.managed_save)
        return self.info(cmd.domain_id)

    # ---- snapshots -----------------------------------------------------------------------------

    @handles(CreateSnapshot)
    def snapshot_create(self, cmd: CreateSnapshot, _ctx: Context) -> SavedState:
        domain_id = cmd.domain_id
        with self._lock(domain_id):
            record = self._record(domain_id)
            self._check(record, Action.SNAPSHOT_CREATE)
            disks = list(record.bindings.disks)
            pools = self.storage.pools
            with _state_errors(), self.states.writing(cmd.state) as directory:
                copied: list[str] = []

                def during() -> None:
                    copied.extend(copy_disks(pools, disks, directory))

                if record.state in (PowerState.SHUTOFF, PowerState.NOSTATE):
                    during()
                    memory, power, pause_ms = False, PowerState.SHUTOFF, 0.0
                else:
                    machine = directory if cmd.memory else None
                    saved = _driver(lambda: self.driver.snapshot(domain_id, machine, during))
                    memory, power, pause_ms = saved.memory, saved.power, saved.pause_ms
                manifest = make_manifest(domain_id, memory, power, copied, pause_ms)
                write_manifest(directory, manifest)
            return self._saved(cmd.state, manifest)

    @handles(RevertSnapshot)
    def snapshot_revert(self, cmd: RevertSnapshot, ctx: Context) -> DomainInfo:
        """Disks first (the domain is shut off, nothing holds them), then the machine."""
        domain_id = cmd.domain_id
        with self._lock(domain_id):
            record = self._record(domain_id)
            self._check(record, Action.SNAPSHOT_REVERT)
            directory, manifest = self._existing(cmd.state, domain_id)
            with _state_errors():
                revert_disks(
                    self.storage.pools, list(record.bindings.disks), directory, manifest.disks
                )
            if record.managed_save is not None:
                # Taken over disks that are no longer there: it can never be restored.
                self._drop_managed_save(domain_id, record.managed_save)
                record = self._record(domain_id)
            start = manifest.memory if cmd.start is None else cmd.start
            if start and manifest.memory:
                self._restore(record, directory, manifest, None, "from_snapshot", ctx.cause)
            elif start:
                spec = record.spec

                def boot(files: BootFiles, nics: list[NicTap]) -> None:
                    self.driver.spawn(spec, files, nics=nics)

                self._launch(record, boot, ctx.cause, paused=False)
        return self.info(domain_id)

    @handles(DeleteState)
    def state_delete(self, cmd: DeleteState, _ctx: Context) -> None:
        """Delete a state of this domain (a no-op if absent). The domain need not exist any
        more (its states are cleaned up after it), but a state that says it is another
        domain's is refused."""
        with self._lock(cmd.domain_id):
            try:
                self.states.existing(cmd.state, cmd.domain_id)
            except ForeignState as exc:
                raise ServiceError("invalid", exc.message, {"field": "state"}) from None
            except StateError:
                pass  # absent or unreadable: deleted all the same
            record = self.store.get(cmd.domain_id)
            if record is not None and record.managed_save == cmd.state:
                self.store.set_managed_save(cmd.domain_id, None)
            with _state_errors():
                self.states.delete(cmd.state)

    # ---- helpers ---------------------------------------------------------------------------

    def _existing(self, ref: StateRef, domain_id: uuid.UUID) -> tuple[Path, Manifest]:
        with _state_errors():
            return self.states.existing(ref, domain_id)

    def _saved(self, ref: StateRef, manifest: Manifest) -> SavedState:
        with _state_errors():
            size = allocated_bytes(self.states.path(ref))
        return SavedState(
            domain_id=manifest.domain_id,
            state=ref,
            memory=manifest.memory,
            disks=manifest.disks,
            power=manifest.power,
            bytes=size,
            taken_at=manifest.taken_at,
            pause_ms=manifest.pause_ms,
            domain=self.info(manifest.domain_id),
        )


T = TypeVar("T")


def _driver(call: Callable[[], T]) -> T:
    try:
        return call()
    except DriverError as exc:
        raise ServiceError(exc.code, exc.message) from None


@contextmanager
def _state_errors() -> Iterator[None]:
    """StateError and the storage layer's errors as the ServiceError the caller gets."""
    try:
        yield
    except StateError as exc:
        raise ServiceError(exc.code, exc.message, {"field": exc.field}) from None
    except StorageError as exc:
        raise ServiceError(exc.code, exc.message) from None

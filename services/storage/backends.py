"""Where a pool's file work runs: the storage agent of its host (`storage.<host>`, RPC) or,
for a `shared` pool the service serves itself, the file layer in this process.

Both answer the same way: sizes in bytes, refusals as `ServiceError`s with the agent's codes
(`invalid`, `not_found`, `conflict` with `details.reason`, `no_space`), and `Unreachable`
when the outcome is unknown (the host did not answer: the work may or may not have run).
Calls carry a `key`, the message id the agent records its reply under, so a command the
service runs again (a redelivery) gets the first answer instead of a second execution.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from compute_node.storage import ImageStore, Pool, StorageError, VolumeStore
from compute_node.storage_agent import CONFLICT_REASONS, ERROR_CODES, import_file, open_transfer
from compute_node.storage_transfer import TransferServer
from protos import routing
from protos.base import Message
from protos.commands import Command
from protos.images import (
    CreateVolumeFromImage,
    DeleteImageFile,
    GetImageFile,
    GetTransferResult,
    ImageFile,
    ImageFiles,
    ImportImageFile,
    ListImageFiles,
    OpenTransfer,
    PushVolume,
    TransferResult,
    TransferTicket,
)
from protos.storage import (
    CloneVolume,
    CreateVolume,
    DeleteVolume,
    GetVolumeInfo,
    ListPools,
    PoolCapabilities,
    PoolInfo,
    PoolList,
    ResizeVolume,
    VolumeInfo,
    WipeVolume,
)
from services.bus import Bus, BusError, RemoteError, ServiceError


class Unreachable(ServiceError):
    """The pool's host did not answer in time: the operation's outcome is unknown."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


class PoolBackend(Protocol):
    def create(self, pool: str, volume_id: uuid.UUID, size: int, key: str | None) -> int: ...

    def clone(
        self, pool: str, volume_id: uuid.UUID, source_id: uuid.UUID, key: str | None
    ) -> int: ...

    def resize(self, pool: str, volume_id: uuid.UUID, size: int, key: str | None) -> int: ...

    def wipe(self, pool: str, volume_id: uuid.UUID, key: str | None) -> None: ...

    def delete(self, pool: str, volume_id: uuid.UUID, key: str | None) -> None: ...

    def size(self, pool: str, volume_id: uuid.UUID) -> int | None:
        """The volume's size, None if its file does not exist."""
        ...

    def open_transfer(self, cmd: OpenTransfer) -> TransferTicket: ...

    def transfer_result(self, ticket: str) -> TransferResult: ...

    def import_file(self, cmd: ImportImageFile) -> TransferResult: ...

    def image_size(self, pool: str, sha256: str) -> int | None:
        """The image file's size, None if it does not exist."""
        ...

    def image_files(self, pool: str) -> list[str]: ...

    def delete_image(self, pool: str, sha256: str) -> None: ...

    def from_image(
        self, pool: str, volume_id: uuid.UUID, sha256: str, size: int | None, key: str | None
    ) -> int: ...


class AgentBackend:
    """The pools of `host`, worked on by its storage agent."""

    def __init__(self, bus: Bus, host: str, timeout_s: float, long_timeout_s: float) -> None:
        self.bus = bus
        self.host = host
        self.queue = routing.storage_queue(host)
        self.timeout_s = timeout_s
        self.long_timeout_s = long_timeout_s  # clones and wipes: copies that may take minutes

    def _call(self, command: Command, key: str | None, *, long: bool = False) -> Message:
        timeout = self.long_timeout_s if long else self.timeout_s
        try:
            return self.bus.call(self.queue, command, timeout=timeout, message_id=key)
        except RemoteError as exc:
            raise ServiceError(exc.code, exc.message, exc.details) from None
        except BusError as exc:
            raise Unreachable(f"host {self.host}'s storage agent did not answer: {exc}") from None

    def create(self, pool: str, volume_id: uuid.UUID, size: int, key: str | None) -> int:
        cmd = CreateVolume(pool=pool, volume_id=volume_id, size=size, announce=False)
        return _size(self._call(cmd, key))

    def clone(self, pool: str, volume_id: uuid.UUID, source_id: uuid.UUID, key: str | None) -> int:
        cmd = CloneVolume(pool=pool, volume_id=volume_id, source_id=source_id, announce=False)
        return _size(self._call(cmd, key, long=True))

    def resize(self, pool: str, volume_id: uuid.UUID, size: int, key: str | None) -> int:
        cmd = ResizeVolume(pool=pool, volume_id=volume_id, size=size, announce=False)
        return _size(self._call(cmd, key))

    def wipe(self, pool: str, volume_id: uuid.UUID, key: str | None) -> None:
        self._call(WipeVolume(pool=pool, volume_id=volume_id), key, long=True)

    def delete(self, pool: str, volume_id: uuid.UUID, key: str | None) -> None:
        # Long: the agent runs it after any operation still holding the volume's lock.
        cmd = DeleteVolume(pool=pool, volume_id=volume_id, announce=False)
        self._call(cmd, key, long=True)

    def size(self, pool: str, volume_id: uuid.UUID) -> int | None:
        try:
            return _size(self._call(GetVolumeInfo(pool=pool, volume_id=volume_id), None))
        except ServiceError as exc:
            if exc.code == "not_found" and not isinstance(exc, Unreachable):
                return None
            raise

    def open_transfer(self, cmd: OpenTransfer) -> TransferTicket:
        reply = self._call(cmd, None)
        assert isinstance(reply, TransferTicket)
        return reply

    def push(self, cmd: PushVolume) -> TransferResult:
        """This host's agent streams a volume to another host's ticket (a move)."""
        reply = self._call(cmd, None, long=True)
        assert isinstance(reply, TransferResult)
        return reply

    def transfer_result(self, ticket: str) -> TransferResult:
        reply = self._call(GetTransferResult(ticket=ticket), None)
        assert isinstance(reply, TransferResult)
        return reply

    def import_file(self, cmd: ImportImageFile) -> TransferResult:
        reply = self._call(cmd, None, long=True)
        assert isinstance(reply, TransferResult)
        return reply

    def image_size(self, pool: str, sha256: str) -> int | None:
        try:
            reply = self._call(GetImageFile(pool=pool, sha256=sha256), None)
        except ServiceError as exc:
            if exc.code == "not_found" and not isinstance(exc, Unreachable):
                return None
            raise
        assert isinstance(reply, ImageFile)
        return reply.size

    def image_files(self, pool: str) -> list[str]:
        reply = self._call(ListImageFiles(pool=pool), None)
        assert isinstance(reply, ImageFiles)
        return [i.sha256 for i in reply.images]

    def delete_image(self, pool: str, sha256: str) -> None:
        self._call(DeleteImageFile(pool=pool, sha256=sha256), None)

    def from_image(
        self, pool: str, volume_id: uuid.UUID, sha256: str, size: int | None, key: str | None
    ) -> int:
        cmd = CreateVolumeFromImage(pool=pool, volume_id=volume_id, sha256=sha256, size=size)
        return _size(self._call(cmd, key, long=True))

    def pools(self) -> list[PoolInfo]:
        reply = self._call(ListPools(), None)
        assert isinstance(reply, PoolList)
        return reply.pools


class LocalBackend:
    """`shared` pools this service works on itself (a directory every replica mounts)."""

    def __init__(self, pools: dict[str, Path], transfers: TransferServer | None = None) -> None:
        self.transfers = transfers
        self.pools: dict[str, Pool] = {}
        for name, path in pools.items():
            try:
                self.pools[name] = Pool(path, "shared")
            except StorageError as exc:
                raise ValueError(f"pool {name}: {exc.message}") from None

    def reconcile(self) -> dict[str, list[str]]:
        """Remove what operations killed mid-way left (temp files nobody holds)."""
        return {name: pool.reconcile() for name, pool in self.pools.items()}

    def _volumes(self, pool: str) -> VolumeStore:
        found = self.pools.get(pool)
        if found is None:
            raise ServiceError("not_found", f"no shared pool {pool!r} served here")
        return VolumeStore(found)

    def create(self, pool: str, volume_id: uuid.UUID, size: int, _key: str | None) -> int:
        with _refusals():
            return self._volumes(pool).create(str(volume_id), size).size

    def clone(self, pool: str, volume_id: uuid.UUID, source_id: uuid.UUID, _key: str | None) -> int:
        with _refusals():
            return self._volumes(pool).clone(str(source_id), str(volume_id)).volume.size

    def resize(self, pool: str, volume_id: uuid.UUID, size: int, _key: str | None) -> int:
        with _refusals():
            return self._volumes(pool).grow(str(volume_id), size).size

    def wipe(self, pool: str, volume_id: uuid.UUID, _key: str | None) -> None:
        with _refusals():
            self._volumes(pool).wipe(str(volume_id))

    def delete(self, pool: str, volume_id: uuid.UUID, _key: str | None) -> None:
        with _refusals():
            self._volumes(pool).delete(str(volume_id))

    def size(self, pool: str, volume_id: uuid.UUID) -> int | None:
        try:
            with _refusals():
                return self._volumes(pool).info(str(volume_id)).size
        except ServiceError as exc:
            if exc.code == "not_found":
                return None
            raise

    def _pool(self, pool: str) -> Pool:
        found = self.pools.get(pool)
        if found is None:
            raise ServiceError("not_found", f"no shared pool {pool!r} served here")
        return found

    def open_transfer(self, cmd: OpenTransfer) -> TransferTicket:
        return open_transfer(self.transfers, self._pool(cmd.pool), cmd, "storage service")

    def transfer_result(self, ticket: str) -> TransferResult:
        if self.transfers is None:
            return TransferResult(state="unknown")
        return self.transfers.result(ticket)

    def import_file(self, cmd: ImportImageFile) -> TransferResult:
        return import_file(self._pool(cmd.pool), cmd)

    def image_size(self, pool: str, sha256: str) -> int | None:
        try:
            with _refusals():
                return ImageStore(self._pool(pool)).path(sha256).lstat().st_size
        except ServiceError as exc:
            if exc.code == "not_found":
                return None
            raise

    def image_files(self, pool: str) -> list[str]:
        with _refusals():
            return [i.sha256 for i in ImageStore(self._pool(pool)).list()]

    def delete_image(self, pool: str, sha256: str) -> None:
        try:
            with _refusals():
                ImageStore(self._pool(pool)).delete(sha256)
        except ServiceError as exc:
            if exc.code != "not_found":
                raise

    def from_image(
        self, pool: str, volume_id: uuid.UUID, sha256: str, size: int | None, _key: str | None
    ) -> int:
        with _refusals():
            made = self._volumes(pool).create_from_image(str(volume_id), sha256, size)
            return made.volume.size

    def pool_infos(self) -> list[PoolInfo]:
        infos = []
        for name, pool in sorted(self.pools.items()):
            usage = pool.usage()
            infos.append(
                PoolInfo(
                    name=name,
                    kind="shared",
                    host="",
                    capacity=usage.capacity,
                    allocation=usage.allocation,
                    available=usage.available,
                    capabilities=PoolCapabilities(
                        reflink=pool.capabilities.reflink,
                        punch_hole=pool.capabilities.punch_hole,
                    ),
                )
            )
        return infos


def _size(reply: Message) -> int:
    assert isinstance(reply, VolumeInfo), reply
    return reply.size


@contextmanager
def _refusals() -> Iterator[None]:
    """A file-layer refusal as the error the agent would have answered."""
    try:
        yield
    except StorageError as exc:
        code = ERROR_CODES.get(exc.code, "internal")
        details = {"reason": CONFLICT_REASONS[exc.code]} if exc.code in CONFLICT_REASONS else {}
        raise ServiceError(code, exc.message, details) from None

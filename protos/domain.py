"""The domain (guest) model: its spec, power and task states, lifecycle policies.

Names follow libvirt: a *domain* is a guest; `on_poweroff`/`on_reboot`/`on_crash` say what the
compute node does when the guest powers off, reboots or crashes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import StrEnum
from ipaddress import IPv4Address
from typing import Annotated, Any, Self
from uuid import UUID, uuid4

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
MAC_PATTERN = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
MAX_VCPUS = 64
MAX_MEMORY_MIB = 1024 * 1024
MAX_CMDLINE = 2048
# The native runtime's virtio-blk slots (FL_MAX_DISKS in native/include/flotilla.h): a
# machine has 8 virtio-mmio slots on IOAPIC pins 16-23, 4 for disks and 4 for NICs.
MAX_DISKS = 4
MAX_DISK_GIB = 65536  # 64 TiB, the largest volume
# Metadata: at most 64 pairs, keys of 1..255 and values of up to 4096 characters, and at most
# 64 KiB (UTF-8) of keys and values together.
MAX_METADATA_ITEMS = 64
MAX_METADATA_KEY = 255
MAX_METADATA_VALUE = 4096
MAX_METADATA_BYTES = 64 * 1024


def _not_bool_or_text(value: Any) -> Any:
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"must be an integer, not {type(value).__name__}")  # noqa: TRY004
    return value


# An integer as JSON Schema means it: 2 or 2.0, never "2" or false (pydantic's lax mode takes
# those, its strict mode refuses the 2.0 the schema allows). Booleans are StrictBool.
NOT_BOOL_OR_TEXT = BeforeValidator(_not_bool_or_text)
Integer = Annotated[int, NOT_BOOL_OR_TEXT]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_METADATA_KEY)]
MetadataValue = Annotated[str, StringConstraints(max_length=MAX_METADATA_VALUE)]


class PowerState(StrEnum):
    """What the compute node sees (libvirt's virDomainState)."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # being shut down
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"


ACTIVE_STATES = frozenset(
    {
        PowerState.RUNNING,
        PowerState.BLOCKED,
        PowerState.PAUSED,
        PowerState.SHUTDOWN,
        PowerState.CRASHED,
        PowerState.PMSUSPENDED,
    }
)


class TaskState(StrEnum):
    """What the control plane is doing to the domain; `none` when idle."""

    NONE = "none"
    SCHEDULING = "scheduling"
    BUILDING = "building"
    MIGRATING = "migrating"
    DELETING = "deleting"
    ERROR = "error"


class LifecycleAction(StrEnum):
    """libvirt's on_poweroff / on_reboot / on_crash values that Flotilla supports."""

    DESTROY = "destroy"
    RESTART = "restart"
    PRESERVE = "preserve"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _one_of(*variants: dict[str, Any]) -> ConfigDict:
    """A spec whose validator takes exactly one of several sources says so in its JSON Schema
    too, so a client (or a fuzzer) generating from the schema makes only what is accepted."""
    return ConfigDict(extra="forbid", frozen=True, json_schema_extra={"oneOf": list(variants)})


def _source(given: str, *absent: str) -> dict[str, Any]:
    return {
        "required": [given],
        "properties": {given: {"type": "string"}, **{a: {"type": "null"} for a in absent}},
    }


class BootSpec(_Spec):
    """Direct kernel boot from host paths (`kernel`, optional `initrd`, `cmdline`) or from
    images by name (a `kernel` image `image`, optional `initrd` image `initrd_image`)."""

    model_config = _one_of(
        _source("kernel", "image", "initrd_image"), _source("image", "kernel", "initrd")
    )

    kernel: str | None = Field(default=None, min_length=1, max_length=4096)
    initrd: str | None = Field(default=None, min_length=1, max_length=4096)
    cmdline: str = Field(default="", max_length=MAX_CMDLINE)
    image: str | None = Field(default=None, min_length=1, max_length=255)
    initrd_image: str | None = Field(default=None, min_length=1, max_length=255)

    @field_validator("initrd_image")
    @classmethod
    def _initrd_image_with_image(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A field's own check, so the refusal names `boot.initrd_image`.
        if value is not None and (info.data.get("image") is None or info.data.get("initrd")):
            raise ValueError("'initrd_image' goes with 'image' (a kernel image), not with paths")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.kernel is None) == (self.image is None):
            raise ValueError("give exactly one of 'kernel' or 'image'")
        if self.initrd is not None and self.kernel is None:
            raise ValueError("'initrd' needs 'kernel'")
        return self


class DiskSpec(_Spec):
    """A virtio-blk disk backed by a host path, a storage volume, or a new volume cloned
    from image `image` at create (grown to `size_gib`; deleted with the domain unless
    `keep`)."""

    model_config = _one_of(
        _source("path", "volume_id", "image"),
        _source("volume_id", "path", "image"),
        _source("image", "path", "volume_id"),
    )

    target: str = Field(pattern=r"^vd[a-z]$")
    path: str | None = Field(default=None, min_length=1, max_length=4096)
    volume_id: UUID | None = None
    readonly: StrictBool = False
    image: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=r"^[A-Za-z0-9](\.?[A-Za-z0-9_-])*\.?$"
    )
    size_gib: int | None = Field(default=None, ge=1, le=MAX_DISK_GIB)
    keep: StrictBool = False

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if sum(x is not None for x in (self.path, self.volume_id, self.image)) != 1:
            raise ValueError("give exactly one of 'path', 'volume_id' or 'image'")
        if self.image is None and (self.size_gib is not None or self.keep):
            raise ValueError("'size_gib' and 'keep' go with 'image'")
        return self


class NicSpec(_Spec):
    """A virtio-net interface on a Flotilla network."""

    network: str = Field(pattern=NAME_PATTERN)
    # Unicast (first octet even), any case; the validator below normalises it to lower case.
    mac: str | None = Field(
        default=None, max_length=17, pattern=r"^[0-9A-Fa-f][02468AaCcEe](:[0-9A-Fa-f]{2}){5}$"
    )

    # A fixed address in the network's subnet; None: the network service allocates one.
    ip: IPv4Address | None = None

    @field_validator("mac", mode="before")
    @classmethod
    def _mac(cls, value: Any) -> Any:
        # Before the pattern, to say what is wrong in words.
        if not isinstance(value, str):
            return value
        value = value.lower()
        if not MAC_PATTERN.match(value):
            raise ValueError("mac must look like 52:54:00:12:34:56")
        if int(value[:2], 16) & 1:
            raise ValueError("mac must be unicast (first octet even)")
        return value


class SerialSpec(_Spec):
    """The serial console: kept in a ring buffer of `ring_kib` and, if `log`, a log file."""

    log: StrictBool = True
    ring_kib: Integer = Field(default=64, ge=4, le=4096)


class PlacementPolicy(StrEnum):
    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti-affinity"


class PlacementHints(_Spec):
    """Hints for the scheduler: a server group with a policy, or a forced host."""

    group: str | None = Field(default=None, pattern=NAME_PATTERN)
    policy: PlacementPolicy = PlacementPolicy.ANTI_AFFINITY
    host: str | None = Field(default=None, pattern=NAME_PATTERN)


class DomainSpec(_Spec):
    """Everything needed to define a domain (libvirt's domain XML, reduced to what we run)."""

    name: str = Field(pattern=NAME_PATTERN)
    uuid: UUID = Field(default_factory=uuid4)
    # Integer: JSON `false` or `"2"` is a client's mistake, not 0 or 2.
    vcpus: Integer = Field(default=1, ge=1, le=MAX_VCPUS)
    memory_mib: Integer = Field(default=64, ge=4, le=MAX_MEMORY_MIB)
    boot: BootSpec
    disks: Annotated[list[DiskSpec], Field(max_length=MAX_DISKS)] = []
    nics: Annotated[list[NicSpec], Field(max_length=8)] = []
    serial: SerialSpec = SerialSpec()
    on_poweroff: LifecycleAction = LifecycleAction.DESTROY
    on_reboot: LifecycleAction = LifecycleAction.RESTART
    on_crash: LifecycleAction = LifecycleAction.DESTROY
    autostart: StrictBool = False
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_ITEMS)] = {}
    placement: PlacementHints = PlacementHints()

    @model_validator(mode="after")
    def _unique_devices(self) -> Self:
        targets = [d.target for d in self.disks]
        if len(targets) != len(set(targets)):
            raise ValueError("disk targets must be unique")
        macs = [n.mac for n in self.nics if n.mac is not None]
        if len(macs) != len(set(macs)):
            raise ValueError("nic MAC addresses must be unique")
        return self

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str]) -> dict[str, str]:
        size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"{size} bytes of keys and values; the limit is {MAX_METADATA_BYTES}")
        return value


class Fault(_Spec):
    """Why a domain is in `error`: a machine-readable code and a sentence for a human."""

    code: str
    message: str
    host: str | None = None


def host_paths(spec: DomainSpec) -> Iterator[tuple[str, str]]:
    """Every host path `spec` names, with its dotted field name (`boot.kernel`,
    `disks.0.path`)."""
    if spec.boot.kernel is not None:
        yield "boot.kernel", spec.boot.kernel
    if spec.boot.initrd is not None:
        yield "boot.initrd", spec.boot.initrd
    for i, disk in enumerate(spec.disks):
        if disk.path is not None:
            yield f"disks.{i}.path", disk.path


def spec_problems(spec: DomainSpec) -> list[tuple[str, str]]:
    """What is wrong with `spec` whatever the host: (field, reason) pairs. The API answers
    them with 422 before storing anything; compute nodes check them again."""
    problems = [
        (name, "must be an absolute path")
        for name, path in host_paths(spec)
        if not path.startswith("/")
    ]
    texts = [*host_paths(spec), ("boot.cmdline", spec.boot.cmdline)]
    problems += [(name, "must not contain a NUL byte") for name, text in texts if "\0" in text]
    return sorted(problems)

"""Flotilla's native VMM: a C runtime on /dev/kvm (built as `native._vmm`) and its wrapper."""

from native.machine import (
    ConfigError,
    Counters,
    DeviceCounters,
    Event,
    EventKind,
    GuestMemoryError,
    ImageInfo,
    ImageKind,
    KvmUnavailableError,
    Machine,
    MachineState,
    MachineStateError,
    ShutdownMethod,
    VmmError,
    kvm_unavailable_reason,
    parse_image,
)

__all__ = [
    "ConfigError",
    "Counters",
    "DeviceCounters",
    "Event",
    "EventKind",
    "GuestMemoryError",
    "ImageInfo",
    "ImageKind",
    "KvmUnavailableError",
    "Machine",
    "MachineState",
    "MachineStateError",
    "ShutdownMethod",
    "VmmError",
    "kvm_unavailable_reason",
    "parse_image",
]

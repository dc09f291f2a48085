"""What this host is: CPUs, memory, and which kind of KVM it offers."""

from __future__ import annotations

import os
from pathlib import Path

from protos.host import KvmKind, Resources


def kvm_kind() -> KvmKind:
    """`hardware` with vmx/svm, `pvm` where /dev/kvm works without them, else `none`."""
    try:
        import native  # noqa: PLC0415  (needs the built extension; absent on API-only hosts)

        if native.kvm_unavailable_reason() is not None:
            return KvmKind.NONE
    except ImportError:
        return KvmKind.NONE
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if " vmx" in flags or " svm" in flags:
        return KvmKind.HARDWARE
    return KvmKind.PVM


def physical_resources() -> Resources:
    vcpus = os.cpu_count() or 1
    memory_mib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_mib = int(line.split()[1]) // 1024
                break
    except OSError:
        pass
    return Resources(vcpus=vcpus, memory_mib=memory_mib)

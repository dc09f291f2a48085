"""The hwvirt tier's own checks: where these run, /dev/kvm is hardware-virt KVM.

They run in the nested L1 on hosts without vmx/svm (tests/hwvirt/, docs/testing.md) and
directly on hosts with them.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

import native
from tests.hwvirt.l1 import host_has_hardware_virtualization, inside_l1

pytestmark = pytest.mark.hwvirt

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_IRQCHIP = 0
KVM_CAP_NESTED_STATE = 157


def test_dev_kvm_is_hardware_virtualization_kvm() -> None:
    assert host_has_hardware_virtualization(), "no vmx/svm in /proc/cpuinfo"
    modules = {p.name for p in Path("/sys/module").iterdir()}
    assert modules & {"kvm_amd", "kvm_intel"}, f"no kvm_amd/kvm_intel in {sorted(modules)}"
    assert "kvm_pvm" not in modules
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
        assert fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_IRQCHIP) > 0
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm)
    finally:
        os.close(fd)
    assert native.kvm_unavailable_reason() is None


def test_l1_temp_dir_is_its_own_memory() -> None:
    if not inside_l1():
        pytest.skip("runs directly on a host with vmx/svm: there is no L1 here")
    tmp = os.environ["TMPDIR"]
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    assert [m[2] for m in mounts if m[1] == tmp] == ["tmpfs"], mounts
    # The host's root is the L1's root, over virtiofs.
    assert [m[2] for m in mounts if m[1] == "/"] == ["virtiofs"], mounts

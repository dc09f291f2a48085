"""The VMM against a hand-made guest of a few instructions (no toolchain needed)."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import native
from native import EventKind, MachineState
from tests.kvm.harness import Booted
from tests.kvm.tinyguest import build_pvh_elf, code_print_and_exit, write_tiny_guest

SPIN = b"\x66\xba\xf8\x03\xb0\x2e\xee\xeb\xfe"  # print "." then jmp $


def test_tiny_guest_prints_and_exits_through_debug_exit(
    tmp_path: Path, boot: Callable[..., Booted]
) -> None:
    guest = boot(write_tiny_guest(tmp_path / "g.elf", b"hello\n", 0x21))
    event = guest.machine.wait_event(10)
    assert event is not None
    assert event.kind is EventKind.POWEROFF
    assert event.reason == "debug_exit"
    assert event.code == (0x21 << 1) | 1
    guest.console.wait_for("hello")
    assert guest.machine.state() == MachineState.STOPPED
    counters = guest.machine.counters()
    assert counters.devices["serial"].bytes_out == 6
    assert counters.devices["debug_exit"].writes == 1
    assert counters.exits["io"] >= 7


def test_pause_resume_stop_of_a_spinning_guest(tmp_path: Path, boot: Callable[..., Booted]) -> None:
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(build_pvh_elf(SPIN))
    guest = boot(kernel)
    guest.console.wait_for(r"\.")
    m = guest.machine
    assert m.state() == MachineState.RUNNING
    m.pause()
    assert m.state() == MachineState.PAUSED
    with pytest.raises(native.MachineStateError):
        m.pause()
    m.resume()
    assert m.state() == MachineState.RUNNING
    m.stop()
    assert m.state() == MachineState.STOPPED
    with pytest.raises(native.MachineStateError):
        m.resume()
    m.stop()  # idempotent
    assert m.wait_event(0.05) is None


def test_lifecycle_errors_and_close(tmp_path: Path, boot: Callable[..., Booted]) -> None:
    guest = boot(write_tiny_guest(tmp_path / "g.elf"), start=False)
    m = guest.machine
    assert m.state() == MachineState.CONFIGURED
    with pytest.raises(native.MachineStateError, match="not started"):
        m.pause()
    m.start()
    with pytest.raises(native.MachineStateError):
        m.start()
    assert m.wait_event(10) is not None
    m.close()
    m.close()
    with pytest.raises(native.MachineStateError, match="closed"):
        m.start()


def test_read_memory_sees_the_loaded_kernel_and_is_bounds_checked(
    tmp_path: Path, boot: Callable[..., Booted]
) -> None:
    code = code_print_and_exit(b"x", 0)
    kernel = tmp_path / "g.elf"
    kernel.write_bytes(build_pvh_elf(code))
    guest = boot(kernel, memory_mib=16, start=False)
    m = guest.machine
    assert m.read_memory(0x100000, len(code)) == code
    # The RSDP is where docs/machine.md says, findable by the legacy scan.
    assert m.read_memory(0xE0000, 8) == b"RSD PTR "
    # hvm_start_info: magic, version 1, the command line pointer.
    assert m.read_memory(0x6000, 4) == (0x336EC578).to_bytes(4, "little")
    with pytest.raises(native.GuestMemoryError):
        m.read_memory(16 << 20, 1)
    with pytest.raises(native.GuestMemoryError):
        m.read_memory((16 << 20) - 4, 8)
    with pytest.raises(native.GuestMemoryError):
        m.read_memory(2**64 - 1, 2)


def test_a_guest_that_never_exits_is_stopped_by_close(
    tmp_path: Path, boot: Callable[..., Booted]
) -> None:
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(build_pvh_elf(SPIN))
    guest = boot(kernel, vcpus=2)
    guest.console.wait_for(r"\.")
    t0 = time.monotonic()
    guest.machine.close()
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"memory_mib": 0}, "memory"),
        ({"memory_mib": 1 << 30}, "memory"),
        ({"vcpus": 0}, "vCPU"),
        ({"vcpus": 100000}, "vCPU"),
        ({"cmdline": "x" * 5000}, "command line"),
    ],
)
def test_bad_arguments_raise_config_errors(
    tmp_path: Path, kvm: None, kwargs: dict[str, object], match: str
) -> None:
    kernel = write_tiny_guest(tmp_path / "g.elf")
    with pytest.raises(native.ConfigError, match=match):
        native.Machine(kernel, **kwargs)  # type: ignore[arg-type]


def test_missing_and_garbage_kernels_raise_config_errors(tmp_path: Path, kvm: None) -> None:
    with pytest.raises(native.ConfigError, match="not a file") as missing:
        native.Machine(tmp_path / "nope.elf")
    assert missing.value.errno == errno.ENOENT
    garbage = tmp_path / "garbage.elf"
    garbage.write_bytes(b"\x7fELF" + bytes(range(256)) * 4)
    with pytest.raises(native.ConfigError, match="ELF"):
        native.Machine(garbage)
    text = tmp_path / "text"
    text.write_text("hello")
    with pytest.raises(native.ConfigError, match="not a kernel image"):
        native.Machine(text)
    big = tmp_path / "big.elf"
    big.write_bytes(build_pvh_elf(b"\x90" * (5 << 20)))
    with pytest.raises(native.ConfigError, match="needs RAM"):
        native.Machine(big, memory_mib=4)


def test_fault_without_an_idt_is_a_triple_fault(
    tmp_path: Path, boot: Callable[..., Booted]
) -> None:
    kernel = tmp_path / "ud2.elf"
    kernel.write_bytes(build_pvh_elf(b"\x0f\x0b"))  # ud2 with IDT limit 0
    event = boot(kernel).machine.wait_event(10)
    assert event is not None
    assert (event.kind, event.reason) == (EventKind.REBOOT, "triple_fault")


def test_unrunnable_guest_code_is_an_internal_error(
    tmp_path: Path, boot: Callable[..., Booted]
) -> None:
    # Ring-0 fwait: PVM's instruction emulator cannot run it; hardware virtualization can.
    kernel = tmp_path / "fwait.elf"
    kernel.write_bytes(build_pvh_elf(b"\x9b" + code_print_and_exit(b"", 1)))
    guest = boot(kernel)
    event = guest.machine.wait_event(10)
    assert event is not None
    if event.kind is EventKind.INTERNAL_ERROR:
        assert event.reason == "emulation_failure"
        assert event.code == 17  # KVM_EXIT_INTERNAL_ERROR
        assert guest.machine.state() == MachineState.STOPPED
    else:
        assert (event.kind, event.reason) == (EventKind.POWEROFF, "debug_exit")


def test_memfd_backed_guest_memory(tmp_path: Path, kvm: None) -> None:
    code = code_print_and_exit(b"m", 0)
    kernel = tmp_path / "g.elf"
    kernel.write_bytes(build_pvh_elf(code))
    with native.Machine(kernel, memory_mib=8, memfd=True) as m:
        assert m.read_memory(0x100000, len(code)) == code
        m.start()
        event = m.wait_event(10)
        assert event is not None
        assert event.kind is EventKind.POWEROFF

"""The I/O bus (native/bus.c) on its own, compiled with a tiny harness: no KVM needed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[2] / "native"

# A device whose handler raises a machine event, like isa-debug-exit: at that moment another
# thread can already see the event (the eventfd), so the access must already be counted.
HARNESS = r"""
#include <stdio.h>
#include "devices.h"

static struct fl_counters counters;
static struct fl_bus bus = {.counters = &counters};
static unsigned long long seen_writes = 99, seen_bytes = 99, seen_reads = 99;

static void dev(void *d, uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	(void)d; (void)offset; (void)data; (void)size;
	struct fl_device_counters *c = &counters.devices[0];
	if (is_write) {
		seen_writes = __atomic_load_n(&c->writes, __ATOMIC_ACQUIRE);
		seen_bytes = __atomic_load_n(&c->bytes_out, __ATOMIC_ACQUIRE);
	} else {
		seen_reads = __atomic_load_n(&c->reads, __ATOMIC_ACQUIRE);
	}
}

int main(void)
{
	uint8_t data[4] = {0x21, 0, 0, 0};
	if (fl_bus_add(&bus, 0xf4, 4, "debug_exit", NULL, dev) != 0)
		return 2;
	if (fl_bus_dispatch(&bus, 0xf4, data, 4, 1) != 0)
		return 3;
	if (fl_bus_dispatch(&bus, 0xf4, data, 1, 0) != 0)
		return 4;
	printf("%llu %llu %llu\n", seen_writes, seen_bytes, seen_reads);
	return 0;
}
"""


def test_an_access_is_counted_before_the_device_acts_on_it(tmp_path: Path) -> None:
    """A device that raises an event (POWEROFF) from its handler makes the event observable
    at once; whoever then reads the counters must find the access that raised it."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("a C compiler is needed")
    src = tmp_path / "harness.c"
    src.write_text(HARNESS)
    exe = tmp_path / "harness"
    subprocess.run(
        [cc, "-std=gnu11", "-O2", f"-I{NATIVE}", str(src), str(NATIVE / "bus.c"), "-o", str(exe)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10)
    assert out.stdout.split() == ["1", "4", "1"]

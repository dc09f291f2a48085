/*
 * libFuzzer target for the IOAPIC (native/x86/ioapic.c) on the MMIO bus at 0xFEC00000: a
 * guest's sequence of IOREGSEL/IOWIN/EOI accesses of any width and offset, mixed with what
 * the rest of the machine does to it (device lines moving, local-APIC EOIs, irqfd routes
 * wanted, a save and restore). Every MSI it sends or routes is one a local APIC accepts
 * without harm (fixed or lowest priority with a vector of 16 or more, or an NMI), and only
 * level-triggered pins hold Remote IRR.
 *
 * Input: operations, each an opcode byte:
 *   0 read  offset(1) width(1)       1 write offset(1) width(1) value(4)
 *   2 line  pin(1, 24..31 are out of range) level(1)
 *   3 EOI   vector(1)                4 want route pin(1) on(1)
 *   5 save and restore
 */
#include <stdlib.h>
#include <string.h>

#include "../vmm.h"
#include "../x86/layout.h"
#include "input.h"

#define MAX_OPS 512

static void check_msi(const struct fl_msi *m)
{
	uint32_t dm = (m->data >> 8) & 7, vector = m->data & 0xff;

	if ((m->address & 0xfff00000u) != 0xfee00000u || (m->address & 0xffbu) ||
	    (m->data & ~0xc7ffu))
		__builtin_trap();
	if (dm != 4 && (dm > 1 || vector < 16))
		__builtin_trap();
}

static void deliver(void *ctx, const struct fl_msi *msi)
{
	(void)ctx;
	check_msi(msi);
}

static void routes(void *ctx, const struct fl_msi *msi, const uint8_t *present, uint32_t n)
{
	(void)ctx;
	if (n != FL_IOAPIC_PINS)
		__builtin_trap();
	for (uint32_t p = 0; p < n; p++)
		if (present[p])
			check_msi(&msi[p]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const uint32_t widths[4] = {1, 2, 4, 8};
	static struct fl_counters counters;
	static struct fl_bus bus;
	static struct fl_ioapic io;
	struct fz_input in = {data, size};
	struct fl_ioapic_state st;

	memset(&counters, 0, sizeof(counters));
	memset(&bus, 0, sizeof(bus));
	bus.counters = &counters;
	if (fl_ioapic_init(&io, 4, (struct fl_msi_sink){deliver, routes, NULL}) < 0 ||
	    fl_bus_add(&bus, FL_IOAPIC_GPA, 0x1000, "ioapic", &io, fl_ioapic_mmio) < 0)
		abort();

	for (int op = 0; op < MAX_OPS && in.n; op++) {
		uint8_t buf[8] = {0};
		uint64_t addr;
		uint32_t w, kind = (uint32_t)(fz_take(&in, 1) % 6), pin;

		switch (kind) {
		case 0:
		case 1:
			/* Mostly the registers, sometimes the window's far end. */
			addr = fz_take(&in, 1);
			addr = FL_IOAPIC_GPA + (addr < 0xf0 ? addr : 0x1000 - (0x100 - addr));
			w = widths[fz_take(&in, 1) & 3];
			if (kind == 1)
				fl_le_put(buf, 4, fz_take(&in, 4));
			fl_bus_dispatch(&bus, addr, buf, w, (int)kind);
			break;
		case 2:
			pin = (uint32_t)fz_take(&in, 1) & 31;
			fl_ioapic_set_level(&io, pin, (int)fz_take(&in, 1) & 1);
			break;
		case 3:
			fl_ioapic_eoi(&io, (uint8_t)fz_take(&in, 1));
			break;
		case 4:
			pin = (uint32_t)fz_take(&in, 1) & 31;
			if ((fl_ioapic_want_route(&io, pin, (int)fz_take(&in, 1) & 1) < 0) !=
			    (pin >= FL_IOAPIC_PINS))
				__builtin_trap();
			break;
		case 5:
			fl_ioapic_save(&io, &st);
			fl_ioapic_restore(&io, &st);
			if (memcmp(&st, &io.s, sizeof(st)) != 0)
				__builtin_trap(); /* a round trip changes nothing */
			break;
		}
		for (uint32_t p = 0; p < FL_IOAPIC_PINS; p++)
			if ((io.s.redir[p] & (1ULL << 14)) && !(io.s.redir[p] & (1ULL << 15)))
				__builtin_trap();
	}
	fl_ioapic_fini(&io);
	return 0;
}

/*
 * libFuzzer target for the small port devices on the port bus (native/bus.c), laid out as
 * the machine lays them out: the i8042 (native/i8042.c), the ACPI sleep registers
 * (native/x86/pm.c), pvpanic, isa-debug-exit, reset control and the absent PICs. Input is a guest's
 * sequence of port accesses (any width, some off by one around each range), mixed with
 * scancodes injected from the host and an i8042 save and restore. Machine events come only
 * from the writes that mean them, and the keyboard queue stays within bounds.
 *
 * Input: operations, each an opcode byte:
 *   0 read  device(1) delta(1) width(1)    1 write device(1) delta(1) width(1) value(8)
 *   2 inject scancodes: count(1) bytes       3 save and restore the i8042
 */
#include <stdlib.h>
#include <string.h>

#include "../vmm.h"
#include "input.h"

#define MAX_OPS 512

static const uint16_t bases[] = {
	FL_PORT_I8042_DATA, FL_PORT_I8042_CMD, FL_PORT_SLEEP_CONTROL, FL_PORT_PVPANIC,
	FL_PORT_DEBUG_EXIT, FL_PORT_PIC1,	FL_PORT_PIC2, FL_PORT_RESET_CONTROL,
};
#define NBASES (sizeof(bases) / sizeof(bases[0]))

static int line = -1;
static uint32_t events; /* raised during the current access */
static uint32_t last_kind;

static void set_level(void *ctx, uint32_t gsi, int level)
{
	(void)ctx;
	if (gsi != FL_IRQ_I8042 || level == line || (level != 0 && level != 1))
		__builtin_trap();
	line = level;
}

static void raise_event(void *ctx, uint32_t kind, int64_t code, uint64_t detail,
			const char *reason)
{
	(void)ctx, (void)code, (void)detail;
	if (!reason || !reason[0])
		__builtin_trap();
	events++;
	last_kind = kind;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const uint32_t widths[4] = {1, 2, 4, 8};
	static struct fl_counters counters;
	static struct fl_bus bus;
	static struct fl_i8042 kbd;
	static struct fl_pm pm;
	static struct fl_signal_dev pvpanic, debugexit, resetctl;
	struct fl_sink sink = {raise_event, NULL};
	struct fz_input in = {data, size};
	struct fl_i8042_state st;

	memset(&counters, 0, sizeof(counters));
	memset(&bus, 0, sizeof(bus));
	bus.counters = &counters;
	line = -1;
	pvpanic.sink = debugexit.sink = resetctl.sink = sink;
	fl_pm_init(&pm, sink);
	if (fl_i8042_init(&kbd, (struct fl_irq){set_level, NULL, FL_IRQ_I8042}, sink) < 0 ||
	    fl_bus_add(&bus, FL_PORT_I8042_DATA, 1, "i8042", &kbd, fl_i8042_data_io) < 0 ||
	    fl_bus_add(&bus, FL_PORT_I8042_CMD, 1, "i8042_cmd", &kbd, fl_i8042_cmd_io) < 0 ||
	    fl_bus_add(&bus, FL_PORT_SLEEP_CONTROL, 2, "acpi_sleep", &pm, fl_pm_io) < 0 ||
	    fl_bus_add(&bus, FL_PORT_PVPANIC, 1, "pvpanic", &pvpanic, fl_pvpanic_io) < 0 ||
	    fl_bus_add(&bus, FL_PORT_DEBUG_EXIT, 4, "debug_exit", &debugexit, fl_debugexit_io) < 0 ||
	    fl_bus_add(&bus, FL_PORT_RESET_CONTROL, 1, "reset_control", &resetctl,
		       fl_resetctl_io) < 0 ||
	    fl_bus_add(&bus, FL_PORT_PIC1, 2, "pic1", NULL, fl_pic_io) < 0 ||
	    fl_bus_add(&bus, FL_PORT_PIC2, 2, "pic2", NULL, fl_pic_io) < 0)
		abort();

	for (int op = 0; op < MAX_OPS && in.n; op++) {
		uint8_t buf[8] = {0};
		uint64_t port;
		uint32_t w, kind = (uint32_t)fz_take(&in, 1) & 3;
		size_t len, got;
		const uint8_t *p;

		events = 0;
		switch (kind) {
		case 0:
		case 1:
			port = bases[fz_take(&in, 1) % NBASES];
			port = port + (fz_take(&in, 1) & 3) - 1;
			w = widths[fz_take(&in, 1) & 3];
			if (kind == 1)
				fl_le_put(buf, 8, fz_take(&in, 8));
			if (fl_bus_dispatch(&bus, port, buf, w, (int)kind) < 0)
				break;
			/* Reads never stop or reset the machine; a write raises at most one event,
			 * the one its device means. */
			if (events && (kind == 0 || events > 1))
				__builtin_trap();
			if (events && port == FL_PORT_I8042_CMD && (buf[0] != 0xfe ||
								     last_kind != FL_EVENT_REBOOT))
				__builtin_trap();
			if (events && port == FL_PORT_SLEEP_CONTROL && last_kind != FL_EVENT_POWEROFF)
				__builtin_trap();
			if (events && port == FL_PORT_RESET_CONTROL &&
			    (!(buf[0] & 0x04) || last_kind != FL_EVENT_REBOOT))
				__builtin_trap();
			break;
		case 2:
			len = (size_t)fz_take(&in, 1) & 31;
			p = fz_bytes(&in, len, &got);
			(void)fl_i8042_inject(&kbd, p, (uint32_t)got);
			break;
		case 3:
			fl_i8042_save(&kbd, &st);
			line = -1; /* a restore drives the line afresh */
			if (fl_i8042_restore(&kbd, &st) < 0)
				__builtin_trap();
			break;
		}
		if (kbd.s.out_count > FL_I8042_QUEUE || kbd.s.out_head >= FL_I8042_QUEUE)
			__builtin_trap();
	}
	fl_i8042_fini(&kbd);
	return 0;
}

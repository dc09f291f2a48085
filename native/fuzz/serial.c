/*
 * libFuzzer target for the 8250 UART (native/serial.c) on the port bus (native/bus.c) at
 * COM1, as the machine lays it out: a guest's sequence of port accesses of any width, some
 * straddling the range, mixed with console input arriving and a save and restore. The
 * interrupt line is only ever driven to a new level, the FIFO stays within bounds, and in
 * loopback no byte leaves for the console.
 *
 * Input: operations, each an opcode byte:
 *   0 read  port(1, from 0x3f0) width(1)    1 write port(1) width(1) value(8)
 *   2 console input: length(1) bytes          3 save and restore
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "../vmm.h"
#include "input.h"

#define MAX_OPS 512

static int line = -1;

static void set_level(void *ctx, uint32_t gsi, int level)
{
	(void)ctx;
	/* The device remembers the line: setting it to what it is would be a wasted ioctl. */
	if (gsi != FL_IRQ_COM1 || level == line || (level != 0 && level != 1))
		__builtin_trap();
	line = level;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const uint32_t widths[4] = {1, 2, 4, 8};
	static struct fl_counters counters;
	static struct fl_bus bus;
	static struct fl_serial uart;
	static int out_fd = -1, wake_fd = -1;
	struct fz_input in = {data, size};
	struct fl_serial_state st;

	if (out_fd < 0) {
		out_fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
		wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
		if (out_fd < 0 || wake_fd < 0)
			abort();
	}
	memset(&counters, 0, sizeof(counters));
	memset(&bus, 0, sizeof(bus));
	bus.counters = &counters;
	line = -1;
	if (fl_serial_init(&uart, (struct fl_irq){set_level, NULL, FL_IRQ_COM1}, out_fd, wake_fd,
			   &counters) < 0 ||
	    fl_bus_add(&bus, FL_PORT_COM1, 8, "serial", &uart, fl_serial_io) < 0)
		abort();

	for (int op = 0; op < MAX_OPS && in.n; op++) {
		uint8_t buf[8] = {0};
		uint64_t port, sent = counters.console_out_bytes;
		uint32_t w, loop;
		size_t len, got;
		const uint8_t *p;

		switch (fz_take(&in, 1) & 3) {
		case 0:
			port = 0x3f0 + (fz_take(&in, 1) & 0x1f);
			w = widths[fz_take(&in, 1) & 3];
			fl_bus_dispatch(&bus, port, buf, w, 0);
			break;
		case 1:
			port = 0x3f0 + (fz_take(&in, 1) & 0x1f);
			w = widths[fz_take(&in, 1) & 3];
			fl_le_put(buf, 8, fz_take(&in, 8));
			loop = uart.s.mcr & 0x10;
			fl_bus_dispatch(&bus, port, buf, w, 1);
			/* THR comes before MCR in any access: in loopback nothing leaves. */
			if (loop && counters.console_out_bytes != sent)
				__builtin_trap();
			break;
		case 2:
			len = (size_t)fz_take(&in, 1);
			p = fz_bytes(&in, len, &got);
			if (fl_serial_input(&uart, p, (uint32_t)got) > got)
				__builtin_trap();
			break;
		case 3:
			fl_serial_save(&uart, &st);
			line = -1; /* a restore drives the line afresh */
			if (fl_serial_restore(&uart, &st) < 0)
				__builtin_trap();
			break;
		}
		if (uart.s.rx_count > FL_SERIAL_FIFO || uart.s.rx_head >= FL_SERIAL_FIFO)
			__builtin_trap();
	}
	fl_serial_fini(&uart);
	return 0;
}

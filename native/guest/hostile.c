#include "hostile.h"
#include "acpi.h"
#include "bootinfo.h"
#include "i8042.h"
#include "io.h"
#include "ioapic.h"
#include "print.h"
#include "uart.h"

static u64 rng = 0x243f6a8885a308d3UL;

static u64 rand64(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void port_garbage(u16 port)
{
	u64 r = rand64();
	switch (r & 3) {
	case 0: outb(port, (u8)(r >> 8)); break;
	case 1: outw(port, (u16)(r >> 8)); break;
	case 2: outl(port, (u32)(r >> 8)); break;
	default: (void)inb(port); (void)inw(port); (void)inl(port); break;
	}
}

/* With loopback on (MCR bit 4) transmitted bytes never reach the host, so
 * garbage in THR cannot show up as an unprefixed console line. */
static void uart_garbage(void)
{
	outb(COM1 + 4, 0x10);
	for (int i = 0; i < 64; i++) {
		u16 reg = (u16)(rand64() % 8);
		u8 v = (u8)rand64();
		if (reg == 4)
			v |= 0x10;
		outb(COM1 + reg, v);
		(void)inb(COM1 + (u16)(rand64() % 8));
	}
	uart_init();
	while (uart_poll_rx() >= 0)
		;
}

/* Controller commands without side effects on the machine: no 0xD1 (write
 * output port, bit 0 is the reset line) and no 0xF0-0xFF (pulse lines). */
static const u8 i8042_safe_cmds[] = {0x20, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xad, 0xae, 0xc0, 0xe0, 0xd2};

static void i8042_garbage(void)
{
	i8042_drain();
	outb(I8042_STATUS, 0x20); /* read the command byte to restore it */
	int cmd_byte = -1;
	for (int i = 0; i < 1000 && cmd_byte < 0; i++)
		if ((inb(I8042_STATUS) & 0x81) == 0x01)
			cmd_byte = inb(I8042_DATA);
	for (int i = 0; i < 64; i++) {
		u64 r = rand64();
		if (r & 1)
			outb(I8042_DATA, (u8)(r >> 8)); /* keyboard commands and data */
		else
			outb(I8042_STATUS, i8042_safe_cmds[(r >> 8) % sizeof(i8042_safe_cmds)]);
		(void)inb((r & 2) ? I8042_DATA : I8042_STATUS);
	}
	/* Put things back so Ctrl-Alt-Del still arrives in scancode set 1:
	 * the command byte (translation), the keyboard interface, and a
	 * keyboard reset (scan set 2, scanning on). */
	i8042_drain();
	if (cmd_byte >= 0) {
		outb(I8042_STATUS, 0x60);
		outb(I8042_DATA, (u8)cmd_byte);
	}
	outb(I8042_STATUS, 0xae);
	outb(I8042_DATA, 0xff);
	i8042_drain();
}

static void acpi_garbage(void)
{
	if (acpi.hw_reduced && acpi.sleep_control.address) {
		for (int i = 0; i < 16; i++) {
			acpi_gas_write(&acpi.sleep_control, rand64() & ~0x20UL);
			(void)acpi_gas_read(&acpi.sleep_control);
			if (acpi.sleep_status.address) {
				acpi_gas_write(&acpi.sleep_status, rand64());
				(void)acpi_gas_read(&acpi.sleep_status);
			}
		}
	} else if (acpi.pm1a_cnt) {
		for (int i = 0; i < 16; i++) {
			outw((u16)acpi.pm1a_cnt, (u16)(rand64() & ~0x2000UL));
			(void)inw((u16)acpi.pm1a_cnt);
		}
	}
}

/* The 8259 ports: masks, EOIs and read selects, never an ICW1 (bit 4 on a
 * command port), which would start a re-initialisation; ends masked. */
static void pic_garbage(void)
{
	static const u16 ports[] = {0x20, 0x21, 0xa0, 0xa1};
	for (int i = 0; i < 32; i++) {
		u64 r = rand64();
		u16 port = ports[r & 3];
		u8 v = (u8)(r >> 8);
		outb(port, (port & 1) ? v : (u8)(v & ~0x10));
		(void)inb(port);
	}
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

/* Ports no machine we boot on decodes (COM2, COM3, and free ranges). */
static const u16 unbacked_ports[] = {0x2f8, 0x2fa, 0x2fd, 0x3e8, 0x3ee, 0x1000, 0x1004, 0x2000,
				     0x3000, 0x5555, 0x7777, 0x9000, 0xe000, 0xfff0};

static void mmio_garbage(u64 a)
{
	u64 r = rand64();
	switch (r & 7) {
	case 0: mmio_write8(a, (u8)r); break;
	case 1: mmio_write16(a, (u16)r); break;
	case 2: mmio_write32(a, (u32)r); break;
	case 3: mmio_write64(a, r); break;
	case 4: (void)mmio_read8(a); break;
	case 5: (void)mmio_read16(a); break;
	case 6: (void)mmio_read32(a); break;
	default: (void)mmio_read64(a); break;
	}
}

void hostile_run(void)
{
	uart_garbage();
	i8042_garbage();
	acpi_garbage();
	pic_garbage();
	ioapic_garbage();
	for (unsigned i = 0; i < ARRAY_SIZE(unbacked_ports); i++)
		for (int j = 0; j < 4; j++)
			port_garbage((u16)(unbacked_ports[i] + (rand64() & 3)));
	/* Guest-physical holes: just past the top of low RAM, the legacy VGA
	 * window, and unused parts of the 32-bit PCI hole. */
	u64 holes[] = {0xa0000, 0xd0000000UL, 0xf0000000UL, 0};
	if (boot.ram_top && boot.ram_top < 0xa0000000UL && bootinfo_is_free_ram(boot.ram_top - 8, 8))
		holes[3] = boot.ram_top;
	for (unsigned i = 0; i < ARRAY_SIZE(holes); i++)
		if (holes[i])
			for (int j = 0; j < 16; j++)
				mmio_garbage(holes[i] + (rand64() & 0xff8));
	say("HOSTILE done");
}

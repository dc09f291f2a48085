/*
 * What a device sees: a bus to sit on, an interrupt line, a sink for machine events and guest
 * memory. Nothing of KVM, so devices can be tested and snapshotted on their own.
 */
#ifndef FL_DEVICES_H
#define FL_DEVICES_H

#include <pthread.h>
#include <stdint.h>

#include "include/flotilla.h"

/* Interrupt line: level 1 asserts, 0 deasserts (ISA IRQs are edges on the PIC; KVM makes
 * the edge from our level changes). */
struct fl_irq {
	void (*set_level)(void *ctx, uint32_t gsi, int level);
	void *ctx;
	uint32_t gsi;
};

/* Machine events raised by devices (power off, reset, panic). */
struct fl_sink {
	void (*raise)(void *ctx, uint32_t kind, int64_t code, uint64_t detail, const char *reason);
	void *ctx;
};

/* A port-I/O or MMIO handler. offset is relative to the range base; size is 1..8 and data
 * holds size bytes (little-endian). Reads fill data; the handler must not fail. */
typedef void (*fl_io_fn)(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write);

struct fl_bus_range {
	uint64_t base;
	uint64_t len;
	void *dev;
	fl_io_fn fn;
	struct fl_device_counters *ctr;
};

struct fl_bus {
	struct fl_bus_range ranges[FL_MAX_DEVICES];
	uint32_t n;
	struct fl_counters *counters; /* where per-device counters live */
};

int fl_bus_add(struct fl_bus *bus, uint64_t base, uint64_t len, const char *name, void *dev,
	       fl_io_fn fn);
/* 0 when a device handled the access, -ENOENT when nothing claims addr..addr+size. */
int fl_bus_dispatch(struct fl_bus *bus, uint64_t addr, uint8_t *data, uint32_t size,
		    int is_write);

static inline uint64_t fl_le_get(const uint8_t *d, uint32_t size)
{
	uint64_t v = 0;
	for (uint32_t i = 0; i < size && i < 8; i++)
		v |= (uint64_t)d[i] << (8 * i);
	return v;
}

static inline void fl_le_put(uint8_t *d, uint32_t size, uint64_t v)
{
	for (uint32_t i = 0; i < size && i < 8; i++)
		d[i] = (uint8_t)(v >> (8 * i));
}

/* ---- 8250 UART (COM1) ---- */
#define FL_SERIAL_FIFO 64

struct fl_serial_state {
	uint8_t ier, lcr, mcr, lsr, msr, scr, dll, dlm, fcr;
	uint8_t thr_ipending; /* THRE interrupt latched until IIR is read or THR written */
	uint8_t rx[FL_SERIAL_FIFO];
	uint32_t rx_head, rx_count;
};

struct fl_serial {
	pthread_mutex_t lock;
	struct fl_serial_state s;
	struct fl_irq irq;
	int out_fd;
	int wake_fd; /* written when the guest frees FIFO space (the input thread waits) */
	struct fl_counters *counters;
	int irq_level; /* last level sent, -1 unknown: an unchanged line costs no ioctl */
};

int fl_serial_init(struct fl_serial *uart, struct fl_irq irq, int out_fd, int wake_fd,
		   struct fl_counters *counters);
void fl_serial_fini(struct fl_serial *uart);
void fl_serial_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write);
/* Queue host input; returns the number of bytes accepted (FIFO room). */
uint32_t fl_serial_input(struct fl_serial *uart, const uint8_t *buf, uint32_t len);
uint32_t fl_serial_room(struct fl_serial *uart);
void fl_serial_save(struct fl_serial *uart, struct fl_serial_state *out);
int fl_serial_restore(struct fl_serial *uart, const struct fl_serial_state *in);

/* ---- i8042 keyboard controller (reset line and Ctrl-Alt-Del) ---- */
#define FL_I8042_QUEUE 16

struct fl_i8042_state {
	uint8_t ctr;	    /* controller configuration byte */
	uint8_t pending;    /* controller command awaiting a data byte, 0 if none */
	uint8_t outq[FL_I8042_QUEUE];
	uint32_t out_head, out_count;
	uint8_t irq_level;
};

struct fl_i8042 {
	pthread_mutex_t lock;
	struct fl_i8042_state s;
	struct fl_irq irq;
	struct fl_sink sink;
};

int fl_i8042_init(struct fl_i8042 *kbd, struct fl_irq irq, struct fl_sink sink);
void fl_i8042_fini(struct fl_i8042 *kbd);
void fl_i8042_data_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write);
void fl_i8042_cmd_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write);
int fl_i8042_inject(struct fl_i8042 *kbd, const uint8_t *codes, uint32_t n);
void fl_i8042_save(struct fl_i8042 *kbd, struct fl_i8042_state *out);
int fl_i8042_restore(struct fl_i8042 *kbd, const struct fl_i8042_state *in);

/* ---- ACPI hardware-reduced sleep registers (ports 0x600 control, 0x601 status) ---- */
struct fl_pm_state {
	uint8_t sleep_status;
};

struct fl_pm {
	struct fl_pm_state s;
	struct fl_sink sink;
};

void fl_pm_init(struct fl_pm *pm, struct fl_sink sink);
void fl_pm_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write);

/* ---- pvpanic (0x505), isa-debug-exit (0xf4), reset control (0xCF9): stateless ---- */
struct fl_signal_dev {
	struct fl_sink sink;
};

void fl_pvpanic_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write);
void fl_debugexit_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write);
/* reset control register (port 0xCF9, the FADT's RESET_REG): RST_CPU -> REBOOT */
void fl_resetctl_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write);

/* ---- IOAPIC (x86/ioapic.c): 24 pins, delivered to the local APICs as MSIs ---- */
#define FL_IOAPIC_PINS 24

/* An MSI as the local APICs take it: address 0xFEE0_0000 | dest << 12 | logical << 2,
 * data vector | delivery mode << 8 | level << 15. */
struct fl_msi {
	uint32_t address;
	uint32_t data;
};

/* Where the IOAPIC's interrupts go. deliver() sends one MSI now (any thread). routes()
 * hands over, whenever it changes, the MSI each pin would send for a line raised outside the
 * IOAPIC (pins marked with fl_ioapic_want_route) or for a level-triggered pin whose end of
 * interrupt must come back (present[p] = 0: no route for pin p). */
struct fl_msi_sink {
	void (*deliver)(void *ctx, const struct fl_msi *msi);
	void (*routes)(void *ctx, const struct fl_msi *msi, const uint8_t *present, uint32_t n);
	void *ctx;
};

struct fl_ioapic_state {
	uint32_t id;	   /* ID register (bits 24..31) */
	uint32_t regsel;   /* IOREGSEL as last written */
	uint64_t redir[FL_IOAPIC_PINS];
	uint32_t lines;	   /* input levels, bit per pin */
};

struct fl_ioapic {
	pthread_mutex_t lock;
	struct fl_ioapic_state s;
	struct fl_msi_sink sink;
	uint32_t want_route; /* pins raised outside the IOAPIC too (an irqfd) */
	struct fl_msi routed[FL_IOAPIC_PINS]; /* as last handed to sink.routes */
	uint8_t routed_present[FL_IOAPIC_PINS];
	int routes_sent;
	uint64_t dropped; /* interrupts not delivered: reserved delivery mode or vector < 16 */
};

int fl_ioapic_init(struct fl_ioapic *io, uint8_t id, struct fl_msi_sink sink);
void fl_ioapic_fini(struct fl_ioapic *io);
void fl_ioapic_mmio(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write);
/* A device's line moved (level 1 = asserted). Pins out of range are ignored. */
void fl_ioapic_set_level(struct fl_ioapic *io, uint32_t pin, int level);
/* The local APICs retired a level-triggered vector (KVM_EXIT_IOAPIC_EOI). */
void fl_ioapic_eoi(struct fl_ioapic *io, uint8_t vector);
/* Keep an MSI route for pin while it is unmasked: something other than set_level raises it. */
int fl_ioapic_want_route(struct fl_ioapic *io, uint32_t pin, int on);
void fl_ioapic_save(struct fl_ioapic *io, struct fl_ioapic_state *out);
int fl_ioapic_restore(struct fl_ioapic *io, const struct fl_ioapic_state *in);

/* ---- two 8259 PICs that are not there: ports answer as fully masked, idle PICs ---- */
void fl_pic_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write);

#endif

#include "ioapic.h"
#include "acpi.h"
#include "cpu.h"
#include "intr.h"
#include "io.h"
#include "layout.h"
#include "print.h"
#include "time.h"
#include "uart.h"

#define REGSEL 0x00
#define WIN 0x10
#define EOI 0x40
#define REG_ID 0x00
#define REG_VERSION 0x01
#define REDIR(pin) (0x10 + 2 * (pin))

#define RE_REMOTE_IRR (1u << 14)
#define RE_LEVEL (1u << 15)
#define RE_MASKED (1u << 16)

#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xb0
#define LAPIC_IRR 0x200
/* TPR class 2 holds VEC_TEST (0x25) in the IRR, where ring 3 can see it,
 * and lets the timer and input vectors (class 3) through. */
#define TPR_HOLD_TEST 0x20

#define COM1_IER 1
#define COM1_IIR 2
#define IER_THRI 0x02

#define IRQWAIT_TIMEOUT_US 10000000

static u32 rd(u32 reg)
{
	mmio_write32(acpi.ioapic_base + REGSEL, reg);
	return mmio_read32(acpi.ioapic_base + WIN);
}

static void wr(u32 reg, u32 v)
{
	mmio_write32(acpi.ioapic_base + REGSEL, reg);
	mmio_write32(acpi.ioapic_base + WIN, v);
}

static u32 lapic_rd(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_wr(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }

static bool irr(u8 vector)
{
	return (lapic_rd(LAPIC_IRR + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}

/* Any vector from 0x30 up waiting in the IRR? */
static bool higher_pending(void)
{
	if (lapic_rd(LAPIC_IRR + 0x10) & 0xffff0000u)
		return true;
	for (u32 i = 2; i < 8; i++)
		if (lapic_rd(LAPIC_IRR + 0x10 * i))
			return true;
	return false;
}

/* Take and EOI a pending VEC_TEST: with the timer stopped and anything of a
 * higher class retired first, the wait takes exactly it. */
static void take_test_vector(void)
{
	intr_disarm();
	while (higher_pending())
		svc_wait(LAPIC_BASE + LAPIC_EOI);
	if (!irr(VEC_TEST))
		return;
	lapic_wr(LAPIC_TPR, 0);
	svc_wait(LAPIC_BASE + LAPIC_EOI);
	lapic_wr(LAPIC_TPR, TPR_HOLD_TEST);
}

static void route(unsigned pin, u32 low)
{
	wr(REDIR(pin), RE_MASKED);
	wr(REDIR(pin) + 1, cpu_apic_id() << 24);
	wr(REDIR(pin), low);
}

static const char *failed;
static u32 failed_value;

static void check(bool ok, const char *what, u32 value)
{
	if (!ok && !failed) {
		failed = what;
		failed_value = value;
	}
}

/* COM1's THRE interrupt is a line the guest raises and lowers at will: on
 * with IER bit 1 (THR is always empty), off by reading IIR or clearing IER. */
static void com1_line(bool up)
{
	if (up) {
		outb(COM1 + COM1_IER, 0);
		outb(COM1 + COM1_IER, IER_THRI);
	} else {
		(void)inb(COM1 + COM1_IIR);
		outb(COM1 + COM1_IER, 0);
	}
}

static void registers(void)
{
	u32 ver = rd(REG_VERSION);
	check((ver & 0xff) >= 0x11 && ((ver >> 16) & 0xff) == 23, "version", ver);
	/* Read-only and reserved bits stay clear; all-ones keeps pin 10 masked. */
	wr(REDIR(10), 0xffffffffu);
	check(rd(REDIR(10)) == 0x1afffu, "writable_low", rd(REDIR(10)));
	wr(REDIR(10) + 1, 0xffffffffu);
	check(rd(REDIR(10) + 1) == 0xff000000u, "writable_high", rd(REDIR(10) + 1));
	wr(REDIR(10), RE_MASKED);
	wr(REDIR(10) + 1, 0);
	/* Past the last pin there is nothing: reads as zero, ignores writes. */
	wr(REDIR(24), 0x12345678u);
	check(rd(REDIR(24)) == 0, "past_last_pin", rd(REDIR(24)));
	mmio_write32(acpi.ioapic_base + REGSEL, 0xabcdef12u);
	check(mmio_read32(acpi.ioapic_base + REGSEL) == 0x12, "regsel", mmio_read32(acpi.ioapic_base + REGSEL));
}

/* Level-triggered pin 4: Remote IRR while a vector is in flight, set by the
 * delivery and cleared by the local APIC's EOI; a line still up at the EOI
 * interrupts again. */
static void level(void)
{
	com1_line(false);
	route(4, RE_MASKED | RE_LEVEL | VEC_TEST);
	com1_line(true);
	check(!(rd(REDIR(4)) & RE_REMOTE_IRR) && !irr(VEC_TEST), "masked_level_delivered", rd(REDIR(4)));
	wr(REDIR(4), RE_LEVEL | VEC_TEST); /* unmask with the line up */
	check((rd(REDIR(4)) & RE_REMOTE_IRR) && irr(VEC_TEST), "unmask_no_delivery", rd(REDIR(4)));
	take_test_vector(); /* EOI with the line still up */
	check((rd(REDIR(4)) & RE_REMOTE_IRR) && irr(VEC_TEST), "eoi_no_redelivery", rd(REDIR(4)));
	com1_line(false);
	take_test_vector();
	check(!(rd(REDIR(4)) & RE_REMOTE_IRR) && !irr(VEC_TEST), "eoi_remote_irr_stuck", rd(REDIR(4)));
	/* The IOAPIC's own EOI register (version 0x20) clears Remote IRR too. */
	com1_line(true);
	check(rd(REDIR(4)) & RE_REMOTE_IRR, "level_no_delivery", rd(REDIR(4)));
	com1_line(false);
	mmio_write32(acpi.ioapic_base + EOI, VEC_TEST);
	check(!(rd(REDIR(4)) & RE_REMOTE_IRR), "eoi_register", rd(REDIR(4)));
	take_test_vector();
}

/* Edge-triggered pin 4: an edge while masked is lost, one while unmasked is
 * delivered, and Remote IRR stays clear. */
static void edge(void)
{
	route(4, RE_MASKED | VEC_TEST);
	com1_line(true);
	wr(REDIR(4), VEC_TEST);
	check(!irr(VEC_TEST), "masked_edge_delivered", rd(REDIR(4)));
	com1_line(false);
	com1_line(true);
	check(irr(VEC_TEST) && !(rd(REDIR(4)) & RE_REMOTE_IRR), "edge_not_delivered", rd(REDIR(4)));
	com1_line(false);
	take_test_vector();
	check(!irr(VEC_TEST), "edge_not_taken", 0);
}

void ioapic_selftest(void)
{
	if (!acpi.ioapic_base || !intr_setup()) {
		say("IOAPIC FAILED no IOAPIC or local APIC");
		return;
	}
	failed = 0;
	u32 tpr = lapic_rd(LAPIC_TPR);
	lapic_wr(LAPIC_TPR, TPR_HOLD_TEST);
	registers();
	level();
	edge();
	lapic_wr(LAPIC_TPR, tpr);
	intr_route_inputs();
	uart_init();
	u32 ver = rd(REG_VERSION);
	if (failed)
		say("IOAPIC FAILED %s value=0x%x", failed, failed_value);
	else
		say("IOAPIC ok version=0x%x pins=%u", ver & 0xff, ((ver >> 16) & 0xff) + 1);
}

/* Route `pin` (edge, VEC_TEST) and wait for one interrupt on it from outside
 * (the host's eventfd); the IRR shows whether one was already pending. */
void ioapic_irqwait(u64 pin)
{
	if (!acpi.ioapic_base || !intr_setup() || pin >= 24 || pin == 1 || pin == 4) {
		say("IRQWAIT FAILED pin=%lu unusable", pin);
		return;
	}
	u32 tpr = lapic_rd(LAPIC_TPR);
	lapic_wr(LAPIC_TPR, TPR_HOLD_TEST);
	route((unsigned)pin, VEC_TEST);
	say("IRQWAIT pin=%lu armed pending=%d", pin, irr(VEC_TEST));
	u64 end = rdtsc() + time_us_to_tsc(IRQWAIT_TIMEOUT_US);
	while (!irr(VEC_TEST) && rdtsc() < end)
		wait_until(end);
	bool got = irr(VEC_TEST);
	wr(REDIR(pin), RE_MASKED);
	take_test_vector();
	lapic_wr(LAPIC_TPR, tpr);
	if (got)
		say("IRQWAIT pin=%lu taken", pin);
	else
		say("IRQWAIT FAILED pin=%lu timeout", pin);
}

static u64 rng = 0x13198a2e03707344UL;

static u32 rand32(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (u32)(rng >> 16);
}

/* Garbage that cannot turn into an interrupt: any index in IOREGSEL, window
 * reads of it, writes to everything but a redirection entry's low half, and
 * low halves only with the mask bit; odd widths and offsets anywhere else in
 * the page, random vectors into the EOI register. The table and the ID are
 * put back afterwards. */
void ioapic_garbage(void)
{
	u64 base = acpi.ioapic_base;
	u32 saved[2 * 24], id;
	if (!base)
		return;
	id = rd(REG_ID);
	for (u32 i = 0; i < 2 * 24; i++)
		saved[i] = rd(0x10 + i);
	for (int i = 0; i < 256; i++) {
		u32 r = rand32(), v = rand32() ^ (rand32() << 7);
		u32 reg = (r & 1) ? (r >> 8) : (r >> 8) & 0x3f;
		mmio_write32(base + REGSEL, reg);
		(void)mmio_read32(base + WIN);
		(void)mmio_read8(base + WIN + ((r >> 3) & 3));
		u32 sel = reg & 0xff;
		if (sel >= 0x10 && sel < 0x40 && !(sel & 1))
			v |= RE_MASKED;
		mmio_write32(base + WIN, v);
		u64 off = (u64)(rand32() & 0xffc);
		if (off == WIN)
			off = 0x20;
		switch (r & 0x70) {
		case 0x00: mmio_write8(base + off + ((r >> 4) & 3), (u8)v); break;
		case 0x10: mmio_write16(base + off, (u16)v); break;
		case 0x20: mmio_write32(base + off, v); break;
		case 0x30: (void)mmio_read64(base + (off & ~7UL)); break;
		case 0x40: mmio_write32(base + EOI, v); break;
		default: (void)mmio_read16(base + off); break;
		}
	}
	/* Restore masked first, then the destination, then the entry itself. */
	for (u32 p = 0; p < 24; p++) {
		wr(REDIR(p), RE_MASKED);
		wr(REDIR(p) + 1, saved[2 * p + 1]);
		wr(REDIR(p), saved[2 * p] & ~RE_REMOTE_IRR);
	}
	wr(REG_ID, id);
}

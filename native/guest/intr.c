#include "intr.h"
#include "acpi.h"
#include "cpu.h"
#include "io.h"
#include "layout.h"
#include "time.h"

#define LAPIC_VERSION 0x30
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TMICT 0x380
#define LAPIC_TMCCT 0x390
#define LAPIC_TDCR 0x3e0
#define SVR_ENABLE 0x100
#define LVT_MASKED 0x10000
#define TDCR_DIV1 0x0b

#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_REDIR(pin) (0x10 + 2 * (pin))

#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1

/* Long enough that the ~16 us of a ring-3 MMIO read (an exit under PVM)
 * bracketed by TSC reads is well under 1% of it. */
#define CALIBRATE_US 2000

static enum { INTR_NONE, INTR_READY, INTR_ABSENT } state;
static u64 lapic;
/* LAPIC timer ticks per TSC tick, 32.32 fixed point. */
static u64 ticks_per_tsc;
static u32 armed; /* TMICT as last written */

static u32 lapic_read(u32 reg) { return mmio_read32(lapic + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(lapic + reg, v); }

static void ioapic_route(unsigned pin, u8 vector, u32 apic_id)
{
	u64 io = acpi.ioapic_base;
	/* Destination first, then the low half unmasks: edge, active high,
	 * fixed delivery, physical destination. */
	mmio_write32(io + IOAPIC_REGSEL, IOAPIC_REDIR(pin) + 1);
	mmio_write32(io + IOAPIC_WIN, apic_id << 24);
	mmio_write32(io + IOAPIC_REGSEL, IOAPIC_REDIR(pin));
	mmio_write32(io + IOAPIC_WIN, vector);
}

/* TMCCT at the middle of a TSC bracket around the read. */
static u32 sample(u64 *tsc)
{
	u64 a = rdtsc();
	u32 c = lapic_read(LAPIC_TMCCT);
	*tsc = a + (rdtsc() - a) / 2;
	return c;
}

static void calibrate(void)
{
	u64 t0, t1, apic_hz = time_apic_hz();
	lapic_write(LAPIC_TDCR, TDCR_DIV1);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
	if (apic_hz && apic_hz < (1ULL << 32)) {
		/* The hypervisor said both rates (CPUID 0x40000010): no 2 ms loop. */
		ticks_per_tsc = (apic_hz << 32) / time_tsc_hz();
		if (ticks_per_tsc)
			return;
	}
	lapic_write(LAPIC_TMICT, 0xffffffffu);
	u32 c0 = sample(&t0);
	delay_us(CALIBRATE_US);
	u32 c1 = sample(&t1);
	lapic_write(LAPIC_TMICT, 0);
	u64 dt = t1 > t0 ? t1 - t0 : 1;
	ticks_per_tsc = ((u64)(c0 - c1) << 32) / dt;
	if (!ticks_per_tsc)
		ticks_per_tsc = 1;
}

static void intr_init(void)
{
	lapic = acpi.lapic_base;
	if (lapic_read(LAPIC_VERSION) == 0xffffffffu) {
		state = INTR_ABSENT;
		return;
	}
	/* The 8259s start unprogrammed; mask them (and LINT0, their way in). */
	outb(PIC1_DATA, 0xff);
	outb(PIC2_DATA, 0xff);
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_SVR, SVR_ENABLE | VEC_SPURIOUS);
	calibrate();
	lapic_write(LAPIC_LVT_TIMER, VEC_TIMER); /* one-shot */
	intr_route_inputs();
	state = INTR_READY;
}

bool intr_setup(void)
{
	if (state == INTR_NONE)
		intr_init();
	return state == INTR_READY;
}

void intr_disarm(void)
{
	if (state == INTR_READY && armed)
		lapic_write(LAPIC_TMICT, 0);
	armed = 0;
}

void intr_route_pin(unsigned pin, u8 vector)
{
	ioapic_route(pin, vector, cpu_apic_id());
}

void intr_route_inputs(void)
{
	u32 id = cpu_apic_id();
	ioapic_route(1, VEC_I8042, id);
	ioapic_route(4, VEC_COM1, id);
}

void wait_until(u64 deadline)
{
	if (state == INTR_NONE) {
		/* A line that rose while its pin was still masked sent its only edge
		 * into the void: return so the caller polls once more before sleeping. */
		intr_init();
		return;
	}
	u64 now = rdtsc();
	if (deadline <= now)
		return;
	if (state == INTR_ABSENT) {
		/* No LAPIC: spin instead, a short stretch at a time. */
		delay_us(1000);
		return;
	}
	u32 ticks = 0;
	if (deadline != WAIT_FOREVER) {
		unsigned __int128 t = (unsigned __int128)(deadline - now) * ticks_per_tsc;
		u64 want = (u64)(t >> 32);
		/* Aim 1/64 late: waking a hair early costs a second wake. */
		want += want / 64 + 1;
		ticks = want > 0xffffffffu ? 0xffffffffu : (u32)want;
	}
	/* Writing TMICT restarts the count; zero stops it. */
	if (ticks || armed)
		lapic_write(LAPIC_TMICT, ticks);
	armed = ticks;
	svc_wait(lapic + LAPIC_EOI);
}

void sleep_us(u64 us)
{
	u64 end = rdtsc() + time_us_to_tsc(us);
	while (rdtsc() < end)
		wait_until(end);
}

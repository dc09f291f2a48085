#include "cpu.h"
#include "bootinfo.h"
#include "io.h"
#include "layout.h"
#include "lib.h"
#include "mem.h"
#include "print.h"

extern u8 exc_stub_base[], irq_entry[];
extern u8 idt[], gdt[], tss_area[], io_bitmap[], kstacks[];
extern u64 pdpt[];
extern u64 fault_info[8];

#define GATE_INTR 0x8e /* present, interrupt gate */

static void set_gate(unsigned vec, const void *handler, u8 attr)
{
	u64 off = (u64)handler;
	u8 *g = idt + vec * 16;
	u64 lo = (off & 0xffff) | ((u64)SEL_KCODE << 16) | ((u64)attr << 40) |
		 ((off >> 16) & 0xffff) << 48;
	memcpy(g, &lo, 8);
	u64 hi = off >> 32;
	memcpy(g + 8, &hi, 8);
}

void cpu_init_idt(void)
{
	for (unsigned v = 0; v < 32; v++)
		set_gate(v, exc_stub_base + 16 * v, GATE_INTR);
	for (unsigned v = 32; v < 256; v++)
		set_gate(v, irq_entry, GATE_INTR);
}

u64 cpu_kstack_top(unsigned cpu)
{
	return (u64)kstacks + (u64)(cpu + 1) * KSTACK_SIZE;
}

u16 cpu_setup_tss(unsigned cpu, u64 kstack_top)
{
	u8 *tss = tss_area + cpu * TSS_STRIDE;
	u16 iomap = (u16)(io_bitmap - tss);
	u64 base = (u64)tss;
	u64 limit = (u64)iomap + IOBITMAP_SIZE; /* includes the trailing 0xFF */

	memset(tss, 0, 104);
	memcpy(tss + 4, &kstack_top, 8);
	memcpy(tss + 102, &iomap, 2);

	u64 lo = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89UL << 40 |
		 ((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
	u64 hi = base >> 32;
	unsigned sel = SEL_TSS0 + cpu * 16;
	memcpy(gdt + sel, &lo, 8);
	memcpy(gdt + sel + 8, &hi, 8);
	return (u16)sel;
}

bool cpu_map_high_ram(void)
{
	if (boot.ram_top <= 4 * GIB)
		return true;
	u32 a, b, c, d;
	cpuid(0x80000001, 0, &a, &b, &c, &d);
	bool huge = (d & (1u << 26)) != 0; /* 1 GiB pages */
	u64 top = ALIGN_UP(boot.ram_top, GIB);
	bool all = true;
	if (top > 512 * GIB) { /* one PDPT */
		top = 512 * GIB;
		all = false;
	}
	/* New present entries where there were none need no TLB flush. */
	for (u64 gb = 4; gb < top / GIB; gb++) {
		if (huge) {
			pdpt[gb] = (gb * GIB) | 0x87; /* P | RW | US | PS */
			continue;
		}
		u64 *pd = (u64 *)mem_alloc(4096, 4096);
		if (!pd)
			return false;
		for (u64 i = 0; i < 512; i++)
			pd[i] = (gb * GIB + i * 2 * MIB) | 0x87;
		pdpt[gb] = (u64)pd | 0x07; /* P | RW | US */
	}
	return all;
}

unsigned cpu_apic_id(void)
{
	return mmio_read32(LAPIC_BASE + 0x20) >> 24;
}

extern u64 svc_call(u64 nr, u64 a1, u64 a2);

void svc_halt(void)
{
	for (;;)
		svc_call(SVC_HALT, 0, 0);
}

void svc_triplefault(void)
{
	for (;;)
		svc_call(SVC_TRIPLEFAULT, 0, 0);
}

void svc_wrmsr(u32 msr, u64 value) { svc_call(SVC_WRMSR, msr, value); }

/* Entered from exc_common in ring 3 on the fault stack; the faulting context
 * is abandoned. */
void fault_report(void) __attribute__((noreturn, used));
void fault_report(void)
{
	say("FAULT vector=%lu error=0x%lx rip=0x%lx cs=0x%lx rsp=0x%lx cr2=0x%lx", fault_info[0],
	    fault_info[1], fault_info[2], fault_info[3], fault_info[5], fault_info[6]);
	svc_halt();
}

/* Descriptor tables, paging and the ring-0 services. The tables are static
 * (tables.S) and user-accessible, so ring 3 fills in what needs run-time
 * values natively instead of paying for emulated ring-0 instructions. */
#ifndef GUEST_CPU_H
#define GUEST_CPU_H

#include "types.h"

#define LAPIC_BASE 0xfee00000UL

/* Exception gates, and one interrupt gate for every vector from 0x20 up. */
void cpu_init_idt(void);
/* Prepare TSS `cpu` (RSP0 = kstack_top, shared I/O bitmap) and its GDT
 * descriptor; returns the selector to load with ltr. */
u16 cpu_setup_tss(unsigned cpu, u64 kstack_top);
u64 cpu_kstack_top(unsigned cpu);
/* Map RAM above 4 GiB (1 GiB pages, else 2 MiB pages in page directories from
 * mem_alloc); false if some RAM stays unmapped. Call after mem_init(). */
bool cpu_map_high_ram(void);
/* Local APIC id of the calling CPU (xAPIC MMIO). */
unsigned cpu_apic_id(void);

/* Ring-0 services. */
__attribute__((noreturn)) void svc_halt(void);
__attribute__((noreturn)) void svc_triplefault(void);
void svc_wrmsr(u32 msr, u64 value);
/* Sleep in ring 0 (sti; hlt) until one interrupt arrives, then EOI it at
 * lapic_eoi. Use through intr.h. */
void svc_wait(u64 lapic_eoi);

#endif

#include "smp.h"
#include "acpi.h"
#include "bootinfo.h"
#include "cpu.h"
#include "io.h"
#include "layout.h"
#include "lib.h"
#include "print.h"
#include "time.h"

#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_PENDING (1u << 12)
#define ICR_INIT 0x00004500 /* INIT, level assert */
#define ICR_SIPI 0x00004600 /* start-up, vector in bits 0-7 */

/* Read by ap_start64 (trampoline.S) at these offsets. */
struct ap_boot {
	u64 rsp0;
	u64 user_rsp;
	u64 cpu;
	u64 tr;
};
struct ap_boot ap_boot;
static volatile u32 ap_done;

extern u8 ap_tramp_start[], ap_tramp_end[], ap_tramp_gdtr[], ap_tramp_cr3[], ap_tramp_far[];
extern u8 gdt_ptr[], ap_stacks[], ap_start64[];
extern u64 pml4[];

void ap_main(u64 cpu) __attribute__((noreturn, used));
void ap_main(u64 cpu)
{
	(void)cpu;
	say("CPU %u online", cpu_apic_id());
	barrier();
	ap_done = 1;
	svc_halt();
}

static u64 lapic(void) { return acpi.lapic_base ? acpi.lapic_base : LAPIC_BASE; }

static void icr_send(u32 apic_id, u32 lo)
{
	for (int i = 0; i < 100000 && (mmio_read32(lapic() + LAPIC_ICR_LO) & ICR_PENDING); i++)
		cpu_relax();
	mmio_write32(lapic() + LAPIC_ICR_HI, apic_id << 24);
	mmio_write32(lapic() + LAPIC_ICR_LO, lo);
}

static bool wait_done(u64 us)
{
	u64 end = time_now_us() + us;
	while (time_now_us() < end) {
		if (ap_done)
			return true;
		cpu_relax();
	}
	return ap_done != 0;
}

/* A free RAM page below 1 MiB for the real-mode entry (SIPI vectors are
 * page numbers). What the loader left there was copied out already. */
static u64 trampoline_page(void)
{
	for (u64 a = 0x1000; a < 0x100000; a += 0x1000)
		if (bootinfo_is_free_ram(a, 0x1000))
			return a;
	return 0;
}

static u64 install_trampoline(void)
{
	u64 page = trampoline_page();
	if (!page)
		return 0;
	u8 *dst = (u8 *)page;
	memcpy(dst, ap_tramp_start, (usize)(ap_tramp_end - ap_tramp_start));
	u16 limit;
	u64 gdt_base;
	memcpy(&limit, gdt_ptr, 2);
	memcpy(&gdt_base, gdt_ptr + 2, 8);
	u32 base32 = (u32)gdt_base, cr3 = (u32)(u64)pml4, entry = (u32)(u64)ap_start64;
	memcpy(dst + (ap_tramp_gdtr - ap_tramp_start), &limit, 2);
	memcpy(dst + (ap_tramp_gdtr - ap_tramp_start) + 2, &base32, 4);
	memcpy(dst + (ap_tramp_cr3 - ap_tramp_start), &cr3, 4);
	memcpy(dst + (ap_tramp_far - ap_tramp_start), &entry, 4);
	return page;
}

void smp_start(void)
{
	unsigned expected = acpi.nr_cpus ? acpi.nr_cpus : 1;
	unsigned bsp = cpu_apic_id(), online = 1, next = 1;
	say("CPU %u online", bsp);

	u64 page = expected > 1 ? install_trampoline() : 0;
	if (expected > 1 && !page) {
		say("SMP FAILED no free page below 1 MiB for the AP trampoline");
		return;
	}
	for (unsigned i = 0; i < acpi.nr_cpus; i++) {
		u32 id = acpi.apic_ids[i];
		if (id == bsp)
			continue;
		if (next >= MAX_CPUS || id > 0xff) {
			say("CPU %u skipped (limit %u CPUs, xAPIC ids only)", id, MAX_CPUS);
			continue;
		}
		ap_boot.cpu = next;
		ap_boot.rsp0 = cpu_kstack_top(next);
		ap_boot.user_rsp = (u64)ap_stacks + (u64)next * AP_STACK_SIZE;
		ap_boot.tr = cpu_setup_tss(next, ap_boot.rsp0);
		ap_done = 0;
		barrier();
		/* VMs need no INIT-SIPI settling time; 1 ms is plenty. */
		icr_send(id, ICR_INIT);
		delay_us(1000);
		icr_send(id, ICR_SIPI | (u32)(page >> 12));
		if (!wait_done(100000)) {
			icr_send(id, ICR_SIPI | (u32)(page >> 12));
			wait_done(1000000);
		}
		/* A late AP must not share a slot with the next one. */
		next++;
		if (ap_done) {
			online++;
		} else {
			say("CPU %u did not start", id);
		}
	}
	if (online == expected)
		say("SMP %u ok", online);
	else
		say("SMP FAILED online=%u expected=%u", online, expected);
}

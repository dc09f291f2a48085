/* ACPI discovery (RSDP → XSDT/RSDT → FADT, MADT, DSDT \_S5) and S5 power-off. */
#ifndef GUEST_ACPI_H
#define GUEST_ACPI_H

#include "layout.h"
#include "types.h"

/* Generic Address Structure. */
struct acpi_gas {
	u8 space; /* 0 system memory, 1 system I/O */
	u8 bit_width;
	u8 bit_offset;
	u8 access_size;
	u64 address;
} __attribute__((packed));

#define ACPI_SPACE_MEMORY 0
#define ACPI_SPACE_IO 1

struct acpi_info {
	bool found; /* an RSDP was found */
	bool hw_reduced;
	struct acpi_gas sleep_control; /* hardware-reduced */
	struct acpi_gas sleep_status;
	u32 pm1a_cnt, pm1b_cnt; /* legacy fixed hardware (I/O ports) */
	u8 slp_typ_s5;
	bool have_s5;
	u64 lapic_base;
	u64 ioapic_base; /* the IOAPIC with GSI base 0 */
	unsigned nr_cpus; /* enabled or online-capable local APICs */
	u32 apic_ids[MAX_CPUS];
};

extern struct acpi_info acpi;

void acpi_init(void);
/* Request S5 through the FADT; returns only if the machine is still on. */
void acpi_poweroff(void);
/* Read or write a GAS register (I/O or memory space). */
u64 acpi_gas_read(const struct acpi_gas *g);
void acpi_gas_write(const struct acpi_gas *g, u64 v);

#endif

/*
 * Hardware-reduced ACPI tables at 0xE0000: RSDP -> XSDT -> FADT (sleep registers at
 * 0x600/0x601, reset register at 0xCF9) -> DSDT (\_S5), and a MADT with one LAPIC per vCPU
 * and the IOAPIC.
 */
#include <errno.h>
#include <string.h>

#include "../le.h"
#include "../vmm.h"
#include "aml.h"
#include "layout.h"

#define FADT_SIZE 276
#define FADT_REVISION 6
#define FADT_HW_REDUCED (1u << 20)
#define FADT_PWR_BUTTON (1u << 4) /* no fixed-feature power button */
#define FADT_SLP_BUTTON (1u << 5)
#define FADT_RESET_REG_SUP (1u << 10)
#define BOOT_ARCH_8042 (1u << 1)
#define BOOT_ARCH_NO_VGA (1u << 2)
#define BOOT_ARCH_NO_CMOS_RTC (1u << 5)

struct table_writer {
	uint8_t *base; /* host view of FL_ACPI_GPA */
	uint64_t size;
	uint64_t next; /* offset of the next free byte */
};

static uint8_t checksum(const uint8_t *p, uint64_t n)
{
	uint8_t s = 0;

	for (uint64_t i = 0; i < n; i++)
		s = (uint8_t)(s + p[i]);
	return (uint8_t)(0 - s);
}

/* Reserves len bytes at 16-byte alignment; returns its offset or 0 when out of room. */
static uint64_t reserve(struct table_writer *w, uint64_t len)
{
	uint64_t off = (w->next + 15) & ~15ULL;

	if (off > w->size || len > w->size - off)
		return 0;
	w->next = off + len;
	return off;
}

static void header(uint8_t *t, const char *sig, uint32_t len, uint8_t rev)
{
	memcpy(t, sig, 4);
	put32(t + 4, len);
	t[8] = rev;
	memcpy(t + 10, "FLOTIL", 6);
	memcpy(t + 16, "FLOTILLA", 8);
	put32(t + 24, 1);
	memcpy(t + 28, "FLTL", 4);
	put32(t + 32, 1);
}

static void finish(uint8_t *t, uint32_t len)
{
	t[9] = 0;
	t[9] = checksum(t, len);
}

/* Generic Address Structure for a byte-wide I/O port. */
static void gas_io(uint8_t *p, uint16_t port)
{
	p[0] = 1; /* SystemIO */
	p[1] = 8; /* bit width */
	p[2] = 0;
	p[3] = 1; /* byte access */
	put64(p + 4, port);
}

/* Name (_S5, Package () { 5, 5, 0, 0 }): SLP_TYP 5 for S5. */
static const uint8_t dsdt_aml[] = {
	0x08, '_', 'S', '5', '_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00,
};

static void virtio_devices(const struct fl_vm *vm, struct fl_aml *sb)
{
	for (uint32_t i = 0; i < vm->nvirtio; i++) {
		const struct fl_virtio_slot *slot = &vm->virtio[i];
		struct fl_aml dev = {.len = 0}, res = {.len = 0};
		char name[5] = {'V', 'R', '0', "0123456789ABCDEF"[i & 15], 0};

		fl_aml_name_string(&dev, "_HID", "LNRO0005");
		fl_aml_name_int(&dev, "_UID", i);
		fl_aml_res_mem32(&res, (uint32_t)slot->base, (uint32_t)FL_VIRTIO_MMIO_SIZE);
		fl_aml_res_interrupt(&res, slot->gsi);
		fl_aml_name_resources(&dev, "_CRS", &res);
		fl_aml_device(sb, name, &dev);
	}
}

/*
 * COM1 as a PNP0501 device. Without 8259s Linux has no identity mapping for ISA IRQs, so a
 * legacy device's interrupt works only if ACPI names its GSI: the 8250's PNP driver then
 * takes over the port with that interrupt (tty output is interrupt-driven).
 */
static void com1_device(struct fl_aml *sb)
{
	struct fl_aml dev = {.len = 0}, res = {.len = 0};

	fl_aml_name_string(&dev, "_HID", "PNP0501");
	fl_aml_name_int(&dev, "_UID", 1);
	fl_aml_res_io(&res, FL_PORT_COM1, 8);
	fl_aml_res_irq(&res, FL_IRQ_COM1);
	fl_aml_name_resources(&dev, "_CRS", &res);
	fl_aml_device(sb, "COM1", &dev);
}

/* The i8042's keyboard port, PNP0303 (no mouse: no PNP0F13, so Linux leaves AUX alone). */
static void ps2_keyboard_device(struct fl_aml *sb)
{
	struct fl_aml dev = {.len = 0}, res = {.len = 0};

	fl_aml_name_string(&dev, "_HID", "PNP0303");
	fl_aml_res_io(&res, FL_PORT_I8042_DATA, 1);
	fl_aml_res_io(&res, FL_PORT_I8042_CMD, 1);
	fl_aml_res_irq(&res, FL_IRQ_I8042);
	fl_aml_name_resources(&dev, "_CRS", &res);
	fl_aml_device(sb, "PS2K", &dev);
}

/*
 * The power button on hardware-reduced ACPI (no fixed-feature PM1 events): a Generic Event
 * Device whose interrupt runs _EVT, which notifies PWRB (PNP0C0C) with 0x80, "pressed".
 * Linux's button driver turns that into KEY_POWER for userspace (acpid, logind) to act on.
 */
static void power_button_devices(struct fl_aml *sb)
{
	struct fl_aml button = {.len = 0}, ged = {.len = 0}, res = {.len = 0}, evt = {.len = 0};

	fl_aml_name_string(&button, "_HID", "PNP0C0C");
	fl_aml_device(sb, "PWRB", &button);

	fl_aml_name_string(&ged, "_HID", "ACPI0013");
	fl_aml_res_interrupt(&res, FL_GSI_POWER_BUTTON);
	fl_aml_name_resources(&ged, "_CRS", &res);
	fl_aml_notify(&evt, "PWRB", 0x80); /* one interrupt, one event: Arg0 needs no test */
	fl_aml_method(&ged, "_EVT", 1, &evt);
	fl_aml_device(sb, "GED0", &ged);
}

/* pvpanic at its I/O port as QEMU describes it (QEMU0001): Linux's pvpanic-mmio binds it. */
static void pvpanic_device(struct fl_aml *sb)
{
	struct fl_aml dev = {.len = 0}, res = {.len = 0};

	fl_aml_name_string(&dev, "_HID", "QEMU0001");
	fl_aml_res_io(&res, FL_PORT_PVPANIC, 1);
	fl_aml_name_resources(&dev, "_CRS", &res);
	fl_aml_device(sb, "PEVT", &dev);
}

/*
 * Scope (\_SB) { COM1, PS2K, PWRB, GED0, PEVT, VR0n... }: how Linux finds the legacy devices' interrupts and the
 * virtio-mmio slots (its virtio_mmio binds LNRO0005; edge, because the interrupt comes from
 * an irqfd, which has no resample path). Returns -1 when it does not fit.
 */
static int system_bus_aml(const struct fl_vm *vm, struct fl_aml *out)
{
	struct fl_aml sb;

	memset(&sb, 0, sizeof(sb));
	com1_device(&sb);
	ps2_keyboard_device(&sb);
	power_button_devices(&sb);
	pvpanic_device(&sb);
	virtio_devices(vm, &sb);
	fl_aml_scope(out, "\\_SB_", &sb);
	return out->overflow ? -1 : 0;
}

int fl_acpi_build(struct fl_vm *vm, uint64_t *rsdp_gpa)
{
	struct table_writer w = {.size = FL_ACPI_END - FL_ACPI_GPA, .next = 0};
	uint32_t madt_len = 44 + 8 * vm->nvcpus + 12;
	struct fl_aml devices;
	uint32_t dsdt_len;
	uint64_t rsdp, xsdt, fadt, dsdt, madt;

	memset(&devices, 0, sizeof(devices));
	if (system_bus_aml(vm, &devices) < 0)
		return fl_fail(vm, ENOSPC, "the DSDT does not fit in %u bytes", FL_AML_MAX);
	dsdt_len = 36 + sizeof(dsdt_aml) + devices.len;

	w.base = fl_mem_ptr(&vm->mem, FL_ACPI_GPA, w.size);
	if (!w.base)
		return fl_fail(vm, EINVAL, "no RAM behind the ACPI table area");
	memset(w.base, 0, w.size);
	/* Offset 0 is the RSDP; reserve() returns 0 only on failure after it. */
	w.next = 36;
	rsdp = 0;
	xsdt = reserve(&w, 36 + 2 * 8);
	fadt = reserve(&w, FADT_SIZE);
	dsdt = reserve(&w, dsdt_len);
	madt = reserve(&w, madt_len);
	if (!xsdt || !fadt || !dsdt || !madt)
		return fl_fail(vm, ENOSPC, "ACPI tables do not fit below 1 MiB");

	uint8_t *t = w.base + dsdt;
	header(t, "DSDT", dsdt_len, 2);
	memcpy(t + 36, dsdt_aml, sizeof(dsdt_aml));
	memcpy(t + 36 + sizeof(dsdt_aml), devices.buf, devices.len);
	finish(t, dsdt_len);

	t = w.base + fadt;
	header(t, "FACP", FADT_SIZE, FADT_REVISION);
	put32(t + 40, (uint32_t)(FL_ACPI_GPA + dsdt));
	put16(t + 109, BOOT_ARCH_8042 | BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_CMOS_RTC);
	put32(t + 112, FADT_HW_REDUCED | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP);
	gas_io(t + 116, FL_PORT_RESET_CONTROL); /* RESET_REG, for reboot=acpi */
	t[128] = FL_RESET_VALUE;
	t[131] = 0; /* FADT minor version: ACPI 6.0 */
	put64(t + 140, FL_ACPI_GPA + dsdt);
	gas_io(t + 244, FL_PORT_SLEEP_CONTROL);
	gas_io(t + 256, FL_PORT_SLEEP_STATUS);
	memcpy(t + 268, "FLOTILLA", 8);
	finish(t, FADT_SIZE);

	t = w.base + madt;
	header(t, "APIC", madt_len, 5);
	put32(t + 36, (uint32_t)FL_LAPIC_GPA);
	put32(t + 40, 0); /* no PCAT_COMPAT: there are no 8259s, only the IOAPIC */
	uint8_t *e = t + 44;
	for (uint32_t i = 0; i < vm->nvcpus; i++, e += 8) {
		e[0] = 0; /* processor local APIC */
		e[1] = 8;
		e[2] = (uint8_t)i; /* ACPI processor UID */
		e[3] = (uint8_t)i; /* APIC id */
		put32(e + 4, 1);   /* enabled */
	}
	e[0] = 1; /* IOAPIC */
	e[1] = 12;
	e[2] = (uint8_t)vm->nvcpus; /* its id, after the LAPICs' */
	put32(e + 4, (uint32_t)FL_IOAPIC_GPA);
	put32(e + 8, 0); /* GSI base */
	finish(t, madt_len);

	t = w.base + xsdt;
	header(t, "XSDT", 36 + 2 * 8, 1);
	put64(t + 36, FL_ACPI_GPA + fadt);
	put64(t + 44, FL_ACPI_GPA + madt);
	finish(t, 36 + 2 * 8);

	t = w.base + rsdp;
	memcpy(t, "RSD PTR ", 8);
	memcpy(t + 9, "FLOTIL", 6);
	t[15] = 2; /* ACPI 2.0+: use the XSDT */
	put32(t + 20, 36);
	put64(t + 24, FL_ACPI_GPA + xsdt);
	t[8] = checksum(t, 20);
	t[32] = checksum(t, 36);

	*rsdp_gpa = FL_ACPI_GPA + rsdp;
	return 0;
}

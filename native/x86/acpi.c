/*
 * Hardware-reduced ACPI tables at 0xE0000: RSDP -> XSDT -> FADT (sleep registers at
 * 0x600/0x601) -> DSDT (\_S5), and a MADT with one LAPIC per vCPU and the IOAPIC.
 */
#include <errno.h>
#include <string.h>

#include "../le.h"
#include "../vmm.h"
#include "layout.h"

#define FADT_SIZE 276
#define FADT_REVISION 6
#define FADT_HW_REDUCED (1u << 20)
#define FADT_PWR_BUTTON (1u << 4) /* no fixed-feature power button */
#define FADT_SLP_BUTTON (1u << 5)
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

/* AML PkgLength for a package whose contents (after the length) are len bytes. */
static uint32_t pkg_length(uint8_t *p, uint32_t len)
{
	if (len + 1 < 64) {
		p[0] = (uint8_t)(len + 1);
		return 1;
	}
	len += 2; /* up to 4095: two bytes */
	p[0] = (uint8_t)(0x40 | (len & 0xf));
	p[1] = (uint8_t)(len >> 4);
	return 2;
}

/*
 * Scope (\_SB) { Device (VRn) { Name (_HID, "LNRO0005") Name (_UID, n)
 *   Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, base, size)
 *     Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi } }) } ... }
 * for each virtio-mmio slot: how Linux finds them (its virtio_mmio binds LNRO0005). Edge:
 * the interrupt comes from an irqfd, which has no resample path. Returns the bytes written.
 */
static uint32_t virtio_aml(const struct fl_vm *vm, uint8_t *out)
{
	uint8_t devs[FL_VIRTIO_SLOTS * 64];
	uint32_t n = 0, len;

	for (uint32_t i = 0; i < vm->nvirtio; i++) {
		uint8_t body[64], *b = body;
		const struct fl_virtio_slot *slot = &vm->virtio[i];

		memcpy(b, "\x08_HID\x0dLNRO0005", 15); /* NameOp, name, StringPrefix, text+NUL */
		b += 15;
		memcpy(b, "\x08_UID\x0a", 6);
		b[6] = (uint8_t)i;
		b += 7;
		memcpy(b, "\x08_CRS\x11", 6);
		b += 6;
		b += pkg_length(b, 2 + 23);
		*b++ = 0x0a; /* BufferSize: ByteConst 23 */
		*b++ = 23;
		*b++ = 0x86; /* Memory32Fixed, length 9 */
		put16(b, 9);
		b[2] = 1; /* read-write */
		put32(b + 3, (uint32_t)slot->base);
		put32(b + 7, (uint32_t)FL_VIRTIO_MMIO_SIZE);
		b += 11;
		*b++ = 0x89; /* Extended Interrupt, length 6 */
		put16(b, 6);
		b[2] = 0x03; /* consumer, edge, active high, exclusive */
		b[3] = 1;
		put32(b + 4, slot->gsi);
		b += 8;
		*b++ = 0x79; /* End Tag, checksum 0 */
		*b++ = 0;
		len = (uint32_t)(b - body);

		devs[n++] = 0x5b; /* DeviceOp */
		devs[n++] = 0x82;
		n += pkg_length(devs + n, 4 + len);
		devs[n++] = 'V';
		devs[n++] = 'R';
		devs[n++] = '0';
		devs[n++] = (uint8_t)("0123456789ABCDEF"[i & 15]);
		memcpy(devs + n, body, len);
		n += len;
	}
	if (!n)
		return 0;
	uint32_t k = 0;
	out[k++] = 0x10; /* ScopeOp */
	k += pkg_length(out + k, 5 + n);
	memcpy(out + k, "\\_SB_", 5);
	k += 5;
	memcpy(out + k, devs, n);
	return k + n;
}

int fl_acpi_build(struct fl_vm *vm, uint64_t *rsdp_gpa)
{
	struct table_writer w = {.size = FL_ACPI_END - FL_ACPI_GPA, .next = 0};
	uint32_t madt_len = 44 + 8 * vm->nvcpus + 12;
	uint8_t devices_aml[8 + FL_VIRTIO_SLOTS * 64];
	uint32_t devices_len = virtio_aml(vm, devices_aml);
	uint32_t dsdt_len = 36 + sizeof(dsdt_aml) + devices_len;
	uint64_t rsdp, xsdt, fadt, dsdt, madt;

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
	memcpy(t + 36 + sizeof(dsdt_aml), devices_aml, devices_len);
	finish(t, dsdt_len);

	t = w.base + fadt;
	header(t, "FACP", FADT_SIZE, FADT_REVISION);
	put32(t + 40, (uint32_t)(FL_ACPI_GPA + dsdt));
	put16(t + 109, BOOT_ARCH_8042 | BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_CMOS_RTC);
	put32(t + 112, FADT_HW_REDUCED | FADT_PWR_BUTTON | FADT_SLP_BUTTON);
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

#include "acpi.h"
#include "bootinfo.h"
#include "io.h"
#include "lib.h"

struct acpi_info acpi;

struct sdt_header {
	char sig[4];
	u32 length;
	u8 revision;
	u8 checksum;
	char oem[6];
	char oem_table[8];
	u32 oem_rev;
	u32 creator;
	u32 creator_rev;
} __attribute__((packed));

#define FADT_DSDT 40
#define FADT_PM1A_CNT 64
#define FADT_PM1B_CNT 68
#define FADT_FLAGS 112
#define FADT_X_DSDT 140
#define FADT_SLEEP_CONTROL 244
#define FADT_SLEEP_STATUS 256
#define FADT_HW_REDUCED (1u << 20)

#define SLP_EN_HW_REDUCED 0x20
#define SLP_EN_PM1 0x2000

static bool checksum_ok(const void *p, usize n)
{
	u8 sum = 0;
	for (usize i = 0; i < n; i++)
		sum = (u8)(sum + ((const u8 *)p)[i]);
	return sum == 0;
}

static u64 find_rsdp(void)
{
	if (boot.rsdp_paddr)
		return boot.rsdp_paddr;
	/* The legacy scan of the BIOS area, 16-byte aligned. */
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (!memcmp((const void *)a, "RSD PTR ", 8) && checksum_ok((const void *)a, 20))
			return a;
	return 0;
}

static u32 rd32(const u8 *p) { u32 v; memcpy(&v, p, 4); return v; }
static u64 rd64(const u8 *p) { u64 v; memcpy(&v, p, 8); return v; }

/* SLP_TYPa from the \_S5_ package in the DSDT's AML, the way small kernels
 * do it: NameOp "_S5_" PackageOp PkgLength NumElements, then the first
 * element as BytePrefix+byte, ZeroOp, OneOp or a bare byte. */
static void parse_s5(const u8 *dsdt)
{
	const struct sdt_header *h = (const void *)dsdt;
	u32 len = h->length;
	for (u32 i = sizeof(*h); i + 8 < len; i++) {
		if (memcmp(dsdt + i, "_S5_", 4) || dsdt[i + 4] != 0x12)
			continue;
		if (!(dsdt[i - 1] == 0x08 || (dsdt[i - 2] == 0x08 && dsdt[i - 1] == '\\')))
			continue;
		const u8 *p = dsdt + i + 5;
		p += ((*p & 0xc0) >> 6) + 2; /* PkgLength bytes, NumElements */
		/* ZeroOp (0) and OneOp (1) read as their own values. */
		acpi.slp_typ_s5 = (*p == 0x0a || *p == 0x0b) ? p[1] : *p;
		acpi.have_s5 = true;
		return;
	}
}

static void parse_fadt(const u8 *f)
{
	const struct sdt_header *h = (const void *)f;
	u32 len = h->length;
	u64 dsdt = rd32(f + FADT_DSDT);
	if (len >= FADT_X_DSDT + 8 && rd64(f + FADT_X_DSDT))
		dsdt = rd64(f + FADT_X_DSDT);
	acpi.pm1a_cnt = rd32(f + FADT_PM1A_CNT);
	acpi.pm1b_cnt = rd32(f + FADT_PM1B_CNT);
	if (len >= FADT_FLAGS + 4)
		acpi.hw_reduced = (rd32(f + FADT_FLAGS) & FADT_HW_REDUCED) != 0;
	if (len >= FADT_SLEEP_STATUS + 12) {
		memcpy(&acpi.sleep_control, f + FADT_SLEEP_CONTROL, 12);
		memcpy(&acpi.sleep_status, f + FADT_SLEEP_STATUS, 12);
	}
	if (dsdt && !memcmp((const void *)dsdt, "DSDT", 4))
		parse_s5((const u8 *)dsdt);
}

static void parse_madt(const u8 *m)
{
	const struct sdt_header *h = (const void *)m;
	acpi.lapic_base = rd32(m + 36);
	for (u32 off = 44; off + 2 <= h->length;) {
		u8 type = m[off], len = m[off + 1];
		if (len < 2)
			break;
		u32 id = 0, flags = 0;
		bool cpu = false;
		if (type == 0 && len >= 8) { /* processor local APIC */
			id = m[off + 3];
			flags = rd32(m + off + 4);
			cpu = true;
		} else if (type == 9 && len >= 16) { /* processor local x2APIC */
			id = rd32(m + off + 4);
			flags = rd32(m + off + 8);
			cpu = true;
		} else if (type == 1 && len >= 12 && rd32(m + off + 8) == 0) { /* IOAPIC, GSI 0 */
			acpi.ioapic_base = rd32(m + off + 4);
		} else if (type == 5 && len >= 12) { /* LAPIC address override */
			acpi.lapic_base = rd64(m + off + 4);
		}
		if (cpu && (flags & 3) && acpi.nr_cpus < MAX_CPUS)
			acpi.apic_ids[acpi.nr_cpus++] = id;
		off += len;
	}
}

void acpi_init(void)
{
	acpi.lapic_base = 0xfee00000UL;
	acpi.ioapic_base = 0xfec00000UL;
	u64 rsdp = find_rsdp();
	if (!rsdp)
		return;
	acpi.found = true;
	const u8 *r = (const u8 *)rsdp;
	bool xsdt = r[15] >= 2 && rd64(r + 24);
	u64 root = xsdt ? rd64(r + 24) : rd32(r + 16);
	const struct sdt_header *rh = (const void *)root;
	unsigned esz = xsdt ? 8 : 4;
	unsigned n = (rh->length - sizeof(*rh)) / esz;
	for (unsigned i = 0; i < n; i++) {
		const u8 *e = (const u8 *)root + sizeof(*rh) + i * esz;
		const u8 *t = (const u8 *)(xsdt ? rd64(e) : rd32(e));
		if (!memcmp(t, "FACP", 4))
			parse_fadt(t);
		else if (!memcmp(t, "APIC", 4))
			parse_madt(t);
	}
}

u64 acpi_gas_read(const struct acpi_gas *g)
{
	unsigned width = g->bit_width ? g->bit_width : 8;
	if (g->space == ACPI_SPACE_IO) {
		u16 port = (u16)g->address;
		return width >= 32 ? inl(port) : width == 16 ? inw(port) : inb(port);
	}
	if (g->space == ACPI_SPACE_MEMORY) {
		return width >= 64 ? mmio_read64(g->address) : width == 32 ? mmio_read32(g->address)
		       : width == 16 ? mmio_read16(g->address) : mmio_read8(g->address);
	}
	return 0;
}

void acpi_gas_write(const struct acpi_gas *g, u64 v)
{
	unsigned width = g->bit_width ? g->bit_width : 8;
	if (g->space == ACPI_SPACE_IO) {
		u16 port = (u16)g->address;
		if (width >= 32)
			outl(port, (u32)v);
		else if (width == 16)
			outw(port, (u16)v);
		else
			outb(port, (u8)v);
	} else if (g->space == ACPI_SPACE_MEMORY) {
		if (width >= 64)
			mmio_write64(g->address, v);
		else if (width == 32)
			mmio_write32(g->address, (u32)v);
		else if (width == 16)
			mmio_write16(g->address, (u16)v);
		else
			mmio_write8(g->address, (u8)v);
	}
}

void acpi_poweroff(void)
{
	if (!acpi.found)
		return;
	if (acpi.hw_reduced && acpi.sleep_control.address) {
		u8 typ = acpi.have_s5 ? acpi.slp_typ_s5 : 5;
		acpi_gas_write(&acpi.sleep_control, (u64)((typ & 7) << 2) | SLP_EN_HW_REDUCED);
		return;
	}
	/* Legacy fixed hardware. SCI_EN is not forced through SMI_CMD: that
	 * would enter SMM, and the VMMs we run on accept SLP_EN without it. */
	u16 typ = acpi.have_s5 ? acpi.slp_typ_s5 : 0;
	if (acpi.pm1a_cnt)
		outw((u16)acpi.pm1a_cnt, (u16)((typ & 7) << 10) | SLP_EN_PM1);
	if (acpi.pm1b_cnt)
		outw((u16)acpi.pm1b_cnt, (u16)((typ & 7) << 10) | SLP_EN_PM1);
}

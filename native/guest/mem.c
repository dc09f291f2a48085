#include "mem.h"
#include "bootinfo.h"
#include "lib.h"
#include "print.h"

/* Each 64-bit word holds its own address times this odd constant, so the
 * host can recompute the checksum and a misplaced page shows. */
#define MEMTEST_MUL 0x9e3779b97f4a7c15UL

extern u8 _end[];
static u64 next_free;

void mem_init(void)
{
	next_free = ALIGN_UP((u64)_end, 4096);
}

u64 mem_alloc(u64 size, u64 align)
{
	u64 a = ALIGN_UP(next_free, align ? align : 8);
	if (!bootinfo_is_free_ram(a, size))
		return 0;
	next_free = a + size;
	memset((void *)a, 0, size);
	return a;
}

u64 mem_free_base(void) { return next_free; }

void mem_test(u64 mib)
{
	u64 size = mib * MIB;
	u64 base = ALIGN_UP(next_free, MIB);
	/* Skip past modules or holes to the first region that fits. */
	while (size && base + size <= boot.ram_top && !bootinfo_is_free_ram(base, size))
		base += MIB;
	if (!size || base + size > boot.ram_top) {
		say("MEMTEST mib=%lu error=no-room ram_mib=%lu", mib, (boot.ram_bytes + MIB - 1) / MIB);
		return;
	}
	volatile u64 *w = (volatile u64 *)base;
	u64 words = size / 8;
	for (u64 i = 0; i < words; i++)
		w[i] = (base + i * 8) * MEMTEST_MUL;
	u64 sum = 0;
	for (u64 i = 0; i < words; i++) {
		u64 v = w[i];
		if (v != (base + i * 8) * MEMTEST_MUL) {
			say("MEMTEST mib=%lu error=mismatch at=0x%lx read=0x%016lx", mib, base + i * 8, v);
			return;
		}
		sum += v;
	}
	/* Kept: the region is not handed out again, so the host can check it any time later
	 * (after a snapshot and restore, say). */
	next_free = base + size;
	say("MEMTEST mib=%lu base=0x%lx checksum=0x%016lx", mib, base, sum);
}

#include "mem.h"
#include "bootinfo.h"
#include "lib.h"
#include "print.h"
#include "io.h"
#include "time.h"

/* Each 64-bit word holds its own address times this odd constant, so the
 * host can recompute the checksum and a misplaced page shows. */
#define MEMTEST_MUL 0x9e3779b97f4a7c15UL

extern u8 _end[];
static u64 next_free;
/* The last memtest region and its checksum, for mem_check(). */
static u64 test_base, test_size, test_sum;

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
	test_base = base;
	test_size = size;
	test_sum = sum;
	say("MEMTEST mib=%lu base=0x%lx checksum=0x%016lx", mib, base, sum);
}

void mem_check(u64 n)
{
	if (!test_size) {
		say("MEMCHECK n=%lu error=no-memtest", n);
		return;
	}
	volatile u64 *w = (volatile u64 *)test_base;
	u64 words = test_size / 8, sum = 0;
	for (u64 i = 0; i < words; i++) {
		u64 v = w[i];
		if (v != (test_base + i * 8) * MEMTEST_MUL) {
			say("MEMCHECK n=%lu error=mismatch at=0x%lx read=0x%016lx", n, test_base + i * 8,
			    v);
			return;
		}
		sum += v;
	}
	say("MEMCHECK n=%lu ok checksum=0x%016lx", n, sum);
	if (sum != test_sum) /* cannot happen when every word matched; kept as a guard */
		say("MEMCHECK n=%lu error=checksum expected=0x%016lx", n, test_sum);
}

/* A region of `mib` MiB rewritten forever, one whole pass after another (each word gets its
 * address pattern xor the pass number, so every pass changes every page), with a COUNTER
 * line every `period_us` between pages: a live-migration workload whose dirty rate is as
 * high as a ring-3 loop can make it. */
void mem_rewrite(u64 mib, u64 period_us)
{
	u64 size = mib * MIB;
	u64 base = ALIGN_UP(next_free, MIB);
	while (size && base + size <= boot.ram_top && !bootinfo_is_free_ram(base, size))
		base += MIB;
	if (!size || base + size > boot.ram_top) {
		say("REWRITE mib=%lu error=no-room ram_mib=%lu", mib, (boot.ram_bytes + MIB - 1) / MIB);
		return;
	}
	next_free = base + size;
	say("REWRITE mib=%lu base=0x%lx", mib, base);
	u64 period = time_us_to_tsc(period_us);
	u64 n = 0, next = rdtsc();
	for (u64 pass = 1;; pass++) {
		for (u64 page = base; page < base + size; page += 4096) {
			volatile u64 *w = (volatile u64 *)page;
			for (u64 i = 0; i < 512; i++)
				w[i] = ((page + i * 8) * MEMTEST_MUL) ^ pass;
			u64 now = rdtsc();
			if (now >= next) {
				say("COUNTER %lu", n++);
				next += period;
				if (next < now)
					next = now + period;
			}
		}
		if (pass == 1)
			say("REWRITE pass=1 done");
	}
}

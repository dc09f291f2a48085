/* Guest-physical memory above the image: a bump allocator for buffers that
 * drivers need (virtio rings and the like) and the memtest action. */
#ifndef GUEST_MEM_H
#define GUEST_MEM_H

#include "types.h"

void mem_init(void);
/* Zeroed, identity-mapped memory that stays allocated; 0 when RAM runs out. */
u64 mem_alloc(u64 size, u64 align);
/* First address not used by the image or the allocator. */
u64 mem_free_base(void);
/* Fill `mib` MiB from the first free MiB-aligned RAM with the address
 * pattern, verify it and print the MEMTEST line. */
void mem_test(u64 mib);
/* Read the last memtest region back against its pattern: `MEMCHECK n=<n> ok
 * checksum=0x<16 hex>` (the MEMTEST line's checksum), or the first mismatch. */
void mem_check(u64 n);
/* Rewrite `mib` MiB (after any memtest region) forever, printing COUNTER lines every
 * period_us; never returns. */
void mem_rewrite(u64 mib, u64 period_us);

#endif

/* What the loader told us (struct hvm_start_info), copied into our own memory
 * so that nothing the loader placed in low RAM needs to stay intact. */
#ifndef GUEST_BOOTINFO_H
#define GUEST_BOOTINFO_H

#include "types.h"

#define E820_RAM 1
#define MAX_MEMMAP 64
#define MAX_MODULES 8
#define CMDLINE_MAX 2048

struct mem_range {
	u64 addr;
	u64 size;
	u32 type;
};

struct bootinfo {
	u32 version;
	char cmdline[CMDLINE_MAX];
	u64 rsdp_paddr;
	unsigned nr_memmap;
	struct mem_range memmap[MAX_MEMMAP];
	unsigned nr_modules;
	struct mem_range modules[MAX_MODULES];
	u64 ram_bytes; /* sum of RAM (type 1) ranges */
	u64 ram_top;   /* end of the highest RAM range */
};

extern struct bootinfo boot;

/* Returns false when start_info is missing or has the wrong magic. */
bool bootinfo_parse(u64 start_info_paddr);
/* True when [addr, addr+size) lies in one RAM range and overlaps no module. */
bool bootinfo_is_free_ram(u64 addr, u64 size);

#endif

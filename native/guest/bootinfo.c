#include "bootinfo.h"
#include "lib.h"

#define HVM_START_MAGIC 0x336ec578

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr; /* version >= 1 */
	u32 memmap_entries;
	u32 reserved;
} __attribute__((packed));

struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
} __attribute__((packed));

struct hvm_modlist_entry {
	u64 paddr;
	u64 size;
	u64 cmdline_paddr;
	u64 reserved;
} __attribute__((packed));

struct bootinfo boot;

bool bootinfo_parse(u64 start_info_paddr)
{
	const struct hvm_start_info *si = (const void *)start_info_paddr;
	if (!si || si->magic != HVM_START_MAGIC)
		return false;
	boot.version = si->version;
	boot.rsdp_paddr = si->rsdp_paddr;
	if (si->cmdline_paddr) {
		const char *c = (const char *)si->cmdline_paddr;
		usize i = 0;
		for (; i < CMDLINE_MAX - 1 && c[i]; i++)
			boot.cmdline[i] = c[i];
		boot.cmdline[i] = 0;
	}
	if (si->version >= 1 && si->memmap_paddr) {
		const struct hvm_memmap_entry *e = (const void *)si->memmap_paddr;
		for (u32 i = 0; i < si->memmap_entries && boot.nr_memmap < MAX_MEMMAP; i++) {
			struct mem_range *r = &boot.memmap[boot.nr_memmap++];
			r->addr = e[i].addr;
			r->size = e[i].size;
			r->type = e[i].type;
			if (r->type == E820_RAM) {
				boot.ram_bytes += r->size;
				if (r->addr + r->size > boot.ram_top)
					boot.ram_top = r->addr + r->size;
			}
		}
	}
	if (si->modlist_paddr) {
		const struct hvm_modlist_entry *m = (const void *)si->modlist_paddr;
		for (u32 i = 0; i < si->nr_modules && boot.nr_modules < MAX_MODULES; i++) {
			boot.modules[boot.nr_modules].addr = m[i].paddr;
			boot.modules[boot.nr_modules].size = m[i].size;
			boot.nr_modules++;
		}
	}
	return true;
}

bool bootinfo_is_free_ram(u64 addr, u64 size)
{
	bool in_ram = false;
	for (unsigned i = 0; i < boot.nr_memmap; i++) {
		const struct mem_range *r = &boot.memmap[i];
		if (r->type == E820_RAM && addr >= r->addr && addr + size <= r->addr + r->size)
			in_ram = true;
	}
	if (!in_ram)
		return false;
	for (unsigned i = 0; i < boot.nr_modules; i++) {
		const struct mem_range *m = &boot.modules[i];
		if (addr < m->addr + m->size && m->addr < addr + size)
			return false;
	}
	return true;
}

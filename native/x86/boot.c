/*
 * Kernel loading: PVH ELF (XEN_ELFNOTE_PHYS32_ENTRY, hvm_start_info), Linux bzImage (boot
 * protocol 2.12+, 64-bit entry) and plain vmlinux ELF64 (long-mode entry at e_entry).
 * The image is untrusted: every offset and size is checked before use.
 */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../le.h"
#include "../vmm.h"
#include "layout.h"

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC 0x336ec578u
#define MAX_PHDRS 64
#define MAX_IMAGE_BYTES (1ULL << 30)
#define E820_RAM 1
#define E820_RESERVED 2

/* Setup header offsets within boot_params / the bzImage (Documentation/arch/x86/boot.rst). */
#define BP_ACPI_RSDP 0x070
#define BP_E820_COUNT 0x1e8
#define BP_SETUP_SECTS 0x1f1
#define BP_BOOT_FLAG 0x1fe
#define BP_JUMP 0x200
#define BP_HEADER 0x202
#define BP_VERSION 0x206
#define BP_TYPE_OF_LOADER 0x210
#define BP_LOADFLAGS 0x211
#define BP_CODE32_START 0x214
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_HEAP_END 0x224
#define BP_CMDLINE_PTR 0x228
#define BP_INITRD_MAX 0x22c
#define BP_KERNEL_ALIGN 0x230
#define BP_XLOADFLAGS 0x236
#define BP_CMDLINE_SIZE 0x238
#define BP_INIT_SIZE 0x260
#define BP_HDR_LIMIT 0x290 /* end of the setup header area in boot_params */
#define BP_E820_TABLE 0x2d0
#define LOADED_HIGH 0x01
#define CAN_USE_HEAP 0x80
#define XLF_KERNEL_64 0x01

/* A program header normalized from ELF32 or ELF64. */
struct phdr {
	uint32_t type;
	uint64_t offset, paddr, filesz, memsz;
};

static int elf_phdr(const uint8_t *buf, size_t len, int is64, uint64_t phoff, uint32_t i,
		    struct phdr *out)
{
	if (is64) {
		Elf64_Phdr p;
		uint64_t at = phoff + (uint64_t)i * sizeof(p);
		if (at > len || sizeof(p) > len - at)
			return -1;
		memcpy(&p, buf + at, sizeof(p));
		*out = (struct phdr){p.p_type, p.p_offset, p.p_paddr, p.p_filesz, p.p_memsz};
	} else {
		Elf32_Phdr p;
		uint64_t at = phoff + (uint64_t)i * sizeof(p);
		if (at > len || sizeof(p) > len - at)
			return -1;
		memcpy(&p, buf + at, sizeof(p));
		*out = (struct phdr){p.p_type, p.p_offset, p.p_paddr, p.p_filesz, p.p_memsz};
	}
	return 0;
}

/* Looks for the PVH entry note in one PT_NOTE segment; 1 when found. */
static int find_pvh_note(const uint8_t *buf, const struct phdr *ph, uint64_t *entry)
{
	uint64_t off = 0, end = ph->filesz;
	const uint8_t *n = buf + ph->offset;

	while (end - off >= 12) {
		uint32_t namesz = get32(n + off), descsz = get32(n + off + 4);
		uint32_t type = get32(n + off + 8);
		uint64_t name_at = off + 12;
		uint64_t desc_at = name_at + (((uint64_t)namesz + 3) & ~3ULL);
		uint64_t next = desc_at + (((uint64_t)descsz + 3) & ~3ULL);
		if (desc_at > end || next > end || descsz > end - desc_at)
			return 0; /* truncated note: ignore the rest */
		if (type == XEN_ELFNOTE_PHYS32_ENTRY && namesz == 4 &&
		    memcmp(n + name_at, "Xen", 4) == 0) {
			if (descsz == 4)
				*entry = get32(n + desc_at);
			else if (descsz == 8)
				*entry = get32(n + desc_at) | ((uint64_t)get32(n + desc_at + 4) << 32);
			else
				return 0;
			return 1;
		}
		off = next;
	}
	return 0;
}

static int parse_elf(const uint8_t *buf, size_t len, struct fl_image_info *info, char *err,
		     size_t errlen)
{
	int is64;
	uint64_t phoff, entry;
	uint32_t phnum, phentsize, machine, type;
	uint64_t pvh_entry = 0;
	int has_pvh = 0;

	/* The magic matched, but a short file has no class or data byte to read yet. */
	if (len < EI_NIDENT)
		return fl_errf(err, errlen, ENOEXEC, "ELF header truncated (%zu bytes)", len);
	is64 = buf[EI_CLASS] == ELFCLASS64;
	if (buf[EI_CLASS] != ELFCLASS32 && buf[EI_CLASS] != ELFCLASS64)
		return fl_errf(err, errlen, ENOEXEC, "ELF class %u is neither 32- nor 64-bit",
			       buf[EI_CLASS]);
	if (buf[EI_DATA] != ELFDATA2LSB)
		return fl_errf(err, errlen, ENOEXEC, "ELF is not little-endian");
	if (len < (is64 ? sizeof(Elf64_Ehdr) : sizeof(Elf32_Ehdr)))
		return fl_errf(err, errlen, ENOEXEC, "ELF header truncated (%zu bytes)", len);
	if (is64) {
		Elf64_Ehdr h;
		memcpy(&h, buf, sizeof(h));
		phoff = h.e_phoff, phnum = h.e_phnum, phentsize = h.e_phentsize;
		machine = h.e_machine, type = h.e_type, entry = h.e_entry;
	} else {
		Elf32_Ehdr h;
		memcpy(&h, buf, sizeof(h));
		phoff = h.e_phoff, phnum = h.e_phnum, phentsize = h.e_phentsize;
		machine = h.e_machine, type = h.e_type, entry = h.e_entry;
	}
	if (machine != EM_X86_64 && machine != EM_386)
		return fl_errf(err, errlen, ENOEXEC, "ELF machine %u is not x86", machine);
	if (type != ET_EXEC)
		return fl_errf(err, errlen, ENOEXEC, "ELF type %u is not an executable", type);
	if (phentsize != (is64 ? sizeof(Elf64_Phdr) : sizeof(Elf32_Phdr)))
		return fl_errf(err, errlen, ENOEXEC, "ELF program header size %u is wrong",
			       phentsize);
	if (phnum == 0 || phnum > MAX_PHDRS)
		return fl_errf(err, errlen, ENOEXEC, "ELF has %u program headers (1..%d allowed)",
			       phnum, MAX_PHDRS);

	info->load_start = UINT64_MAX;
	info->load_end = 0;
	info->nsegments = 0;
	for (uint32_t i = 0; i < phnum; i++) {
		struct phdr ph;
		if (elf_phdr(buf, len, is64, phoff, i, &ph) < 0)
			return fl_errf(err, errlen, ENOEXEC, "ELF program header %u is past the end",
				       i);
		if (ph.type != PT_LOAD && ph.type != PT_NOTE)
			continue;
		if (ph.offset > len || ph.filesz > len - ph.offset)
			return fl_errf(err, errlen, ENOEXEC,
				       "ELF segment %u (offset 0x%llx, 0x%llx bytes) is past the end "
				       "of the file",
				       i, (unsigned long long)ph.offset,
				       (unsigned long long)ph.filesz);
		if (ph.type == PT_NOTE) {
			if (!has_pvh)
				has_pvh = find_pvh_note(buf, &ph, &pvh_entry);
			continue;
		}
		if (ph.memsz == 0)
			continue;
		if (ph.filesz > ph.memsz)
			return fl_errf(err, errlen, ENOEXEC, "ELF segment %u has filesz > memsz", i);
		if (ph.paddr + ph.memsz < ph.paddr || ph.paddr + ph.memsz > FL_LOW_RAM_MAX)
			return fl_errf(err, errlen, ENOEXEC,
				       "ELF segment %u at 0x%llx+0x%llx is beyond low RAM", i,
				       (unsigned long long)ph.paddr, (unsigned long long)ph.memsz);
		if (ph.paddr < FL_KERNEL_GPA)
			return fl_errf(err, errlen, ENOEXEC,
				       "ELF segment %u at 0x%llx is below 1 MiB (reserved for boot "
				       "data)",
				       i, (unsigned long long)ph.paddr);
		if (ph.paddr < info->load_start)
			info->load_start = ph.paddr;
		if (ph.paddr + ph.memsz > info->load_end)
			info->load_end = ph.paddr + ph.memsz;
		info->nsegments++;
	}
	if (info->nsegments == 0)
		return fl_errf(err, errlen, ENOEXEC, "ELF has no loadable segment");
	if (has_pvh) {
		info->kind = FL_IMAGE_PVH;
		info->entry = pvh_entry;
	} else if (is64) {
		info->kind = FL_IMAGE_VMLINUX;
		info->entry = entry;
	} else {
		return fl_errf(err, errlen, ENOEXEC,
			       "32-bit ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)");
	}
	if (info->entry < info->load_start || info->entry >= info->load_end)
		return fl_errf(err, errlen, ENOEXEC,
			       "entry point 0x%llx is outside the loaded segments",
			       (unsigned long long)info->entry);
	return 0;
}

static int parse_bzimage(const uint8_t *buf, size_t len, struct fl_image_info *info, char *err,
			 size_t errlen)
{
	uint32_t setup_sects, setup_bytes, hdr_end;
	uint64_t payload;

	if (len < BP_INIT_SIZE + 4)
		return fl_errf(err, errlen, ENOEXEC, "bzImage truncated in its setup header");
	info->setup_version = get16(buf + BP_VERSION);
	if (info->setup_version < 0x20c)
		return fl_errf(err, errlen, ENOEXEC,
			       "boot protocol %u.%02u is too old (2.12 or later needed)",
			       info->setup_version >> 8, info->setup_version & 0xff);
	if (!(get16(buf + BP_XLOADFLAGS) & XLF_KERNEL_64))
		return fl_errf(err, errlen, ENOEXEC, "bzImage has no 64-bit entry point");
	if (!(buf[BP_LOADFLAGS] & LOADED_HIGH))
		return fl_errf(err, errlen, ENOEXEC, "bzImage is not loaded high (zImage?)");
	hdr_end = BP_HEADER + buf[BP_JUMP + 1];
	if (buf[BP_JUMP] != 0xeb || hdr_end > BP_HDR_LIMIT || hdr_end < BP_INIT_SIZE + 4)
		return fl_errf(err, errlen, ENOEXEC, "bzImage setup header length is invalid");
	setup_sects = buf[BP_SETUP_SECTS] ? buf[BP_SETUP_SECTS] : 4;
	setup_bytes = (setup_sects + 1) * 512;
	if (setup_bytes >= len)
		return fl_errf(err, errlen, ENOEXEC, "bzImage has no kernel after its %u setup sectors",
			       setup_sects);
	payload = len - setup_bytes;
	info->kind = FL_IMAGE_BZIMAGE;
	info->entry = FL_KERNEL_GPA + 0x200;
	info->load_start = FL_KERNEL_GPA;
	info->init_size = get32(buf + BP_INIT_SIZE);
	info->load_end = FL_KERNEL_GPA + (payload > info->init_size ? payload : info->init_size);
	info->initrd_addr_max = get32(buf + BP_INITRD_MAX);
	info->cmdline_size = get32(buf + BP_CMDLINE_SIZE);
	info->nsegments = 1;
	if (info->load_end > FL_LOW_RAM_MAX)
		return fl_errf(err, errlen, ENOEXEC, "bzImage needs more than 3 GiB (init_size 0x%llx)",
			       (unsigned long long)info->init_size);
	return 0;
}

int fl_image_parse(const uint8_t *buf, size_t len, struct fl_image_info *info, char *err,
		   size_t errlen)
{
	if (!buf || !info)
		return fl_errf(err, errlen, EINVAL, "no image");
	memset(info, 0, sizeof(*info));
	if (len >= SELFMAG && memcmp(buf, ELFMAG, SELFMAG) == 0)
		return parse_elf(buf, len, info, err, errlen);
	if (len >= BP_HEADER + 4 && get16(buf + BP_BOOT_FLAG) == 0xaa55 &&
	    memcmp(buf + BP_HEADER, "HdrS", 4) == 0)
		return parse_bzimage(buf, len, info, err, errlen);
	return fl_errf(err, errlen, ENOEXEC,
		       "not a kernel image: neither an ELF nor a bzImage (no HdrS header)");
}

/* Reads a whole file; the caller frees *out. */
static int read_file(struct fl_vm *vm, const char *what, const char *path, uint64_t max,
		     uint8_t **out, size_t *len)
{
	struct stat st;
	uint8_t *buf;
	size_t got = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	int rc;

	if (fd < 0)
		return fl_fail(vm, errno, "cannot open %s %s: %s", what, path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		rc = fl_fail(vm, errno, "cannot stat %s %s: %s", what, path, strerror(errno));
		goto close_fd;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = fl_fail(vm, EINVAL, "%s %s is not a regular file", what, path);
		goto close_fd;
	}
	if ((uint64_t)st.st_size > max) {
		rc = fl_fail(vm, EFBIG, "%s %s is %lld bytes; at most %llu fit", what, path,
			     (long long)st.st_size, (unsigned long long)max);
		goto close_fd;
	}
	buf = malloc(st.st_size ? (size_t)st.st_size : 1);
	if (!buf) {
		rc = fl_fail(vm, ENOMEM, "no memory to read %s %s", what, path);
		goto close_fd;
	}
	while (got < (size_t)st.st_size) {
		ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			rc = fl_fail(vm, n < 0 ? errno : EIO, "reading %s %s failed", what, path);
			free(buf);
			goto close_fd;
		}
		got += (size_t)n;
	}
	*out = buf;
	*len = got;
	rc = 0;
close_fd:
	close(fd);
	return rc;
}

struct e820 {
	uint64_t addr, size;
	uint32_t type;
};

static uint32_t memory_map(const struct fl_mem *mem, struct e820 *map)
{
	uint32_t n = 0;

	map[n++] = (struct e820){0, FL_EBDA_GPA, E820_RAM};
	map[n++] = (struct e820){FL_EBDA_GPA, FL_LOW_RAM_END - FL_EBDA_GPA, E820_RESERVED};
	map[n++] = (struct e820){FL_ACPI_GPA, FL_BIOS_END - FL_ACPI_GPA, E820_RESERVED};
	map[n++] = (struct e820){FL_KERNEL_GPA, mem->low_size - FL_KERNEL_GPA, E820_RAM};
	if (mem->size > mem->low_size)
		map[n++] = (struct e820){FL_HIGH_RAM_BASE, mem->size - mem->low_size, E820_RAM};
	return n;
}

static int load_segments(struct fl_vm *vm, const uint8_t *buf, size_t len,
			 const struct fl_image_info *info)
{
	int is64 = buf[EI_CLASS] == ELFCLASS64;
	uint64_t phoff;
	uint32_t phnum;

	if (is64) {
		Elf64_Ehdr h;
		memcpy(&h, buf, sizeof(h));
		phoff = h.e_phoff, phnum = h.e_phnum;
	} else {
		Elf32_Ehdr h;
		memcpy(&h, buf, sizeof(h));
		phoff = h.e_phoff, phnum = h.e_phnum;
	}
	(void)info;
	for (uint32_t i = 0; i < phnum; i++) {
		struct phdr ph;
		if (elf_phdr(buf, len, is64, phoff, i, &ph) < 0)
			return fl_fail(vm, ENOEXEC, "ELF program header %u vanished", i);
		if (ph.type != PT_LOAD || ph.memsz == 0)
			continue;
		uint8_t *dst = fl_mem_ptr(&vm->mem, ph.paddr, ph.memsz);
		if (!dst)
			return fl_fail(vm, EINVAL,
				       "kernel segment at 0x%llx+0x%llx does not fit in %llu MiB of "
				       "RAM",
				       (unsigned long long)ph.paddr, (unsigned long long)ph.memsz,
				       (unsigned long long)(vm->mem.size >> 20));
		memcpy(dst, buf + ph.offset, ph.filesz);
		memset(dst + ph.filesz, 0, ph.memsz - ph.filesz);
	}
	return 0;
}

/* Places the initrd 1 MiB-aligned as high as allowed, above the kernel. */
static int load_initrd(struct fl_vm *vm, const char *path, uint64_t kernel_end, uint64_t max,
		       uint64_t *gpa, uint64_t *size)
{
	uint8_t *buf;
	size_t len;
	uint64_t top = vm->mem.low_size, addr;
	int rc;

	rc = read_file(vm, "initrd", path, vm->mem.low_size, &buf, &len);
	if (rc < 0)
		return rc;
	if (max && max + 1 < top)
		top = max + 1;
	addr = len <= top ? ((top - len) & ~(FL_MIB - 1)) : 0;
	if (len == 0 || len > top || addr < kernel_end) {
		rc = fl_fail(vm, ENOMEM, "initrd %s (%zu bytes) does not fit between the kernel and "
			     "the top of RAM",
			     path, len);
		goto out;
	}
	memcpy(fl_mem_ptr(&vm->mem, addr, len), buf, len);
	*gpa = addr;
	*size = len;
out:
	free(buf);
	return rc;
}

static int write_start_info(struct fl_vm *vm, uint64_t rsdp, uint64_t initrd, uint64_t initrd_size)
{
	struct e820 map[8];
	uint32_t n = memory_map(&vm->mem, map);
	uint8_t *si = fl_mem_ptr(&vm->mem, FL_START_INFO_GPA, 0x100);
	uint8_t *mm;

	if (!si)
		return fl_fail(vm, EINVAL, "no RAM for hvm_start_info");
	memset(si, 0, 0x100);
	put32(si + 0, HVM_START_MAGIC);
	put32(si + 4, 1); /* version: has the memory map */
	put32(si + 8, 0);
	put64(si + 24, FL_CMDLINE_GPA);
	put64(si + 32, rsdp);
	if (initrd_size) {
		uint8_t *mod = si + (FL_MODLIST_GPA - FL_START_INFO_GPA);
		put32(si + 12, 1);
		put64(si + 16, FL_MODLIST_GPA);
		put64(mod + 0, initrd);
		put64(mod + 8, initrd_size);
	}
	mm = si + (FL_MEMMAP_GPA - FL_START_INFO_GPA);
	for (uint32_t i = 0; i < n; i++) {
		put64(mm + 24 * i, map[i].addr);
		put64(mm + 24 * i + 8, map[i].size);
		put32(mm + 24 * i + 16, map[i].type);
	}
	put64(si + 40, FL_MEMMAP_GPA);
	put32(si + 48, n);
	return 0;
}

static int write_zero_page(struct fl_vm *vm, const uint8_t *img, const struct fl_image_info *info,
			   uint64_t rsdp, uint64_t initrd, uint64_t initrd_size)
{
	uint8_t *zp = fl_mem_ptr(&vm->mem, FL_ZERO_PAGE_GPA, 4096);
	struct e820 map[8];
	uint32_t n = memory_map(&vm->mem, map);

	if (!zp)
		return fl_fail(vm, EINVAL, "no RAM for the zero page");
	memset(zp, 0, 4096);
	if (info->kind == FL_IMAGE_BZIMAGE) {
		uint32_t hdr_end = BP_HEADER + img[BP_JUMP + 1]; /* checked by the parser */
		memcpy(zp + BP_SETUP_SECTS, img + BP_SETUP_SECTS, hdr_end - BP_SETUP_SECTS);
		put32(zp + BP_CODE32_START, (uint32_t)FL_KERNEL_GPA);
	} else {
		/* vmlinux: no setup header of its own; describe a minimal one. */
		put16(zp + BP_BOOT_FLAG, 0xaa55);
		memcpy(zp + BP_HEADER, "HdrS", 4);
		put16(zp + BP_VERSION, 0x020c);
		put32(zp + BP_KERNEL_ALIGN, 0x1000000);
		put32(zp + BP_CMDLINE_SIZE, FL_MAX_CMDLINE - 1);
	}
	zp[BP_TYPE_OF_LOADER] = 0xff;
	zp[BP_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP;
	put16(zp + BP_HEAP_END, 0xfe00);
	put32(zp + BP_CMDLINE_PTR, (uint32_t)FL_CMDLINE_GPA);
	put32(zp + BP_RAMDISK_IMAGE, (uint32_t)initrd);
	put32(zp + BP_RAMDISK_SIZE, (uint32_t)initrd_size);
	put64(zp + BP_ACPI_RSDP, rsdp);
	zp[BP_E820_COUNT] = (uint8_t)n;
	for (uint32_t i = 0; i < n; i++) {
		put64(zp + BP_E820_TABLE + 20 * i, map[i].addr);
		put64(zp + BP_E820_TABLE + 20 * i + 8, map[i].size);
		put32(zp + BP_E820_TABLE + 20 * i + 16, map[i].type);
	}
	return 0;
}

int fl_boot_load(struct fl_vm *vm, const struct fl_config *cfg, uint64_t rsdp,
		 struct fl_boot *boot)
{
	struct fl_image_info info;
	const char *cmdline = cfg->cmdline ? cfg->cmdline : "";
	size_t cmdlen = strlen(cmdline), len;
	uint64_t initrd = 0, initrd_size = 0;
	uint8_t *img, *dst;
	int rc;

	rc = read_file(vm, "kernel", cfg->kernel_path, MAX_IMAGE_BYTES, &img, &len);
	if (rc < 0)
		return rc;
	rc = fl_image_parse(img, len, &info, vm->err, sizeof(vm->err));
	if (rc < 0) {
		char why[200];
		memcpy(why, vm->err, sizeof(why));
		why[sizeof(why) - 1] = 0;
		fl_fail(vm, -rc, "kernel %s: %s", cfg->kernel_path, why);
		goto out;
	}
	if (info.load_end > vm->mem.low_size) {
		rc = fl_fail(vm, EINVAL, "kernel %s needs RAM up to 0x%llx; the machine has %llu MiB",
			     cfg->kernel_path, (unsigned long long)info.load_end,
			     (unsigned long long)(vm->mem.size >> 20));
		goto out;
	}
	if (info.kind == FL_IMAGE_BZIMAGE) {
		uint32_t setup_bytes = ((img[BP_SETUP_SECTS] ? img[BP_SETUP_SECTS] : 4) + 1) * 512;
		dst = fl_mem_ptr(&vm->mem, FL_KERNEL_GPA, len - setup_bytes);
		memcpy(dst, img + setup_bytes, len - setup_bytes);
		if (info.cmdline_size && cmdlen > info.cmdline_size) {
			rc = fl_fail(vm, EINVAL, "command line is %zu bytes; the kernel takes %u",
				     cmdlen, info.cmdline_size);
			goto out;
		}
	} else {
		rc = load_segments(vm, img, len, &info);
		if (rc < 0)
			goto out;
	}
	dst = fl_mem_ptr(&vm->mem, FL_CMDLINE_GPA, cmdlen + 1);
	memcpy(dst, cmdline, cmdlen + 1);
	if (cfg->initrd_path) {
		rc = load_initrd(vm, cfg->initrd_path, info.load_end,
				 info.kind == FL_IMAGE_BZIMAGE ? info.initrd_addr_max : 0, &initrd,
				 &initrd_size);
		if (rc < 0)
			goto out;
	}
	if (info.kind == FL_IMAGE_PVH) {
		rc = write_start_info(vm, rsdp, initrd, initrd_size);
		boot->boot_info = FL_START_INFO_GPA;
	} else {
		rc = write_zero_page(vm, img, &info, rsdp, initrd, initrd_size);
		boot->boot_info = FL_ZERO_PAGE_GPA;
	}
	boot->kind = info.kind;
	boot->entry = info.entry;
out:
	free(img);
	return rc;
}

/*
 * libFuzzer target for the kernel loader (native/x86/boot.c): the kernel and initrd a member
 * uploads. All of fl_boot_load runs on them, reading both from memfds (as it reads any file)
 * into a small guest RAM, so the parser (bzImage setup header, vmlinux ELF64, PVH ELF with
 * its Xen note) and the loader that trusts the parser's answers are both checked.
 *
 * Input: flags (bit 0: an initrd; bits 1-2: RAM of 4, 8, 16 or 32 MiB), command-line length
 * (1 byte), initrd length (2 bytes), then the command line, the initrd and the kernel image.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../vmm.h"
#include "../x86/layout.h"
#include "input.h"

static int memfd_with(int *fd, const uint8_t *data, size_t len, char *path, size_t pathlen)
{
	if (*fd < 0) {
		*fd = memfd_create("fuzz-image", MFD_CLOEXEC);
		if (*fd < 0)
			return -1;
	}
	if (ftruncate(*fd, 0) < 0 || (len && pwrite(*fd, data, len, 0) != (ssize_t)len))
		return -1;
	snprintf(path, pathlen, "/proc/self/fd/%d", *fd);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int kernel_fd = -1, initrd_fd = -1;
	static struct fl_vm vm;
	static struct fl_mem ram[4];
	char kernel_path[64], initrd_path[64], cmdline[256];
	struct fz_input in = {data, size};
	struct fl_config cfg;
	struct fl_boot boot;
	size_t got;

	uint32_t flags = (uint32_t)fz_take(&in, 1);
	size_t cmdlen = (size_t)fz_take(&in, 1);
	size_t initrd_len = (size_t)fz_take(&in, 2);
	const uint8_t *p = fz_bytes(&in, cmdlen, &got);
	memcpy(cmdline, p, got);
	cmdline[got] = 0;
	const uint8_t *initrd = fz_bytes(&in, initrd_len, &initrd_len);

	unsigned r = (flags >> 1) & 3;
	if (!ram[r].host && fl_mem_init(&ram[r], (4ULL << r) * FL_MIB, 0, vm.err, sizeof(vm.err)))
		abort(); /* the harness, not the target, failed */
	vm.mem = ram[r];
	if (memfd_with(&kernel_fd, in.p, in.n, kernel_path, sizeof(kernel_path)) < 0 ||
	    memfd_with(&initrd_fd, initrd, initrd_len, initrd_path, sizeof(initrd_path)) < 0)
		abort();

	memset(&cfg, 0, sizeof(cfg));
	cfg.kernel_path = kernel_path;
	cfg.initrd_path = (flags & 1) ? initrd_path : NULL;
	cfg.cmdline = cmdline;
	memset(&boot, 0, sizeof(boot));
	if (fl_boot_load(&vm, &cfg, FL_ACPI_GPA, &boot) < 0) {
		/* Refusals must say why. */
		if (!vm.err[0])
			__builtin_trap();
		vm.err[0] = 0;
		return 0;
	}
	/* What the vCPU would be started at must be RAM the image was loaded into. */
	if (boot.kind < FL_IMAGE_PVH || boot.kind > FL_IMAGE_VMLINUX ||
	    boot.entry < FL_KERNEL_GPA || boot.entry >= vm.mem.low_size ||
	    (boot.boot_info != FL_START_INFO_GPA && boot.boot_info != FL_ZERO_PAGE_GPA))
		__builtin_trap();
	return 0;
}

/* Guest RAM: one host mapping, split into a low slot and a slot above 4 GiB. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/kvm.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vmm.h"

#define HUGE_ALIGN (2ull << 20)

/*
 * mmap at a 2 MiB-aligned address. KVM maps guest RAM with 2 MiB pages only where the host
 * address and the guest-physical one agree modulo 2 MiB (and the host page is huge); RAM
 * at any other address costs a nested page fault and a TLB entry per 4 KiB even where the
 * kernel backs it with transparent huge pages. Guest-physical 0 and 4 GiB are aligned, so
 * an aligned start aligns both slots. QEMU aligns its RAM the same way.
 */
static void *map_aligned(uint64_t size, int prot, int flags, int fd)
{
	uint64_t span = size + HUGE_ALIGN;
	uint8_t *base, *start;

	base = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (base == MAP_FAILED)
		return MAP_FAILED;
	start = (uint8_t *)(((uintptr_t)base + HUGE_ALIGN - 1) & ~(uintptr_t)(HUGE_ALIGN - 1));
	if (mmap(start, size, prot, flags | MAP_FIXED, fd, 0) == MAP_FAILED) {
		int e = errno;
		munmap(base, span);
		errno = e;
		return MAP_FAILED;
	}
	if (start > base)
		munmap(base, (size_t)(start - base));
	if (base + span > start + size)
		munmap(start + size, (size_t)(base + span - (start + size)));
	return start;
}

int fl_mem_init(struct fl_mem *mem, uint64_t size, int use_memfd, char *err, size_t errlen)
{
	int fd = -1;
	void *p;

	memset(mem, 0, sizeof(*mem));
	mem->memfd = -1;
	mem->file_fd = -1;
	if (use_memfd) {
		fd = memfd_create("flotilla-ram", MFD_CLOEXEC);
		if (fd < 0)
			return fl_errf(err, errlen, errno, "memfd_create: %s", strerror(errno));
		if (ftruncate(fd, (off_t)size) < 0) {
			int e = errno;
			close(fd);
			return fl_errf(err, errlen, e, "sizing guest RAM memfd: %s", strerror(e));
		}
		p = map_aligned(size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd);
	} else {
		p = map_aligned(size, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1);
	}
	if (p == MAP_FAILED) {
		int e = errno;
		if (fd >= 0)
			close(fd);
		return fl_errf(err, errlen, e, "mapping %llu MiB of guest RAM: %s",
			       (unsigned long long)(size >> 20), strerror(e));
	}
	/* Huge pages even where the host's policy gives them only on request (THP `madvise`)
	 * and with compaction at the fault where none is free, as QEMU asks for its RAM;
	 * best effort (a kernel without THP refuses, and 4 KiB pages work). */
	(void)madvise(p, size, MADV_HUGEPAGE);
	mem->host = p;
	mem->size = size;
	mem->low_size = size < FL_LOW_RAM_MAX ? size : FL_LOW_RAM_MAX;
	mem->memfd = fd;
	return 0;
}

int fl_mem_init_file(struct fl_mem *mem, uint64_t size, int fd, char *err, size_t errlen)
{
	void *p;

	memset(mem, 0, sizeof(*mem));
	mem->memfd = -1;
	mem->file_fd = -1;
	/* MAP_PRIVATE: the guest's writes stay in this process, the file is never changed. */
	p = map_aligned(size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd);
	if (p == MAP_FAILED) {
		int e = errno;
		close(fd);
		return fl_errf(err, errlen, e, "mapping %llu MiB of guest RAM from the memory file: %s",
			       (unsigned long long)(size >> 20), strerror(e));
	}
	mem->host = p;
	mem->size = size;
	mem->low_size = size < FL_LOW_RAM_MAX ? size : FL_LOW_RAM_MAX;
	mem->file_fd = fd;
	return 0;
}

void fl_mem_fini(struct fl_mem *mem)
{
	if (mem->host)
		munmap(mem->host, mem->size);
	if (mem->memfd >= 0)
		close(mem->memfd);
	if (mem->file_fd >= 0)
		close(mem->file_fd);
	mem->host = NULL;
	mem->memfd = -1;
	mem->file_fd = -1;
}

int fl_mem_register(struct fl_mem *mem, int vm_fd, char *err, size_t errlen)
{
	uint32_t flags = mem->log_dirty ? KVM_MEM_LOG_DIRTY_PAGES : 0;
	struct kvm_userspace_memory_region low = {
		.slot = 0,
		.flags = flags,
		.guest_phys_addr = 0,
		.memory_size = mem->low_size,
		.userspace_addr = (uint64_t)(uintptr_t)mem->host,
	};
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &low) < 0)
		return fl_errf(err, errlen, errno, "KVM_SET_USER_MEMORY_REGION (low): %s",
			       strerror(errno));
	if (mem->size > mem->low_size) {
		struct kvm_userspace_memory_region high = {
			.slot = 1,
			.flags = flags,
			.guest_phys_addr = FL_HIGH_RAM_BASE,
			.memory_size = mem->size - mem->low_size,
			.userspace_addr = (uint64_t)(uintptr_t)(mem->host + mem->low_size),
		};
		if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &high) < 0)
			return fl_errf(err, errlen, errno, "KVM_SET_USER_MEMORY_REGION (high): %s",
				       strerror(errno));
	}
	return 0;
}

void *fl_mem_ptr(const struct fl_mem *mem, uint64_t gpa, uint64_t len)
{
	uint64_t high = mem->size - mem->low_size;

	if (!mem->host)
		return NULL;
	if (gpa < mem->low_size && len <= mem->low_size - gpa)
		return mem->host + gpa;
	if (gpa >= FL_HIGH_RAM_BASE && gpa - FL_HIGH_RAM_BASE < high &&
	    len <= high - (gpa - FL_HIGH_RAM_BASE))
		return mem->host + mem->low_size + (gpa - FL_HIGH_RAM_BASE);
	return NULL;
}

int fl_mem_log_dirty(struct fl_mem *mem, int vm_fd, char *err, size_t errlen)
{
	int rc;

	if (mem->log_dirty)
		return 0;
	mem->log_dirty = 1;
	rc = fl_mem_register(mem, vm_fd, err, errlen);
	if (rc < 0) {
		mem->log_dirty = 0;
		fl_mem_register(mem, vm_fd, NULL, 0);
	}
	return rc;
}

static int collect_slot(int vm_fd, uint32_t slot, uint64_t pages, uint64_t *bitmap,
			uint64_t first, char *err, size_t errlen)
{
	uint64_t words = (pages + 63) / 64;
	uint64_t *log = calloc(words, sizeof(uint64_t));
	struct kvm_dirty_log d = {.slot = slot};

	if (!log)
		return fl_errf(err, errlen, ENOMEM, "dirty log buffer");
	d.dirty_bitmap = log;
	if (ioctl(vm_fd, KVM_GET_DIRTY_LOG, &d) < 0) {
		int e = errno;
		free(log);
		return fl_errf(err, errlen, e, "KVM_GET_DIRTY_LOG (slot %u): %s", slot, strerror(e));
	}
	/* Slots start on a 64-page boundary (RAM sizes are whole MiB). */
	for (uint64_t w = 0; w < words; w++)
		bitmap[first / 64 + w] |= log[w];
	free(log);
	return 0;
}

int fl_mem_collect_dirty(struct fl_mem *mem, int vm_fd, uint64_t *bitmap, char *err,
			 size_t errlen)
{
	uint64_t low_pages = mem->low_size / 4096;
	int rc;

	if (!mem->log_dirty)
		return fl_errf(err, errlen, EINVAL, "dirty logging is off");
	rc = collect_slot(vm_fd, 0, low_pages, bitmap, 0, err, errlen);
	if (rc == 0 && mem->size > mem->low_size)
		rc = collect_slot(vm_fd, 1, (mem->size - mem->low_size) / 4096, bitmap, low_pages,
				  err, errlen);
	return rc;
}

/* Guest RAM: one host mapping, split into a low slot and a slot above 4 GiB. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/kvm.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vmm.h"

int fl_mem_init(struct fl_mem *mem, uint64_t size, int use_memfd, char *err, size_t errlen)
{
	int fd = -1;
	void *p;

	memset(mem, 0, sizeof(*mem));
	mem->memfd = -1;
	if (use_memfd) {
		fd = memfd_create("flotilla-ram", MFD_CLOEXEC);
		if (fd < 0)
			return fl_errf(err, errlen, errno, "memfd_create: %s", strerror(errno));
		if (ftruncate(fd, (off_t)size) < 0) {
			int e = errno;
			close(fd);
			return fl_errf(err, errlen, e, "sizing guest RAM memfd: %s", strerror(e));
		}
		p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
	} else {
		p = mmap(NULL, size, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	}
	if (p == MAP_FAILED) {
		int e = errno;
		if (fd >= 0)
			close(fd);
		return fl_errf(err, errlen, e, "mapping %llu MiB of guest RAM: %s",
			       (unsigned long long)(size >> 20), strerror(e));
	}
	mem->host = p;
	mem->size = size;
	mem->low_size = size < FL_LOW_RAM_MAX ? size : FL_LOW_RAM_MAX;
	mem->memfd = fd;
	return 0;
}

void fl_mem_fini(struct fl_mem *mem)
{
	if (mem->host)
		munmap(mem->host, mem->size);
	if (mem->memfd >= 0)
		close(mem->memfd);
	mem->host = NULL;
	mem->memfd = -1;
}

int fl_mem_register(struct fl_mem *mem, int vm_fd, char *err, size_t errlen)
{
	struct kvm_userspace_memory_region low = {
		.slot = 0,
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

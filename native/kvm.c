/* /dev/kvm: open, check capabilities, create the VM with its in-kernel irqchip and PIT. */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "vmm.h"

/* Below the 4 GiB boundary, outside RAM and the APIC ranges (as QEMU and Firecracker). */
#define FL_KVM_IDENTITY_MAP 0xfffbc000ULL
#define FL_KVM_TSS 0xfffbd000ULL

int fl_errf(char *buf, size_t len, int err, const char *fmt, ...)
{
	va_list ap;

	if (buf && len) {
		va_start(ap, fmt);
		vsnprintf(buf, len, fmt, ap);
		va_end(ap);
	}
	return err > 0 ? -err : (err == 0 ? -EIO : err);
}

int fl_fail(struct fl_vm *vm, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(vm->err, sizeof(vm->err), fmt, ap);
	va_end(ap);
	return err > 0 ? -err : (err == 0 ? -EIO : err);
}

static const struct {
	int cap;
	const char *name;
} required_caps[] = {
	{KVM_CAP_IRQCHIP, "IRQCHIP"},
	{KVM_CAP_PIT2, "PIT2"},
	{KVM_CAP_USER_MEMORY, "USER_MEMORY"},
	{KVM_CAP_SET_TSS_ADDR, "SET_TSS_ADDR"},
	{KVM_CAP_SET_IDENTITY_MAP_ADDR, "SET_IDENTITY_MAP_ADDR"},
	{KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT"},
	{KVM_CAP_EXT_CPUID, "EXT_CPUID"},
};

static int kvm_open(char *err, size_t errlen, int *kvm_fd_out)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	int version;

	if (fd < 0)
		return fl_errf(err, errlen, errno, "cannot open /dev/kvm: %s", strerror(errno));
	version = ioctl(fd, KVM_GET_API_VERSION, 0);
	if (version != KVM_API_VERSION) {
		close(fd);
		return fl_errf(err, errlen, ENODEV, "KVM API version %d, expected %d", version,
			       KVM_API_VERSION);
	}
	for (size_t i = 0; i < sizeof(required_caps) / sizeof(required_caps[0]); i++) {
		if (ioctl(fd, KVM_CHECK_EXTENSION, required_caps[i].cap) <= 0) {
			close(fd);
			return fl_errf(err, errlen, ENOTSUP, "KVM lacks capability %s",
				       required_caps[i].name);
		}
	}
	*kvm_fd_out = fd;
	return 0;
}

static int create_vm(int kvm_fd, char *err, size_t errlen)
{
	int fd;

	do
		fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	while (fd < 0 && errno == EINTR);
	if (fd < 0)
		return fl_errf(err, errlen, errno, "KVM_CREATE_VM: %s", strerror(errno));
	return fd;
}

int fl_kvm_probe(char *err, size_t errlen)
{
	int kvm_fd, vm_fd, rc;

	rc = kvm_open(err, errlen, &kvm_fd);
	if (rc < 0)
		return rc;
	vm_fd = create_vm(kvm_fd, err, errlen);
	if (vm_fd < 0) {
		close(kvm_fd);
		return vm_fd;
	}
	close(vm_fd);
	close(kvm_fd);
	return 0;
}

/* Opens KVM and creates the VM; on failure leaves vm->kvm_fd/vm_fd at -1. */
int fl_kvm_create(struct fl_vm *vm)
{
	uint64_t ident = FL_KVM_IDENTITY_MAP;
	int max, rc;

	rc = kvm_open(vm->err, sizeof(vm->err), &vm->kvm_fd);
	if (rc < 0)
		goto fail;
	max = ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS);
	if (max <= 0)
		max = ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_VCPUS);
	if (max > 0 && vm->nvcpus > (uint32_t)max) {
		rc = fl_fail(vm, EINVAL, "%u vCPUs requested; KVM allows at most %d", vm->nvcpus,
			     max);
		goto close_kvm;
	}
	rc = create_vm(vm->kvm_fd, vm->err, sizeof(vm->err));
	if (rc < 0)
		goto close_kvm;
	vm->vm_fd = rc;
	/* Both must precede the first vCPU. */
	if (ioctl(vm->vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &ident) < 0) {
		rc = fl_fail(vm, errno, "KVM_SET_IDENTITY_MAP_ADDR: %s", strerror(errno));
		goto close_vm;
	}
	if (ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, (unsigned long)FL_KVM_TSS) < 0) {
		rc = fl_fail(vm, errno, "KVM_SET_TSS_ADDR: %s", strerror(errno));
		goto close_vm;
	}
	return 0;

close_vm:
	close(vm->vm_fd);
	vm->vm_fd = -1;
close_kvm:
	close(vm->kvm_fd);
fail:
	vm->kvm_fd = -1;
	return rc;
}

/*
 * The in-kernel irqchip and PIT. Called after guest RAM is registered: a memory slot added
 * after the irqchip waits out an SRCU grace period (~7 ms on a nested host), one added before
 * does not. Must precede the first vCPU.
 */
int fl_kvm_create_irqchip(struct fl_vm *vm)
{
	struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};

	if (ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
		return fl_fail(vm, errno, "KVM_CREATE_IRQCHIP: %s", strerror(errno));
	if (ioctl(vm->vm_fd, KVM_CREATE_PIT2, &pit) < 0)
		return fl_fail(vm, errno, "KVM_CREATE_PIT2: %s", strerror(errno));
	return 0;
}

void fl_kvm_destroy(struct fl_vm *vm)
{
	if (vm->vm_fd >= 0)
		close(vm->vm_fd);
	if (vm->kvm_fd >= 0)
		close(vm->kvm_fd);
	vm->vm_fd = vm->kvm_fd = -1;
}

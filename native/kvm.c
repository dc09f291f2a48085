/*
 * /dev/kvm: open, check capabilities, create the VM with a split irqchip (local APICs in the
 * kernel, the IOAPIC in x86/ioapic.c, no PIC, no PIT), and carry the IOAPIC's interrupts to
 * KVM as MSIs and MSI routes.
 */
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
	{KVM_CAP_SPLIT_IRQCHIP, "SPLIT_IRQCHIP"},
	{KVM_CAP_IRQ_ROUTING, "IRQ_ROUTING"},
	{KVM_CAP_SIGNAL_MSI, "SIGNAL_MSI"},
	{KVM_CAP_IRQFD, "IRQFD"},
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
 * The split irqchip: KVM emulates the local APICs and leaves the IOAPIC to us, with GSIs
 * 0..23 reserved for its pins (KVM derives the EOI-exit vectors from their routes). No PIT
 * and no PICs: closing a VM with them waits out SRCU grace periods (~15-23 ms on a nested
 * host), without them ~0.1 ms. Called after guest RAM is registered (a slot added after
 * irq routing exists waits for a grace period too); must precede the first vCPU.
 */
int fl_kvm_create_irqchip(struct fl_vm *vm)
{
	struct kvm_enable_cap cap = {.cap = KVM_CAP_SPLIT_IRQCHIP, .args = {FL_IOAPIC_PINS}};

	if (ioctl(vm->vm_fd, KVM_ENABLE_CAP, &cap) < 0)
		return fl_fail(vm, errno, "KVM_ENABLE_CAP(SPLIT_IRQCHIP): %s", strerror(errno));
	return 0;
}

/* fl_msi_sink.deliver: one interrupt now, to whichever local APICs the MSI names. */
void fl_kvm_signal_msi(void *ctx, const struct fl_msi *m)
{
	struct fl_vm *vm = ctx;
	struct kvm_msi msi = {.address_lo = m->address, .data = m->data};

	/* 0 means no APIC accepted it (masked or absent destination): the guest's choice. */
	if (ioctl(vm->vm_fd, KVM_SIGNAL_MSI, &msi) < 0)
		__atomic_add_fetch(&vm->irq_errors, 1, __ATOMIC_RELAXED);
}

/*
 * fl_msi_sink.routes: the GSI routing table is GSI n -> pin n's MSI, for the pins that have
 * a route. KVM_SET_GSI_ROUTING replaces the whole table (and waits for an SRCU grace
 * period), so the IOAPIC calls this only when a route really changed.
 */
void fl_kvm_set_routes(void *ctx, const struct fl_msi *msi, const uint8_t *present, uint32_t n)
{
	struct fl_vm *vm = ctx;
	struct {
		struct kvm_irq_routing table;
		struct kvm_irq_routing_entry entries[FL_IOAPIC_PINS];
	} r;

	memset(&r, 0, sizeof(r));
	for (uint32_t gsi = 0; gsi < n && gsi < FL_IOAPIC_PINS; gsi++) {
		if (!present[gsi])
			continue;
		struct kvm_irq_routing_entry *e = &r.entries[r.table.nr++];
		e->gsi = gsi;
		e->type = KVM_IRQ_ROUTING_MSI;
		e->u.msi.address_lo = msi[gsi].address;
		e->u.msi.data = msi[gsi].data;
	}
	if (ioctl(vm->vm_fd, KVM_SET_GSI_ROUTING, &r.table) < 0)
		__atomic_add_fetch(&vm->irq_errors, 1, __ATOMIC_RELAXED);
}

/*
 * Binds an eventfd to GSI gsi (an IOAPIC pin): each write to it is an edge on that pin,
 * delivered by KVM without leaving the kernel while the pin is unmasked, and dropped while
 * it is masked (as the IOAPIC drops a masked edge). For devices that signal from their own
 * threads (virtio queues).
 */
int fl_kvm_irqfd_bind(struct fl_vm *vm, uint32_t gsi, int fd)
{
	struct kvm_irqfd irqfd = {.fd = (uint32_t)fd, .gsi = gsi};
	int rc;

	if (gsi >= FL_IOAPIC_PINS || fd < 0)
		return fl_fail(vm, EINVAL, "no GSI %u for an irqfd", gsi);
	rc = fl_ioapic_want_route(&vm->ioapic, gsi, 1);
	if (rc < 0)
		return fl_fail(vm, -rc, "GSI %u", gsi);
	if (ioctl(vm->vm_fd, KVM_IRQFD, &irqfd) < 0) {
		rc = fl_fail(vm, errno, "KVM_IRQFD(GSI %u): %s", gsi, strerror(errno));
		fl_ioapic_want_route(&vm->ioapic, gsi, 0);
		return rc;
	}
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

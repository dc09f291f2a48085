/*
 * CPUID: what KVM supports, minus what the host cannot give the guest (LA57; the
 * IA32_ARCH_CAPABILITIES MSR, which PVM refuses), plus per-vCPU APIC ids and topology; and
 * the XCR0 that goes with its leaf 0xD.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "../vmm.h"

#define CPUID_MAX_ENTRIES 1024

static uint32_t ceil_log2(uint32_t n)
{
	uint32_t s = 0;

	while ((1u << s) < n)
		s++;
	return s;
}

int fl_cpuid_init(struct fl_vm *vm)
{
	struct kvm_cpuid2 *c = NULL;

	for (uint32_t n = 128; n <= CPUID_MAX_ENTRIES; n *= 2) {
		free(c);
		c = calloc(1, sizeof(*c) + n * sizeof(struct kvm_cpuid_entry2));
		if (!c)
			return fl_fail(vm, ENOMEM, "allocating CPUID entries");
		c->nent = n;
		if (ioctl(vm->kvm_fd, KVM_GET_SUPPORTED_CPUID, c) == 0)
			break;
		if (errno != E2BIG || n == CPUID_MAX_ENTRIES) {
			int e = errno;
			free(c);
			return fl_fail(vm, e, "KVM_GET_SUPPORTED_CPUID: %s", strerror(e));
		}
	}
	for (uint32_t i = 0; i < c->nent; i++) {
		struct kvm_cpuid_entry2 *e = &c->entries[i];
		if (e->function == 1)
			e->ecx |= 1u << 31; /* running under a hypervisor */
		if (e->function == 7 && e->index == 0) {
			e->ecx &= ~(1u << 16); /* LA57 */
			e->edx &= ~(1u << 29); /* ARCH_CAPABILITIES (MSR 0x10a) */
		}
	}
	vm->cpuid = c;
	return 0;
}

/*
 * XCR0 starts as the user state components leaf 0xD offers (what Linux enables), not x87
 * alone. KVM computes leaf 0xD's EBX (the XSAVE area size for XCR0) from the XCR0 it knows
 * about; where XSETBV does not exit to it (nested under QEMU's TCG, which ignores the SVM
 * intercept) the guest's XCR0 and KVM's would disagree and so would the sizes Linux checks
 * ("XSAVE consistency problem"). Where XSETBV does exit, the guest's value replaces this.
 */
static int xcr0_init(struct fl_vm *vm, struct fl_vcpu *vcpu, const struct kvm_cpuid2 *c)
{
	struct kvm_xcrs xcrs = {.nr_xcrs = 1};
	int xsave = 0;
	uint64_t mask = 0;

	for (uint32_t i = 0; i < c->nent; i++) {
		const struct kvm_cpuid_entry2 *e = &c->entries[i];
		if (e->function == 1)
			xsave = (e->ecx >> 26) & 1;
		if (e->function == 0xd && e->index == 0)
			mask = ((uint64_t)e->edx << 32) | e->eax;
	}
	if (!xsave || !(mask & 1))
		return 0;
	xcrs.xcrs[0].xcr = 0;
	xcrs.xcrs[0].value = mask;
	if (ioctl(vcpu->fd, KVM_SET_XCRS, &xcrs) < 0)
		return fl_fail(vm, errno, "KVM_SET_XCRS (XCR0 0x%llx) on vCPU %u: %s",
			       (unsigned long long)mask, vcpu->id, strerror(errno));
	return 0;
}

/*
 * The hypervisor timing leaf (0x40000010, as QEMU and VMware give it): EAX the TSC's
 * frequency in kHz, EBX the local APIC timer's (KVM's counts at 1 GHz), so a guest needs
 * no calibration loop (our test guest's took 2 ms of every boot that uses interrupts).
 * Added to the vCPU's copy only: the CPUID a snapshot's checksum covers is KVM's, as
 * before, and a saved guest restores onto a host whose TSC runs at another rate as it did.
 */
#define KVM_CPUID_SIGNATURE 0x40000000u
#define CPUID_TIMING_LEAF 0x40000010u
#define KVM_APIC_BUS_KHZ 1000000u

static void add_timing_leaf(struct fl_vcpu *vcpu, struct kvm_cpuid2 *c)
{
	struct kvm_cpuid_entry2 *sig = NULL;
	int khz = ioctl(vcpu->fd, KVM_GET_TSC_KHZ, 0);

	for (uint32_t i = 0; i < c->nent; i++) {
		if (c->entries[i].function == CPUID_TIMING_LEAF)
			return; /* KVM gives it already */
		if (c->entries[i].function == KVM_CPUID_SIGNATURE)
			sig = &c->entries[i];
	}
	if (!sig || khz <= 0)
		return; /* not KVM's leaves, or a TSC rate KVM does not know: calibrate */
	if (sig->eax < CPUID_TIMING_LEAF)
		sig->eax = CPUID_TIMING_LEAF;
	c->entries[c->nent++] = (struct kvm_cpuid_entry2){
		.function = CPUID_TIMING_LEAF,
		.eax = (uint32_t)khz,
		.ebx = KVM_APIC_BUS_KHZ,
	};
}

int fl_cpuid_apply(struct fl_vm *vm, struct fl_vcpu *vcpu)
{
	const struct kvm_cpuid2 *src = vm->cpuid;
	size_t bytes = sizeof(*src) + src->nent * sizeof(struct kvm_cpuid_entry2);
	/* Room for the timing leaf. */
	struct kvm_cpuid2 *c = malloc(bytes + sizeof(struct kvm_cpuid_entry2));
	uint32_t apic_id = vcpu->id, n = vm->nvcpus, shift = ceil_log2(vm->nvcpus);
	int rc = 0;

	if (!c)
		return fl_fail(vm, ENOMEM, "allocating CPUID entries");
	memcpy(c, src, bytes);
	add_timing_leaf(vcpu, c);
	/* One package, one core per vCPU, no SMT. */
	for (uint32_t i = 0; i < c->nent; i++) {
		struct kvm_cpuid_entry2 *e = &c->entries[i];
		switch (e->function) {
		case 1:
			e->ebx = (e->ebx & 0x0000ffffu) | (apic_id << 24) | ((n & 0xff) << 16);
			if (n > 1)
				e->edx |= 1u << 28; /* HTT: the count field is valid */
			break;
		case 4:
			if ((e->eax & 0x1f) == 0) /* no more cache levels */
				break;
			e->eax = (e->eax & 0x3fff) | (((n - 1) & 0x3f) << 26);
			break;
		case 0xb:
		case 0x1f:
			if (e->index == 0) { /* SMT level: one thread */
				e->eax = 0;
				e->ebx = 1;
				e->ecx = (1u << 8) | 0;
			} else if (e->index == 1) { /* core level: the package */
				e->eax = shift;
				e->ebx = n;
				e->ecx = (2u << 8) | 1;
			} else {
				e->eax = 0;
				e->ebx = 0;
				e->ecx = e->index;
			}
			e->edx = apic_id;
			break;
		default:
			break;
		}
	}
	if (ioctl(vcpu->fd, KVM_SET_CPUID2, c) < 0)
		rc = fl_fail(vm, errno, "KVM_SET_CPUID2 on vCPU %u: %s", vcpu->id, strerror(errno));
	else
		rc = xcr0_init(vm, vcpu, c);
	free(c);
	return rc;
}

/*
 * A vCPU's architectural state as one blob: the groundwork for snapshots and migration.
 * Saved and restored only while the machine is paused (every vCPU parked outside KVM_RUN,
 * pending I/O completed). A blob handed back for restore is untrusted input.
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "../vmm.h"

#define STATE_MAGIC 0x464c5643u /* "FLVC" */
#define STATE_VERSION 1
#define MAX_SAVED_MSRS 32

/* MSRs outside regs/sregs that a running guest depends on; saved if KVM lists them. */
static const uint32_t wanted_msrs[] = {
	0x10,	    /* TSC */
	0x174,	    /* SYSENTER_CS */
	0x175,	    /* SYSENTER_ESP */
	0x176,	    /* SYSENTER_EIP */
	0x1a0,	    /* MISC_ENABLE */
	0x277,	    /* PAT */
	0x2ff,	    /* MTRR default type */
	0x6e0,	    /* TSC_DEADLINE */
	0xc0000081, /* STAR */
	0xc0000082, /* LSTAR */
	0xc0000083, /* CSTAR */
	0xc0000084, /* SFMASK */
	0xc0000102, /* KERNEL_GS_BASE */
	0xc0000103, /* TSC_AUX */
	0x4b564d00, /* kvmclock wall clock */
	0x4b564d01, /* kvmclock system time */
	0x4b564d02, /* async page fault */
	0x4b564d03, /* steal time */
	0x4b564d04, /* PV EOI */
};

struct vcpu_state {
	uint32_t magic;
	uint32_t version;
	uint32_t size;
	uint32_t nmsrs;
	struct kvm_mp_state mp;
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_fpu fpu;
	struct kvm_xsave xsave;
	struct kvm_xcrs xcrs;
	struct kvm_lapic_state lapic;
	struct kvm_vcpu_events events;
	struct kvm_msr_entry msrs[MAX_SAVED_MSRS];
};

int fl_vcpu_state_size(void)
{
	return (int)sizeof(struct vcpu_state);
}

/* Which of wanted_msrs KVM can save here (KVM_GET_MSR_INDEX_LIST). */
static int msr_list(struct fl_vm *vm, uint32_t *out)
{
	struct kvm_msr_list probe = {.nmsrs = 0}, *list;
	int n = 0;

	if (ioctl(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG)
		return fl_fail(vm, errno, "KVM_GET_MSR_INDEX_LIST: %s", strerror(errno));
	list = calloc(1, sizeof(*list) + probe.nmsrs * sizeof(uint32_t));
	if (!list)
		return fl_fail(vm, ENOMEM, "MSR index list");
	list->nmsrs = probe.nmsrs;
	if (ioctl(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, list) < 0) {
		int e = errno;
		free(list);
		return fl_fail(vm, e, "KVM_GET_MSR_INDEX_LIST: %s", strerror(e));
	}
	for (size_t i = 0; i < sizeof(wanted_msrs) / sizeof(wanted_msrs[0]); i++)
		for (uint32_t j = 0; j < list->nmsrs; j++)
			if (list->indices[j] == wanted_msrs[i]) {
				out[n++] = wanted_msrs[i];
				break;
			}
	free(list);
	return n;
}

static int check_paused(struct fl_vm *vm, uint32_t index, size_t len)
{
	if (fl_vm_state(vm) != FL_STATE_PAUSED)
		return fl_fail(vm, EINVAL, "vCPU state is saved and restored only while paused");
	if (index >= vm->nvcpus)
		return fl_fail(vm, EINVAL, "no vCPU %u (the machine has %u)", index, vm->nvcpus);
	if (len < sizeof(struct vcpu_state))
		return fl_fail(vm, EINVAL, "vCPU state buffer is %zu bytes; %zu needed", len,
			       sizeof(struct vcpu_state));
	return 0;
}

#define GET(req, field, what)                                                               \
	do {                                                                                \
		if (ioctl(fd, req, field) < 0) {                                            \
			rc = fl_fail(vm, errno, "%s on vCPU %u: %s", what, index,           \
				     strerror(errno));                                      \
			goto out;                                                           \
		}                                                                           \
	} while (0)

int fl_vcpu_save(struct fl_vm *vm, uint32_t index, void *buf, size_t len)
{
	int rc;

	if ((rc = check_paused(vm, index, len)) < 0)
		return rc;
	return fl_vcpu_state_get(vm, index, buf);
}

int fl_vcpu_state_get(struct fl_vm *vm, uint32_t index, void *buf)
{
	struct vcpu_state *st;
	struct kvm_msrs *msrs = NULL;
	uint32_t idx[MAX_SAVED_MSRS];
	int rc, n, fd;

	fd = vm->vcpus[index].fd;
	st = calloc(1, sizeof(*st));
	if (!st)
		return fl_fail(vm, ENOMEM, "vCPU state");
	st->magic = STATE_MAGIC;
	st->version = STATE_VERSION;
	st->size = sizeof(*st);
	GET(KVM_GET_MP_STATE, &st->mp, "KVM_GET_MP_STATE");
	GET(KVM_GET_REGS, &st->regs, "KVM_GET_REGS");
	GET(KVM_GET_SREGS, &st->sregs, "KVM_GET_SREGS");
	GET(KVM_GET_FPU, &st->fpu, "KVM_GET_FPU");
	GET(KVM_GET_XSAVE, &st->xsave, "KVM_GET_XSAVE");
	GET(KVM_GET_XCRS, &st->xcrs, "KVM_GET_XCRS");
	GET(KVM_GET_LAPIC, &st->lapic, "KVM_GET_LAPIC");
	GET(KVM_GET_VCPU_EVENTS, &st->events, "KVM_GET_VCPU_EVENTS");
	n = msr_list(vm, idx);
	if (n < 0) {
		rc = n;
		goto out;
	}
	msrs = calloc(1, sizeof(*msrs) + (size_t)n * sizeof(struct kvm_msr_entry));
	if (!msrs) {
		rc = fl_fail(vm, ENOMEM, "MSR buffer");
		goto out;
	}
	msrs->nmsrs = (uint32_t)n;
	for (int i = 0; i < n; i++)
		msrs->entries[i].index = idx[i];
	/* KVM_GET_MSRS stops at the first MSR it cannot read; keep what it read. */
	rc = ioctl(fd, KVM_GET_MSRS, msrs);
	if (rc < 0) {
		rc = fl_fail(vm, errno, "KVM_GET_MSRS on vCPU %u: %s", index, strerror(errno));
		goto out;
	}
	st->nmsrs = (uint32_t)rc;
	memcpy(st->msrs, msrs->entries, st->nmsrs * sizeof(struct kvm_msr_entry));
	memcpy(buf, st, sizeof(*st));
	rc = (int)sizeof(*st);
out:
	free(msrs);
	free(st);
	return rc;
}

#define SET(req, field, what)                                                               \
	do {                                                                                \
		if (ioctl(fd, req, field) < 0) {                                            \
			rc = fl_fail(vm, errno, "%s on vCPU %u: %s", what, index,           \
				     strerror(errno));                                      \
			goto out;                                                           \
		}                                                                           \
	} while (0)

int fl_vcpu_blob_check(const void *buf, size_t len)
{
	struct vcpu_state head;

	if (len != sizeof(struct vcpu_state))
		return -EINVAL;
	/* The fields up to the MSR count frame the blob; KVM checks the rest when it is set. */
	memcpy(&head, buf, offsetof(struct vcpu_state, mp));
	if (head.magic != STATE_MAGIC || head.version != STATE_VERSION ||
	    head.size != sizeof(struct vcpu_state) || head.nmsrs > MAX_SAVED_MSRS)
		return -EINVAL;
	return 0;
}

int fl_vcpu_restore(struct fl_vm *vm, uint32_t index, const void *buf, size_t len)
{
	int rc;

	if ((rc = check_paused(vm, index, len)) < 0)
		return rc;
	return fl_vcpu_state_put(vm, index, buf);
}

int fl_vcpu_state_put(struct fl_vm *vm, uint32_t index, const void *buf)
{
	struct vcpu_state *st;
	struct kvm_msrs *msrs = NULL;
	int rc, fd;

	fd = vm->vcpus[index].fd;
	if (fl_vcpu_blob_check(buf, sizeof(*st)) < 0)
		return fl_fail(vm, EINVAL, "not a vCPU state blob of version %d", STATE_VERSION);
	st = malloc(sizeof(*st));
	if (!st)
		return fl_fail(vm, ENOMEM, "vCPU state");
	memcpy(st, buf, sizeof(*st));
	/* Order as KVM needs it: sregs before regs (mode), LAPIC before events, MSRs late. */
	SET(KVM_SET_MP_STATE, &st->mp, "KVM_SET_MP_STATE");
	SET(KVM_SET_SREGS, &st->sregs, "KVM_SET_SREGS");
	SET(KVM_SET_REGS, &st->regs, "KVM_SET_REGS");
	SET(KVM_SET_FPU, &st->fpu, "KVM_SET_FPU");
	SET(KVM_SET_XSAVE, &st->xsave, "KVM_SET_XSAVE");
	SET(KVM_SET_XCRS, &st->xcrs, "KVM_SET_XCRS");
	SET(KVM_SET_LAPIC, &st->lapic, "KVM_SET_LAPIC");
	msrs = calloc(1, sizeof(*msrs) + st->nmsrs * sizeof(struct kvm_msr_entry));
	if (!msrs) {
		rc = fl_fail(vm, ENOMEM, "MSR buffer");
		goto out;
	}
	msrs->nmsrs = st->nmsrs;
	memcpy(msrs->entries, st->msrs, st->nmsrs * sizeof(struct kvm_msr_entry));
	rc = ioctl(fd, KVM_SET_MSRS, msrs);
	if (rc < 0 || (uint32_t)rc != st->nmsrs) {
		rc = fl_fail(vm, rc < 0 ? errno : EINVAL, "KVM_SET_MSRS on vCPU %u set %d of %u",
			     index, rc, st->nmsrs);
		goto out;
	}
	SET(KVM_SET_VCPU_EVENTS, &st->events, "KVM_SET_VCPU_EVENTS");
	rc = 0;
out:
	free(msrs);
	free(st);
	return rc;
}

/* ---- the vCPUs as text (fl_vm_describe_vcpus) ---- */

static uint32_t apic_reg(const struct kvm_lapic_state *l, uint32_t reg)
{
	uint32_t v;

	memcpy(&v, l->regs + reg, sizeof(v));
	return v;
}

/* The vectors set in a 256-bit local APIC register group (ISR 0x100, IRR 0x200). */
static void apic_vectors(struct fl_text *t, const struct kvm_lapic_state *l, uint32_t base)
{
	int first = 1;

	fl_text_put(t, "[");
	for (uint32_t i = 0; i < 8; i++) {
		uint32_t word = apic_reg(l, base + 0x10 * i);
		for (uint32_t b = 0; b < 32; b++)
			if (word >> b & 1) {
				fl_text_put(t, first ? "%u" : ", %u", 32 * i + b);
				first = 0;
			}
	}
	fl_text_put(t, "]");
}

static uint64_t saved_msr(const struct vcpu_state *st, uint32_t index)
{
	for (uint32_t i = 0; i < st->nmsrs && i < MAX_SAVED_MSRS; i++)
		if (st->msrs[i].index == index)
			return st->msrs[i].data;
	return 0;
}

static void describe_vcpu(struct fl_text *t, uint32_t index, const struct vcpu_state *st)
{
	static const char *mp[] = {"runnable", "uninitialized", "init-received", "halted", "sipi"};
	static const char *modes[] = {"one-shot", "periodic", "tsc-deadline", "reserved"};
	const struct kvm_lapic_state *l = &st->lapic;
	uint64_t rip = st->regs.rip, lstar = saved_msr(st, 0xc0000082);
	uint64_t deadline = saved_msr(st, 0x6e0), tsc = saved_msr(st, 0x10);
	uint32_t lvtt = apic_reg(l, 0x320);

	if (st->mp.mp_state < sizeof(mp) / sizeof(mp[0]))
		fl_text_put(t, "vCPU %u: %s rip=0x%llx ", index, mp[st->mp.mp_state],
			    (unsigned long long)rip);
	else
		fl_text_put(t, "vCPU %u: %u rip=0x%llx ", index, st->mp.mp_state,
			    (unsigned long long)rip);
	/* KASLR moves a kernel as a whole: against LSTAR (entry_SYSCALL_64) a kernel place can
	 * be looked up in the kernel's System.map. */
	if (lstar && rip >> 47)
		fl_text_put(t, "(entry_SYSCALL_64%c0x%llx) ", rip >= lstar ? '+' : '-',
			    (unsigned long long)(rip >= lstar ? rip - lstar : lstar - rip));
	else
		fl_text_put(t, "(?) ");
	fl_text_put(t, "if=%llu apic_id=%u tpr=%u irr=",
		    (unsigned long long)(st->regs.rflags >> 9 & 1), apic_reg(l, 0x20) >> 24,
		    apic_reg(l, 0x80));
	apic_vectors(t, l, 0x200);
	fl_text_put(t, " isr=");
	apic_vectors(t, l, 0x100);
	fl_text_put(t, " timer: lvtt=0x%x (%s%s) tmict=%u tmcct=%u deadline=", lvtt,
		    modes[lvtt >> 17 & 3], lvtt >> 16 & 1 ? ", masked" : "", apic_reg(l, 0x380),
		    apic_reg(l, 0x390));
	if (deadline)
		fl_text_put(t, "tsc%+lld\n", (long long)(deadline - tsc));
	else
		fl_text_put(t, "0\n");
}

int fl_vm_describe_vcpus(struct fl_vm *vm, char *buf, size_t len)
{
	struct fl_text t = {.buf = buf, .len = len, .used = 0};
	struct vcpu_state *st;
	int rc;

	if (!vm || !buf || len == 0)
		return -EINVAL;
	buf[0] = '\0';
	if (fl_vm_state(vm) != FL_STATE_PAUSED)
		return fl_fail(vm, EINVAL, "vCPUs are described only while paused");
	st = malloc(sizeof(*st));
	if (!st)
		return fl_fail(vm, ENOMEM, "vCPU state");
	for (uint32_t i = 0; i < vm->nvcpus; i++) {
		if ((rc = fl_vcpu_state_get(vm, i, st)) < 0) {
			free(st);
			return rc;
		}
		describe_vcpu(&t, i, st);
	}
	free(st);
	return (int)t.used;
}

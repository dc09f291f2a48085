/*
 * Initial vCPU state: the boot processor's registers for a PVH 32-bit entry or a Linux
 * 64-bit entry, and the local APIC's LINT pins. APs keep KVM's reset state and wait for
 * INIT/SIPI (KVM_MP_STATE_UNINITIALIZED).
 */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

#include "../vmm.h"
#include "layout.h"

#define GDT_CODE32 0x00cf9b000000ffffULL
#define GDT_CODE64 0x00af9b000000ffffULL
#define GDT_DATA 0x00cf93000000ffffULL
#define SEL_CODE 0x10
#define SEL_DATA 0x18

#define CR0_PE 0x1ULL
#define CR0_ET 0x10ULL
#define CR0_LINUX64 0x80050033ULL /* PG | AM | WP | NE | ET | MP | PE */
#define CR4_PAE 0x20ULL
#define EFER_LME_LMA 0x500ULL

#define APIC_LVT0 0x350
#define APIC_LVT1 0x360
#define APIC_MODE_NMI 0x4
#define APIC_MODE_EXTINT 0x7

static struct kvm_segment flat_segment(uint16_t sel, uint8_t type, int code64)
{
	return (struct kvm_segment){
		.base = 0,
		.limit = 0xffffffff,
		.selector = sel,
		.type = type,
		.present = 1,
		.dpl = 0,
		.db = code64 ? 0 : 1,
		.s = 1,
		.l = (uint8_t)code64,
		.g = 1,
	};
}

static int write_gdt(struct fl_vm *vm, int long_mode)
{
	uint64_t gdt[4] = {0, 0, long_mode ? GDT_CODE64 : GDT_CODE32, GDT_DATA};
	void *p = fl_mem_ptr(&vm->mem, FL_GDT_GPA, sizeof(gdt));

	if (!p)
		return fl_fail(vm, EINVAL, "no RAM for the boot GDT");
	memcpy(p, gdt, sizeof(gdt));
	return 0;
}

/* Identity-maps the first 4 GiB with 2 MiB pages. */
static int write_page_tables(struct fl_vm *vm)
{
	uint64_t *pml4 = fl_mem_ptr(&vm->mem, FL_PML4_GPA, 4096);
	uint64_t *pdpt = fl_mem_ptr(&vm->mem, FL_PDPT_GPA, 4096);
	uint64_t *pd = fl_mem_ptr(&vm->mem, FL_PD_GPA, 4 * 4096);

	if (!pml4 || !pdpt || !pd)
		return fl_fail(vm, EINVAL, "no RAM for the boot page tables");
	memset(pml4, 0, 4096);
	memset(pdpt, 0, 4096);
	pml4[0] = FL_PDPT_GPA | 0x3; /* present | writable */
	for (uint64_t i = 0; i < 4; i++)
		pdpt[i] = (FL_PD_GPA + i * 4096) | 0x3;
	for (uint64_t i = 0; i < 4 * 512; i++)
		pd[i] = (i << 21) | 0x83; /* present | writable | 2 MiB page */
	return 0;
}

int fl_boot_setup_bsp(struct fl_vm *vm, struct fl_vcpu *vcpu, const struct fl_boot *boot)
{
	int long_mode = boot->kind != FL_IMAGE_PVH;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_fpu fpu;
	int rc;

	rc = write_gdt(vm, long_mode);
	if (rc < 0)
		return rc;
	if (long_mode && (rc = write_page_tables(vm)) < 0)
		return rc;
	if (ioctl(vcpu->fd, KVM_GET_SREGS, &sregs) < 0)
		return fl_fail(vm, errno, "KVM_GET_SREGS: %s", strerror(errno));
	sregs.cs = flat_segment(SEL_CODE, 0xb, long_mode);
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = flat_segment(SEL_DATA, 0x3, 0);
	sregs.gdt.base = FL_GDT_GPA;
	sregs.gdt.limit = 4 * 8 - 1;
	sregs.idt.base = 0;
	sregs.idt.limit = 0;
	sregs.tr = (struct kvm_segment){.limit = 0x67, .type = 0xb, .present = 1};
	sregs.ldt = (struct kvm_segment){.limit = 0xffff, .type = 0x2, .present = 1};
	if (long_mode) {
		sregs.cr0 = CR0_LINUX64;
		sregs.cr3 = FL_PML4_GPA;
		sregs.cr4 = CR4_PAE;
		sregs.efer = EFER_LME_LMA;
	} else {
		sregs.cr0 = CR0_PE | CR0_ET;
		sregs.cr3 = 0;
		sregs.cr4 = 0;
		sregs.efer = 0;
	}
	if (ioctl(vcpu->fd, KVM_SET_SREGS, &sregs) < 0)
		return fl_fail(vm, errno, "KVM_SET_SREGS: %s", strerror(errno));

	memset(&regs, 0, sizeof(regs));
	regs.rflags = 0x2;
	regs.rip = boot->entry;
	if (long_mode)
		regs.rsi = boot->boot_info;
	else
		regs.rbx = boot->boot_info;
	if (ioctl(vcpu->fd, KVM_SET_REGS, &regs) < 0)
		return fl_fail(vm, errno, "KVM_SET_REGS: %s", strerror(errno));

	memset(&fpu, 0, sizeof(fpu));
	fpu.fcw = 0x37f;
	fpu.mxcsr = 0x1f80;
	if (ioctl(vcpu->fd, KVM_SET_FPU, &fpu) < 0)
		return fl_fail(vm, errno, "KVM_SET_FPU: %s", strerror(errno));
	return 0;
}

static void lvt_set_mode(struct kvm_lapic_state *l, int reg, uint32_t mode)
{
	uint32_t v;

	memcpy(&v, &l->regs[reg], 4);
	v = (v & ~0x700u) | (mode << 8);
	memcpy(&l->regs[reg], &v, 4);
}

/* As firmware leaves it: LINT0 ExtINT (no 8259 drives it here), LINT1 NMI. */
int fl_lapic_init(struct fl_vm *vm, struct fl_vcpu *vcpu)
{
	struct kvm_lapic_state l;

	if (ioctl(vcpu->fd, KVM_GET_LAPIC, &l) < 0)
		return fl_fail(vm, errno, "KVM_GET_LAPIC: %s", strerror(errno));
	lvt_set_mode(&l, APIC_LVT0, APIC_MODE_EXTINT);
	lvt_set_mode(&l, APIC_LVT1, APIC_MODE_NMI);
	if (ioctl(vcpu->fd, KVM_SET_LAPIC, &l) < 0)
		return fl_fail(vm, errno, "KVM_SET_LAPIC: %s", strerror(errno));
	return 0;
}

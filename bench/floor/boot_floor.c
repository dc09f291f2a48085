/*
 * The floor for bench/boot.py: the least a VMM can do to boot the test guest under KVM.
 * KVM_CREATE_VM, one memory slot, CPUID, one vCPU, the guest's PT_LOAD segments, the PVH
 * entry state (hvm_start_info with the command line and an E820 map) and a KVM_RUN loop that
 * answers the few ports the guest touches, until it writes port 0xF4 (as isa-debug-exit).
 * No irqchip, no PIT, no threads, no console writes while running: COM1 output is kept in
 * a buffer and written to stdout once the guest is done.
 *
 *     boot_floor guest.elf "ready debugexit" [memory_mib]
 *
 * Exit status: the debug-exit status (v << 1) | 1, or 100 on a setup failure (reason on
 * stderr), 101 on an unexpected exit from KVM_RUN.
 */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define START_INFO 0x6000
#define MEMMAP (START_INFO + 0x80)
#define CMDLINE 0x20000
#define LOW_RAM_END 0x9fc00
#define HIGH_RAM 0x100000
#define PVH_NOTE 18 /* XEN_ELFNOTE_PHYS32_ENTRY */
#define OUT_MAX (1 << 20)

struct hvm_start_info {
	uint32_t magic, version, flags, nr_modules;
	uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	uint32_t memmap_entries, reserved;
};

struct hvm_memmap_entry {
	uint64_t addr, size;
	uint32_t type, reserved;
};

static uint8_t out[OUT_MAX];
static size_t out_len;

static int fail(const char *what)
{
	fprintf(stderr, "boot_floor: %s: %s\n", what, strerror(errno));
	return 100;
}

/* Loads the PT_LOAD segments; returns the PVH entry or 0. */
static uint64_t load_elf(const uint8_t *f, size_t size, uint8_t *ram, uint64_t ram_size)
{
	const Elf64_Ehdr *eh = (const void *)f;
	uint64_t entry = 0;

	if (size < sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) ||
	    eh->e_ident[EI_CLASS] != ELFCLASS64 ||
	    eh->e_phoff + (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > size)
		return 0;
	for (int i = 0; i < eh->e_phnum; i++) {
		const Elf64_Phdr *ph = (const void *)(f + eh->e_phoff + i * sizeof(Elf64_Phdr));
		if (ph->p_offset + ph->p_filesz > size)
			return 0;
		if (ph->p_type == PT_LOAD) {
			if (ph->p_paddr + ph->p_memsz > ram_size || ph->p_filesz > ph->p_memsz)
				return 0;
			memcpy(ram + ph->p_paddr, f + ph->p_offset, ph->p_filesz);
		} else if (ph->p_type == PT_NOTE) {
			uint64_t off = ph->p_offset, end = off + ph->p_filesz;
			while (off + sizeof(Elf64_Nhdr) <= end) {
				const Elf64_Nhdr *n = (const void *)(f + off);
				uint64_t name = off + sizeof(*n);
				uint64_t desc = name + ((n->n_namesz + 3) & ~3u);
				if (desc + n->n_descsz > end)
					break;
				if (n->n_type == PVH_NOTE && n->n_namesz == 4 &&
				    !memcmp(f + name, "Xen", 4) && n->n_descsz >= 4) {
					uint32_t e;
					memcpy(&e, f + desc, 4);
					entry = e;
				}
				off = desc + ((n->n_descsz + 3) & ~3u);
			}
		}
	}
	return entry;
}

static int set_cpuid(int kvm, int vcpu)
{
	int n = 256;
	struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + n * sizeof(struct kvm_cpuid_entry2));

	if (!c)
		return -1;
	c->nent = n;
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c) < 0)
		return -1;
	/* As our VMM does, so the guest finds the same clock and features. */
	for (uint32_t i = 0; i < c->nent; i++) {
		struct kvm_cpuid_entry2 *e = &c->entries[i];
		if (e->function == 1)
			e->ecx |= 1u << 31;
		if (e->function == 7 && e->index == 0) {
			e->ecx &= ~(1u << 16);
			e->edx &= ~(1u << 29);
		}
	}
	int rc = ioctl(vcpu, KVM_SET_CPUID2, c);
	free(c);
	return rc;
}

static void set_seg(struct kvm_segment *s, uint16_t sel, uint8_t type)
{
	*s = (struct kvm_segment){.base = 0, .limit = 0xffffffff, .selector = sel, .type = type,
				  .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1};
}

static void port_in(uint16_t port, uint8_t *data, uint32_t size)
{
	memset(data, 0xff, size);
	if (port == 0x3fd) /* LSR: transmitter empty */
		data[0] = 0x60;
	else if (port == 0x3fa) /* IIR: FIFOs on, nothing pending */
		data[0] = 0xc1;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: boot_floor guest.elf cmdline [memory_mib]\n");
		return 100;
	}
	uint64_t ram_size = (argc > 3 ? strtoull(argv[3], NULL, 0) : 64) << 20;

	int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		return fail("opening the kernel");
	uint8_t *file = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (file == MAP_FAILED)
		return fail("mapping the kernel");

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		return fail("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		return fail("KVM_CREATE_VM");
	uint64_t ident = 0xfffbc000;
	if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &ident) < 0 ||
	    ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0)
		return fail("KVM_SET_TSS_ADDR");
	uint8_t *ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (ram == MAP_FAILED)
		return fail("guest RAM");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = ram_size,
		.userspace_addr = (uint64_t)ram};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		return fail("KVM_SET_USER_MEMORY_REGION");

	uint64_t entry = load_elf(file, st.st_size, ram, ram_size);
	if (!entry) {
		errno = ENOEXEC;
		return fail("no PVH entry in the kernel");
	}
	size_t cmdlen = strlen(argv[2]);
	if (cmdlen >= 4096) {
		errno = E2BIG;
		return fail("command line");
	}
	memcpy(ram + CMDLINE, argv[2], cmdlen + 1);
	struct hvm_memmap_entry map[2] = {
		{.addr = 0, .size = LOW_RAM_END, .type = 1},
		{.addr = HIGH_RAM, .size = ram_size - HIGH_RAM, .type = 1},
	};
	memcpy(ram + MEMMAP, map, sizeof(map));
	struct hvm_start_info si = {.magic = 0x336ec578, .version = 1, .cmdline_paddr = CMDLINE,
				    .memmap_paddr = MEMMAP, .memmap_entries = 2};
	memcpy(ram + START_INFO, &si, sizeof(si));

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		return fail("KVM_CREATE_VCPU");
	if (set_cpuid(kvm, vcpu) < 0)
		return fail("KVM_SET_CPUID2");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		return fail("mapping kvm_run");

	/* PVH: flat 32-bit protected mode, paging off, EBX = start_info. */
	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		return fail("KVM_GET_SREGS");
	set_seg(&sregs.cs, 0x10, 11);
	set_seg(&sregs.ds, 0x18, 3);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.cr0 = 0x11;
	sregs.cr4 = 0;
	sregs.efer = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		return fail("KVM_SET_SREGS");
	struct kvm_regs regs = {.rip = entry, .rbx = START_INFO, .rflags = 2};
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		return fail("KVM_SET_REGS");

	int status = -1;
	while (status < 0) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			return fail("KVM_RUN");
		}
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			uint8_t *data = (uint8_t *)run + run->io.data_offset;
			for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size) {
				if (run->io.direction == KVM_EXIT_IO_IN) {
					port_in(run->io.port, data, run->io.size);
				} else if (run->io.port == 0xf4) {
					uint32_t v = 0;
					memcpy(&v, data, run->io.size < 4 ? run->io.size : 4);
					status = (int)(((v << 1) | 1) & 0xff);
				} else if (run->io.port == 0x3f8 && out_len < OUT_MAX) {
					out[out_len++] = data[0];
				}
			}
			break;
		}
		case KVM_EXIT_MMIO:
			if (!run->mmio.is_write)
				memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
			break;
		default:
			fprintf(stderr, "boot_floor: unexpected exit %u\n", run->exit_reason);
			fwrite(out, 1, out_len, stdout);
			return 101;
		}
	}
	fwrite(out, 1, out_len, stdout);
	return status;
}

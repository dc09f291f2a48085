/* Statically built CPU tables, so the emulated ring-0 boot path only loads them.
 * Everything is identity mapped with user-accessible pages: ring 3 owns the
 * machine (it fills the IDT and the AP TSS descriptors itself). */
#include "layout.h"

#define PTE_P   0x001
#define PTE_RW  0x002
#define PTE_US  0x004
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS  0x080

	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4
pml4:
	.quad pdpt + (PTE_P | PTE_RW | PTE_US)
	.fill 511, 8, 0

	.balign 4096
	.globl pdpt
pdpt:
	/* The first 4 GiB through 2 MiB pages; RAM above 4 GiB is added from
	 * ring 3 (1 GiB pages) once the memory map is known. */
	.quad pd0 + (PTE_P | PTE_RW | PTE_US)
	.quad pd0 + 4096 + (PTE_P | PTE_RW | PTE_US)
	.quad pd0 + 8192 + (PTE_P | PTE_RW | PTE_US)
	.quad pd0 + 12288 + (PTE_P | PTE_RW | PTE_US)
	.fill 508, 8, 0

	/* Four page directories back to back: 2048 2 MiB pages. The top 16 MiB (IOAPIC 0xFEC00000, LAPIC 0xFEE00000,
	 * other MMIO) is uncached: i / 2040 is 1 only for the last 8 entries. */
	.balign 4096
pd0:
	.set i, 0
	.rept 2048
	.quad (i << 21) | (PTE_P | PTE_RW | PTE_US | PTE_PS) | ((i / 2040) * (PTE_PCD | PTE_PWT))
	.set i, i + 1
	.endr

	.section .data, "aw"
	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9a000000ffff /* 0x08 kernel code, 64-bit */
	.quad 0x00cf92000000ffff /* 0x10 kernel data */
	.quad 0x00cff2000000ffff /* 0x18 user data, DPL 3 */
	.quad 0x00affa000000ffff /* 0x20 user code, 64-bit, DPL 3 */
	.quad 0                  /* 0x28 unused */
	.fill 2 * MAX_CPUS, 8, 0 /* 0x30 TSS descriptors, filled at run time */
gdt_end:

	.balign 8
	.word 0
	.globl gdt_ptr
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

	.balign 8
	.word 0
	.globl idt_ptr
idt_ptr:
	.word 256 * 16 - 1
	.quad idt

	.balign 8
	.word 0
	.globl null_idt_ptr
null_idt_ptr:
	.word 0
	.quad 0

	/* TSS area: MAX_CPUS TSSs, then the shared I/O bitmap (all zero = every
	 * port allowed) and the 0xFF byte the CPU may read past its end. */
	.balign 4096
	.globl tss_area
tss_area:
	.fill TSS_STRIDE * MAX_CPUS, 1, 0
	.globl io_bitmap
io_bitmap:
	.fill IOBITMAP_SIZE, 1, 0
	.byte 0xff

	.section .bss
	.balign 4096
	.globl idt
idt:
	.fill 256 * 16, 1, 0

	/* Ring-0 stacks, one per CPU. */
	.section .stack, "aw", @nobits
	.balign 4096
	.globl kstacks
kstacks:
	.fill KSTACK_SIZE * MAX_CPUS, 1, 0
	.globl bsp_stack
bsp_stack:
	.fill BSP_STACK_SIZE, 1, 0
	.globl bsp_stack_top
bsp_stack_top:
	.globl ap_stacks
ap_stacks:
	.fill AP_STACK_SIZE * MAX_CPUS, 1, 0
	.globl fault_stack
fault_stack:
	.fill FAULT_STACK_SIZE, 1, 0
	.globl fault_stack_top
fault_stack_top:

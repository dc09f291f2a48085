/* PVH entry. The loader enters _start32 in flat 32-bit protected mode with
 * paging off and EBX = struct hvm_start_info. This ring-0 path is emulated
 * instruction by instruction under PVM, so it only loads prebuilt tables and
 * leaves for ring 3 as fast as it can. */
#include "layout.h"

	/* XEN_ELFNOTE_PHYS32_ENTRY. The descriptor is 8 bytes because QEMU
	 * reads a pointer-sized value from it. */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4
	.long 8
	.long 18
	.asciz "Xen"
	.balign 4
	.quad _start32

	.section .text.boot, "ax"
	.code32
	.globl _start32
_start32:
	cli
	mov	%ebx, %esi		/* start_info survives in ESI */
	lgdt	gdt_ptr
	mov	$pml4, %eax
	mov	%eax, %cr3
	mov	$0x20, %eax		/* CR4.PAE */
	mov	%eax, %cr4
	mov	$0xc0000080, %ecx	/* EFER.LME */
	xor	%edx, %edx
	mov	$0x100, %eax
	wrmsr
	mov	$0x80000011, %eax	/* CR0.PG | ET | PE */
	mov	%eax, %cr0
	ljmp	$SEL_KCODE, $start64

	.code64
start64:
	mov	$SEL_KDATA, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	xor	%eax, %eax
	mov	%eax, %fs
	mov	%eax, %gs
	lea	kstacks + KSTACK_SIZE(%rip), %rsp

	/* TSS descriptor 0 for tss_area (below 4 GiB): limit in bits 0-15,
	 * base 0-23 in bits 16-39, type 0x89 (available 64-bit TSS, present),
	 * base 24-31 in bits 56-63; the high quad (base 32-63) stays zero. */
	lea	tss_area(%rip), %rax
	mov	%rax, %rdx
	shl	$16, %rdx
	mov	$0xffffff0000, %rcx
	and	%rcx, %rdx
	mov	%rax, %rcx
	shl	$32, %rcx
	mov	$0xff00000000000000, %rdi
	and	%rdi, %rcx
	or	%rcx, %rdx
	mov	$0x890000000000 + TSS_STRIDE * MAX_CPUS + IOBITMAP_SIZE, %rcx
	or	%rcx, %rdx
	mov	%rdx, gdt + SEL_TSS0(%rip)
	/* TSS 0: RSP0 and the I/O map base pointing at the shared bitmap. */
	lea	kstacks + KSTACK_SIZE(%rip), %rcx
	mov	%rcx, 4(%rax)
	movw	$TSS_STRIDE * MAX_CPUS, 102(%rax)
	mov	$SEL_TSS0, %eax
	ltr	%ax
	lidt	idt_ptr(%rip)

	/* To ring 3: guest_main(start_info) on the boot CPU's stack. */
	mov	%esi, %edi
	pushq	$SEL_UDATA
	lea	bsp_stack_top(%rip), %rax
	push	%rax
	pushq	$USER_RFLAGS
	pushq	$SEL_UCODE
	lea	guest_main_entry(%rip), %rax
	push	%rax
	iretq

	/* Ring 3 from here on. */
	.text
guest_main_entry:
	call	guest_main
1:	jmp	1b

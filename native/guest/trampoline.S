/* Application processor start-up. smp.c copies [ap_tramp_start, ap_tramp_end)
 * to a free page below 1 MiB, patches its three data words and sends
 * INIT/SIPI. The AP goes straight from real mode to long mode (CR0.PE and PG
 * in one write, which KVM allows), then to ap_start64 in the image. */
#include "layout.h"

	.section .rodata
	.code16
	.globl ap_tramp_start
ap_tramp_start:
	cli
	mov	%cs, %ax
	mov	%ax, %ds
	lgdtl	ap_tramp_gdtr - ap_tramp_start
	mov	$0x20, %eax		/* CR4.PAE */
	mov	%eax, %cr4
	movl	ap_tramp_cr3 - ap_tramp_start, %eax
	mov	%eax, %cr3
	mov	$0xc0000080, %ecx	/* EFER.LME */
	xor	%edx, %edx
	mov	$0x100, %eax
	wrmsr
	mov	$0x80000011, %eax	/* CR0.PG | ET | PE */
	mov	%eax, %cr0
	ljmpl	*(ap_tramp_far - ap_tramp_start)

	.balign 8
	.globl ap_tramp_gdtr
ap_tramp_gdtr:
	.word 0
	.long 0
	.balign 4
	.globl ap_tramp_cr3
ap_tramp_cr3:
	.long 0
	.globl ap_tramp_far
ap_tramp_far:
	.long 0			/* offset of ap_start64 */
	.word SEL_KCODE
	.globl ap_tramp_end
ap_tramp_end:

	.text
	.code64
	.globl ap_start64
ap_start64:
	mov	$SEL_KDATA, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	xor	%eax, %eax
	mov	%eax, %fs
	mov	%eax, %gs
	mov	ap_boot + 0(%rip), %rsp	/* ring-0 stack */
	mov	ap_boot + 24(%rip), %rax	/* TSS selector */
	ltr	%ax
	lidt	idt_ptr(%rip)
	mov	ap_boot + 16(%rip), %rdi	/* CPU index */
	pushq	$SEL_UDATA
	pushq	ap_boot + 8(%rip)	/* ring-3 stack */
	pushq	$USER_RFLAGS
	pushq	$SEL_UCODE
	lea	ap_main_entry(%rip), %rax
	push	%rax
	iretq

ap_main_entry:
	call	ap_main
1:	jmp	1b

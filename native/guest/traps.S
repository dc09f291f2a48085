/* Ring-0 entry points, kept to a handful of instructions (emulated under PVM).
 * Exceptions are reported from ring 3: the stub records the frame and IRETQs to
 * fault_report() on a fresh stack.
 *
 * Ring 3 enters ring 0 on purpose through a #UD at svc_ud2: under PVM a
 * software interrupt (int n) from ring 3 arrives as #UD anyway, and the KVM
 * emulator cannot run int n in protected mode. */
#include "layout.h"

	.text
	.code64

	/* One 16-byte stub per exception vector at exc_stub_base + 16 * vector.
	 * Vectors 8, 10-14, 17, 21, 29 and 30 push an error code themselves. */
	.balign 16
	.globl exc_stub_base
exc_stub_base:
	.set v, 0
	.rept 32
	.balign 16
	.if v == 6
	jmp	ud_entry
	.elseif (v == 8) || ((v >= 10) && (v <= 14)) || (v == 17) || (v == 21) || (v == 29) || (v == 30)
	.else
	pushq	$0
	.endif
	.if v != 6
	pushq	$v
	jmp	exc_common
	.endif
	.set v, v + 1
	.endr

	.text
exc_common:
	/* Stack: vector, error, RIP, CS, RFLAGS, RSP, SS. */
	pop	fault_info + 0(%rip)	/* vector */
	pop	fault_info + 8(%rip)	/* error code */
	pop	fault_info + 16(%rip)	/* rip */
	pop	fault_info + 24(%rip)	/* cs */
	pop	fault_info + 32(%rip)	/* rflags */
	pop	fault_info + 40(%rip)	/* rsp */
	push	%rax
	mov	%cr2, %rax
	mov	%rax, fault_info + 48(%rip)
	pop	%rax
	pushq	$SEL_UDATA
	lea	fault_stack_top(%rip), %rax
	push	%rax
	pushq	$USER_RFLAGS
	pushq	$SEL_UCODE
	lea	fault_report(%rip), %rax
	push	%rax
	iretq

	/* #UD: a service request when it comes from svc_ud2. */
ud_entry:
	cmpq	$svc_ud2, (%rsp)
	jne	1f
	addq	$2, (%rsp)		/* resume after the ud2 */
	jmp	svc_entry
1:	pushq	$0
	pushq	$6
	jmp	exc_common

	/* Service RAX with arguments RDI, RSI; clobbers RCX, RDX. */
svc_entry:
	cmp	$SVC_WRMSR, %eax
	je	3f
	cmp	$SVC_TRIPLEFAULT, %eax
	je	2f
	cmp	$SVC_HALT, %eax
	je	1f
	iretq
1:	cli
	hlt
	jmp	1b
2:	lidt	null_idt_ptr(%rip)
	ud2
3:	mov	%edi, %ecx
	mov	%esi, %eax
	mov	%rsi, %rdx
	shr	$32, %rdx
	wrmsr
	iretq

	/* Ring 3: u64 svc_call(u64 nr, u64 a1, u64 a2). */
	.globl svc_call
svc_call:
	mov	%rdi, %rax
	mov	%rsi, %rdi
	mov	%rdx, %rsi
	.globl svc_ud2
svc_ud2:
	ud2
	ret

	.globl spurious_entry
spurious_entry:
	iretq

	.section .bss
	.balign 8
	.globl fault_info
fault_info:
	.fill 8, 8, 0

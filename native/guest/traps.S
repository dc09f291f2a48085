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

	/* #UD: a service request when it comes from svc_wait_ud2 or svc_ud2.
	 * The wait is checked first: it is the only frequent one. */
ud_entry:
	cmpq	$svc_wait_ud2, (%rsp)
	je	wait_entry
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

	/* Wait for one interrupt, RAX = the LAPIC EOI register. STI's shadow
	 * covers HLT, so an interrupt already pending (ring 3 runs with IF
	 * clear) wakes it at once and none is lost. irq_entry returns here with
	 * IF clear, so exactly one interrupt is taken and retired per wait. */
wait_entry:
	addq	$2, (%rsp)		/* resume after the ud2 */
	sti
	hlt
	movl	$0, (%rax)
	iretq

	/* Every vector from 0x20 up, spurious included: only ever taken at the
	 * HLT above. Return there with interrupts off. */
	.globl irq_entry
irq_entry:
	andq	$~0x200, 16(%rsp)
	iretq

	/* Ring 3: void svc_wait(u64 lapic_eoi_address). */
	.globl svc_wait
svc_wait:
	mov	%rdi, %rax
	.globl svc_wait_ud2
svc_wait_ud2:
	ud2
	ret

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

	.section .bss
	.balign 8
	.globl fault_info
fault_info:
	.fill 8, 8, 0

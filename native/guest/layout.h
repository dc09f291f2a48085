/* Constants shared by the assembly and the C side. */
#ifndef GUEST_LAYOUT_H
#define GUEST_LAYOUT_H

#define MAX_CPUS 64

#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1b /* 0x18 | RPL 3 */
#define SEL_UCODE 0x23 /* 0x20 | RPL 3 */
#define SEL_TSS0 0x30  /* 16-byte TSS descriptors follow, one per CPU */
#define GDT_ENTRIES (6 + 2 * MAX_CPUS)

/* RFLAGS for ring 3: IOPL 3, reserved bit 1, interrupts off. Interrupts are
 * only taken inside the ring-0 wait service (traps.S), never in ring 3. */
#define USER_RFLAGS 0x3002

/* TSSs are packed at TSS_STRIDE and share one I/O permission bitmap placed
 * after the last of them, so one 8 KiB bitmap serves every CPU. */
#define TSS_STRIDE 128
#define IOBITMAP_SIZE 8192

#define KSTACK_SIZE 1024      /* ring 0 only runs a few instructions per entry */
#define BSP_STACK_SIZE 65536  /* ring-3 stack of the boot CPU */
#define AP_STACK_SIZE 8192    /* ring-3 stacks of the APs */
#define FAULT_STACK_SIZE 8192 /* ring-3 stack the fault reporter runs on */

/* Ring-0 services: svc_call() from ring 3 (traps.S), the number in RAX. */
#define SVC_HALT 0        /* cli; hlt forever */
#define SVC_TRIPLEFAULT 1 /* load an empty IDT and fault */
#define SVC_WRMSR 2       /* wrmsr(RDI, RSI) */

/* Device vectors share one priority class (0x3x), so at most one is ever in
 * service and the wait service's single EOI always retires it. */
#define VEC_TIMER 0x30 /* LAPIC timer, one-shot */
#define VEC_I8042 0x31 /* IOAPIC pin 1 */
#define VEC_COM1 0x34  /* IOAPIC pin 4 */
#define VEC_VIRTIO 0x35 /* every virtio-mmio device's pin */
#define VEC_TEST 0x25  /* IOAPIC tests; below the others' priority class */
#define VEC_SPURIOUS 0xff

#endif

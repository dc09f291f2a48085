/* Tests of the IOAPIC as the VMM models it (docs/machine.md). */
#ifndef GUEST_IOAPIC_H
#define GUEST_IOAPIC_H

#include "types.h"

/* `ioapic`: registers, masks, edge and level pins, Remote IRR and EOI. */
void ioapic_selftest(void);
/* `irqwait=N`: route pin N and wait for one interrupt raised by the host. */
void ioapic_irqwait(u64 pin);
/* For `hostile`: garbage that leaves no interrupt behind; restores the table. */
void ioapic_garbage(void);

#endif

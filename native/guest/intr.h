/* Sleeping instead of spinning: the LAPIC timer (one-shot) and the COM1 and
 * i8042 lines through the IOAPIC wake the boot CPU from a ring-0 HLT. Each
 * wake costs a #UD, an interrupt and ~10 emulated ring-0 instructions under
 * PVM (~20 us), so loops wake only when a deadline passes or input arrives. */
#ifndef GUEST_INTR_H
#define GUEST_INTR_H

#include "types.h"

#define WAIT_FOREVER (~0UL)

/* Sleep until the TSC reaches `deadline` (WAIT_FOREVER: no timer) or any
 * interrupt arrives, whichever is first; may return early, so callers loop.
 * Sets the interrupt controllers up on first use. Boot CPU only. */
void wait_until(u64 deadline_tsc);
/* Set the interrupt controllers up now if not yet; true when interrupts work
 * (a local APIC answers). */
bool intr_setup(void);
/* Stop the LAPIC timer (the next wait_until re-arms it). */
void intr_disarm(void);
/* (Re)route IOAPIC pins 1 and 4 to their vectors, edge, to this CPU. */
void intr_route_inputs(void);
/* Route IOAPIC pin `pin` to `vector`, edge, to this CPU (after intr_setup). */
void intr_route_pin(unsigned pin, u8 vector);
/* Sleep at least `us` microseconds. */
void sleep_us(u64 us);

#endif

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
/* Sleep at least `us` microseconds. */
void sleep_us(u64 us);

#endif

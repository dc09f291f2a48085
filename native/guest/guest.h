/* What the actions share: the run state and the input polling. */
#ifndef GUEST_GUEST_H
#define GUEST_GUEST_H

#include "types.h"

/* Set by the `echo` action: polling loops echo COM1 input from then on. */
extern bool echo_enabled;

/* Take in what waits on the inputs (COM1 when echoing, i8042 for
 * Ctrl-Alt-Del), then sleep until `deadline` (TSC; WAIT_FOREVER) or the next
 * input. Sleeps only once the inputs are drained: their IOAPIC pins are
 * edge-triggered, and a line left high would never interrupt again. May
 * return early. Does not return on Ctrl-Alt-Del. */
void guest_wait(u64 deadline);
/* Idle: guest_wait() forever. */
__attribute__((noreturn)) void guest_idle(void);
/* Say that a terminal action left the machine running, then halt. */
__attribute__((noreturn)) void guest_stuck(const char *what);

/* Run the command line's words in order (actions.c). */
void actions_run(const char *cmdline);
__attribute__((noreturn)) void action_poweroff(void);

#endif

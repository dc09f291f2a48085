/* What the actions share: the run state and the input polling. */
#ifndef GUEST_GUEST_H
#define GUEST_GUEST_H

#include "types.h"

/* Set by the `echo` action: polling loops echo COM1 input from then on. */
extern bool echo_enabled;

/* One pass over the inputs (COM1 when echoing, i8042 for Ctrl-Alt-Del);
 * a few port reads, i.e. VM exits. Does not return on Ctrl-Alt-Del. */
void guest_poll(void);
/* Idle: guest_poll() about every millisecond, forever. */
__attribute__((noreturn)) void guest_idle(void);
/* Say that a terminal action left the machine running, then halt. */
__attribute__((noreturn)) void guest_stuck(const char *what);

/* Run the command line's words in order (actions.c). */
void actions_run(const char *cmdline);
__attribute__((noreturn)) void action_poweroff(void);

#endif

/* The i8042 keyboard controller: Ctrl-Alt-Del detection and the reset line. */
#ifndef GUEST_I8042_H
#define GUEST_I8042_H

#include "types.h"

#define I8042_DATA 0x60
#define I8042_STATUS 0x64 /* command port on write */

/* Turn on scancode translation (set 1) if the controller answers: without
 * firmware QEMU's i8042 starts with it off. Bounded; no-op when absent. */
void i8042_init(void);
/* Read what is waiting (a bounded number of bytes, counted into *read) and
 * return true once Ctrl (0x1D) and Alt (0x38) are held and Del (0x53) is
 * pressed. */
bool i8042_poll_ctrl_alt_del(unsigned *read);
/* Pulse the CPU reset line (command 0xFE). */
void i8042_reset(void);
/* Drop whatever sits in the output buffer. */
void i8042_drain(void);

#endif

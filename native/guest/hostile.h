/* Garbage to every device register the guest knows, to test the VMM's
 * device models. Leaves the console usable afterwards. */
#ifndef GUEST_HOSTILE_H
#define GUEST_HOSTILE_H

void hostile_run(void);

#endif

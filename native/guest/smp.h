/* Application processor start-up through the local APIC (INIT, SIPI). */
#ifndef GUEST_SMP_H
#define GUEST_SMP_H

/* Start every CPU the MADT lists; each prints "CPU <apic id> online", the
 * boot CPU first, then "SMP <n> ok" (or "SMP FAILED ..."). The APs halt. */
void smp_start(void);

#endif

/* Time from the TSC, which ring 3 reads natively. */
#ifndef GUEST_TIME_H
#define GUEST_TIME_H

#include "types.h"

/* Find the TSC frequency: the hypervisor's timing leaf, kvmclock, CPUID
 * 0x15/0x16, else an assumed 2 GHz. Returns a short name of the source. */
const char *time_init(void);
u64 time_tsc_hz(void);
/* The local APIC timer's rate from the hypervisor's timing leaf; 0 if it gave none. */
u64 time_apic_hz(void);
/* Where time_init found the TSC's rate ("cpuid-0x40000010", "kvmclock", ...). */
const char *time_tsc_source(void);
u64 time_now_us(void);
u64 time_us_to_tsc(u64 us);
/* Spin natively (no exits) for about `us` microseconds. */
void delay_us(u64 us);

#endif

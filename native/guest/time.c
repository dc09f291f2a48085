#include "time.h"
#include "cpu.h"
#include "io.h"

#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)

struct pvclock_vcpu_time_info {
	u32 version;
	u32 pad0;
	u64 tsc_timestamp;
	u64 system_time;
	u32 tsc_to_system_mul;
	s8 tsc_shift;
	u8 flags;
	u8 pad[2];
} __attribute__((packed));

static struct pvclock_vcpu_time_info pvclock __attribute__((aligned(64)));
static u64 tsc_hz = 2000000000UL;
static u64 tsc_per_us = 2000;
static u64 apic_hz; /* 0: unknown, calibrate */
static const char *tsc_source = "assumed";

static bool is_kvm(u32 *max_leaf)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	if (!(c & (1u << 31))) /* no hypervisor */
		return false;
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	*max_leaf = a;
	return b == 0x4b4d564b && c == 0x564b4d56 && d == 0x4d; /* "KVMKVMKVM" */
}

static u64 from_kvmclock(void)
{
	u32 a, b, c, d;
	cpuid(0x40000001, 0, &a, &b, &c, &d);
	if (!(a & KVM_FEATURE_CLOCKSOURCE2))
		return 0;
	/* KVM fills the structure before it next enters the guest; the
	 * scale it holds converts TSC ticks to nanoseconds. */
	svc_wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)&pvclock | 1);
	for (unsigned i = 0; i < 1000000 && !((volatile struct pvclock_vcpu_time_info *)&pvclock)->tsc_to_system_mul; i++)
		cpu_relax();
	u32 mul = ((volatile struct pvclock_vcpu_time_info *)&pvclock)->tsc_to_system_mul;
	s8 shift = ((volatile struct pvclock_vcpu_time_info *)&pvclock)->tsc_shift;
	/* Stop updates: nothing else here uses it, and guest memory stays quiet. */
	svc_wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
	if (!mul)
		return 0;
	u64 khz = (1000000UL << 32) / mul;
	if (shift < 0)
		khz <<= -shift;
	else
		khz >>= shift;
	return khz * 1000;
}

const char *time_init(void)
{
	u32 a, b, c, d, max_hv = 0;
	const char *src = "assumed";
	u64 hz = 0;
	if (is_kvm(&max_hv)) {
		if (max_hv >= 0x40000010) {
			cpuid(0x40000010, 0, &a, &b, &c, &d);
			hz = (u64)a * 1000;
			apic_hz = (u64)b * 1000; /* the local APIC timer's rate: no calibration */
			src = "cpuid-0x40000010";
		}
		if (!hz) {
			hz = from_kvmclock();
			src = "kvmclock";
		}
	}
	cpuid(0, 0, &a, &b, &c, &d);
	u32 max_leaf = a;
	if (!hz && max_leaf >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);
		if (a && b && c) {
			hz = (u64)c * b / a;
			src = "cpuid-0x15";
		}
	}
	if (!hz && max_leaf >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d);
		hz = (u64)(a & 0xffff) * 1000000;
		src = "cpuid-0x16";
	}
	if (!hz) {
		hz = 2000000000UL;
		src = "assumed";
	}
	tsc_hz = hz;
	tsc_per_us = hz / 1000000 ? hz / 1000000 : 1;
	tsc_source = src;
	return src;
}

u64 time_tsc_hz(void) { return tsc_hz; }

u64 time_apic_hz(void) { return apic_hz; }

const char *time_tsc_source(void) { return tsc_source; }

u64 time_now_us(void) { return rdtsc() / tsc_per_us; }

u64 time_us_to_tsc(u64 us) { return us * tsc_per_us; }

void delay_us(u64 us)
{
	u64 end = rdtsc() + us * tsc_per_us;
	while (rdtsc() < end)
		cpu_relax();
}

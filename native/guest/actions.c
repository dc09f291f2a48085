/* The command-line actions (docs/machine.md, "The test guest"). A new action
 * is one handler and one row in the table below. */
#include "acpi.h"
#include "blk.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "cpu.h"
#include "guest.h"
#include "hostile.h"
#include "i8042.h"
#include "intr.h"
#include "ioapic.h"
#include "io.h"
#include "lib.h"
#include "mem.h"
#include "net.h"
#include "print.h"
#include "smp.h"
#include "time.h"
#include "uart.h"
#include "virtio.h"

#define PVPANIC_PORT 0x505
#define PVPANIC_PANICKED 0x01
#define DEBUG_EXIT_PORT 0xf4
#define COUNTER_PERIOD_US 10000
/* How long a terminal request may take before we call it failed. */
#define STOP_GRACE_US 200000

enum value_kind { NO_VALUE, NEEDS_VALUE, OPTIONAL_VALUE, TEXT_VALUE };

struct action {
	const char *name;
	enum value_kind value;
	/* value is 0 when absent; returns normally for non-terminal actions. */
	void (*run)(u64 value);
	/* TEXT_VALUE: gets the text after '=' instead. */
	void (*run_text)(const char *value);
};

static void act_ready(u64 v)
{
	(void)v;
	say("READY vcpus=%u memory_mib=%lu", acpi.nr_cpus ? acpi.nr_cpus : 1,
	    (boot.ram_bytes + MIB - 1) / MIB);
}

static void act_echo(u64 v)
{
	(void)v;
	echo_enabled = true;
	uart_set_rx_irq(true);
}

void action_poweroff(void)
{
	say("POWEROFF");
	acpi_poweroff();
	sleep_us(STOP_GRACE_US);
	guest_stuck("POWEROFF");
}

static void act_poweroff(u64 v)
{
	(void)v;
	action_poweroff();
}

static void act_reboot(u64 v)
{
	(void)v;
	say("REBOOT");
	i8042_reset();
	sleep_us(STOP_GRACE_US);
	say("REBOOT through the i8042 did not reset the machine; triple-faulting");
	svc_triplefault();
}

static void act_panic(u64 v)
{
	(void)v;
	say("PANIC");
	outb(PVPANIC_PORT, PVPANIC_PANICKED);
	/* Like a crashed kernel: stay down, whatever the VMM does about it. */
	svc_halt();
}

static void act_triplefault(u64 v)
{
	(void)v;
	say("TRIPLEFAULT");
	svc_triplefault();
}

static void act_smp(u64 v)
{
	(void)v;
	smp_start();
}

static void act_memtest(u64 mib) { mem_test(mib); }

static void act_rewrite(u64 mib) { mem_rewrite(mib, COUNTER_PERIOD_US); }

/* Waits (as the idle loop, taking no CPU) before the next word: a window for the host, e.g.
 * to take a snapshot before the words after it write memory. */
/* `lines=N`: N lines back to back through the UART (a console kept busy). */
static void act_lines(u64 n)
{
	for (u64 i = 1; i <= n; i++)
		say("LINE %lu of %lu: a line printed to keep the console busy", i, n);
	say("LINES done n=%lu", n);
}

/* `clock`: the rates the guest's timekeeping runs on and where it found them. */
static void act_clock(u64 v)
{
	(void)v;
	u64 apic = time_apic_hz();
	say("CLOCK tsc_hz=%lu tsc_from=%s apic_hz=%lu apic_from=%s", time_tsc_hz(), time_tsc_source(),
	    apic, apic ? "cpuid-0x40000010" : "calibrated");
}

static void act_sleep(u64 ms)
{
	sleep_us(ms * 1000);
	say("SLEPT ms=%lu", ms);
}

/* `counter=K` also reads the memtest region back after every K-th line (a live check that
 * memory survived whatever the host did meanwhile: a migration, a restore). */
static void act_counter(u64 check_every)
{
	u64 period = time_us_to_tsc(COUNTER_PERIOD_US);
	u64 n = 0, checks = 0, next = rdtsc();
	for (;;) {
		u64 now = rdtsc();
		if (now >= next) {
			say("COUNTER %lu", n++);
			if (check_every && n % check_every == 0)
				mem_check(checks++);
			next += period;
			if (next < now) /* we were held up: don't burst to catch up */
				next = now + period;
		}
		guest_wait(next);
	}
}

/* One exit per byte, nothing else: the VMM's port-exit cost as seen by a guest. The bytes
 * form one prefixed line so the console contract holds. */
static void act_serialflood(u64 n)
{
	uart_write(LINE_PREFIX, sizeof(LINE_PREFIX) - 1);
	u64 t0 = rdtsc();
	for (u64 i = 0; i < n; i++)
		outb(COM1, '.');
	u64 ticks = rdtsc() - t0;
	outb(COM1, '\n');
	u64 mhz = time_tsc_hz() / 1000000;
	say("SERIALFLOOD bytes=%lu tsc=%lu ns=%lu", n, ticks, mhz ? ticks * 1000 / mhz : 0);
}

static void act_hostile(u64 v)
{
	(void)v;
	hostile_run();
}

static void act_ioapic(u64 v)
{
	(void)v;
	ioapic_selftest();
}

static void act_irqwait(u64 pin) { ioapic_irqwait(pin); }

static void act_debugexit(u64 v)
{
	outl(DEBUG_EXIT_PORT, (u32)v);
	sleep_us(STOP_GRACE_US);
	guest_stuck("debugexit");
}

static void act_blkinfo(u64 v)
{
	(void)v;
	blk_info();
}

static void act_blkflush(u64 v)
{
	(void)v;
	blk_flush();
}

static void act_virtiohostile(u64 v)
{
	(void)v;
	virtio_hostile();
}

/* What the loader handed us as the first module (the initrd): where, how big, and
 * an FNV-1a 64 of its bytes, so a test can tell that the VMM loaded the file it named. */
static void act_initrd(u64 v)
{
	(void)v;
	if (!boot.nr_modules) {
		say("INITRD none");
		return;
	}
	const struct mem_range *m = &boot.modules[0];
	if (m->addr + m->size < m->addr || m->addr + m->size > boot.ram_top) {
		say("INITRD addr=0x%lx size=%lu error=outside-ram", m->addr, m->size);
		return;
	}
	const volatile u8 *p = (const volatile u8 *)m->addr;
	u64 hash = 0xcbf29ce484222325ULL;
	for (u64 i = 0; i < m->size; i++)
		hash = (hash ^ p[i]) * 0x100000001b3ULL;
	say("INITRD addr=0x%lx size=%lu fnv1a=0x%016lx", m->addr, m->size, hash);
}

/* The VMM's device list: read by virtio_scan() before any action runs. */
static void act_virtio_device(const char *v) { (void)v; }

static const struct action actions[] = {
	{"ready", NO_VALUE, act_ready, NULL},
	{"echo", NO_VALUE, act_echo, NULL},
	{"poweroff", NO_VALUE, act_poweroff, NULL},
	{"reboot", NO_VALUE, act_reboot, NULL},
	{"panic", NO_VALUE, act_panic, NULL},
	{"triplefault", NO_VALUE, act_triplefault, NULL},
	{"smp", NO_VALUE, act_smp, NULL},
	{"memtest", NEEDS_VALUE, act_memtest, NULL},
	{"sleep", NEEDS_VALUE, act_sleep, NULL},
	{"clock", NO_VALUE, act_clock, NULL},
	{"lines", NEEDS_VALUE, act_lines, NULL},
	{"counter", OPTIONAL_VALUE, act_counter, NULL},
	{"rewrite", NEEDS_VALUE, act_rewrite, NULL},
	{"hostile", NO_VALUE, act_hostile, NULL},
	{"serialflood", NEEDS_VALUE, act_serialflood, NULL},
	{"ioapic", NO_VALUE, act_ioapic, NULL},
	{"irqwait", NEEDS_VALUE, act_irqwait, NULL},
	{"debugexit", OPTIONAL_VALUE, act_debugexit, NULL},
	{"blkinfo", NO_VALUE, act_blkinfo, NULL},
	{"initrd", NO_VALUE, act_initrd, NULL},
	{"blkflush", NO_VALUE, act_blkflush, NULL},
	{"blkwrite", TEXT_VALUE, NULL, blk_write},
	{"blkread", TEXT_VALUE, NULL, blk_read},
	{"blkverify", TEXT_VALUE, NULL, blk_verify},
	{"blkloop", TEXT_VALUE, NULL, blk_loop},
	{"blkbench", TEXT_VALUE, NULL, blk_bench},
	{"net", TEXT_VALUE, NULL, net_start},
	{"udp", TEXT_VALUE, NULL, net_udp},
	{"ping", TEXT_VALUE, NULL, net_ping},
	{"gw", TEXT_VALUE, NULL, net_gateway},
	{"netbench", TEXT_VALUE, NULL, net_bench},
	{"tcpsink", TEXT_VALUE, NULL, net_tcp_sink},
	{"tcpsend", TEXT_VALUE, NULL, net_tcp_send},
	{"virtiohostile", NO_VALUE, act_virtiohostile, NULL},
	{"virtio_mmio.device", TEXT_VALUE, NULL, act_virtio_device},
};

static const struct action *lookup(const struct word *w, u64 *value)
{
	*value = 0;
	for (unsigned i = 0; i < ARRAY_SIZE(actions); i++) {
		const struct action *a = &actions[i];
		if (strcmp(a->name, w->name))
			continue;
		if (w->value ? a->value == NO_VALUE : (a->value == NEEDS_VALUE || a->value == TEXT_VALUE))
			return NULL;
		if (a->value == TEXT_VALUE)
			return a;
		if (w->value && !parse_u64(w->value, value))
			return NULL;
		return a;
	}
	return NULL;
}

void actions_run(const char *cmdline)
{
	const char *cursor = cmdline;
	struct word w;
	while (cmdline_next(&cursor, &w)) {
		u64 value;
		const struct action *a = lookup(&w, &value);
		if (a && a->value == TEXT_VALUE)
			a->run_text(w.value);
		else if (a)
			a->run(value);
		else
			say("unknown action %s", w.text);
	}
}

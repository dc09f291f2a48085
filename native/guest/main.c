/* Ring-3 entry of the boot CPU: set up, run the command line, idle. */
#include "acpi.h"
#include "bootinfo.h"
#include "cpu.h"
#include "guest.h"
#include "i8042.h"
#include "intr.h"
#include "io.h"
#include "lib.h"
#include "mem.h"
#include "net.h"
#include "print.h"
#include "time.h"
#include "uart.h"
#include "virtio.h"

extern u8 __bss_start[], __bss_end[];

bool echo_enabled;

/* One pass over the inputs; returns how many bytes it took in. */
static unsigned poll_inputs(void)
{
	unsigned n = 0;
	if (echo_enabled) {
		int c;
		for (; n < 64 && (c = uart_poll_rx()) >= 0; n++)
			echo_byte((u8)c);
	}
	n += net_poll();
	if (i8042_poll_ctrl_alt_del(&n)) {
		say("CTRL-ALT-DEL");
		action_poweroff();
	}
	return n;
}

void guest_wait(u64 deadline)
{
	/* Each port read is an exit; an idle pass costs one or two. */
	while (poll_inputs())
		if (rdtsc() >= deadline)
			return;
	wait_until(deadline);
}

void guest_idle(void)
{
	for (;;)
		guest_wait(WAIT_FOREVER);
}

void guest_stuck(const char *what)
{
	say("%s did not stop the machine; halting", what);
	svc_halt();
}

void guest_main(u64 start_info) __attribute__((noreturn, used));
void guest_main(u64 start_info)
{
	/* Loaders zero .bss, but a VMM reset may re-enter without reloading. */
	memset(__bss_start, 0, (usize)(__bss_end - __bss_start));
	uart_init();
	cpu_init_idt();
	bool have_info = bootinfo_parse(start_info);
	mem_init();
	if (!have_info)
		say("no valid hvm_start_info at 0x%lx", start_info);
	if (!cpu_map_high_ram())
		say("RAM above 4 GiB is not fully mapped");
	acpi_init();
	i8042_init();
	const char *clock = time_init();
	if (!strcmp(clock, "assumed"))
		say("TSC frequency unknown, assuming %lu MHz", time_tsc_hz() / 1000000);
	virtio_scan(boot.cmdline);
	actions_run(boot.cmdline);
	guest_idle();
}

/* The machine's devices on their buses, and the console input thread. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "vmm.h"
#include "x86/layout.h"

/* A device's interrupt line: GSI n is IOAPIC pin n. */
static void irq_set_level(void *ctx, uint32_t gsi, int level)
{
	struct fl_vm *vm = ctx;

	fl_ioapic_set_level(&vm->ioapic, gsi, level);
}

static void sink_raise(void *ctx, uint32_t kind, int64_t code, uint64_t detail,
		       const char *reason)
{
	struct fl_vm *vm = ctx;

	fl_event_raise(vm, fl_vcpu_current(), kind, code, &detail, 1, reason);
}

int fl_devices_init(struct fl_vm *vm, int out_fd)
{
	struct fl_sink sink = {.raise = sink_raise, .ctx = vm};
	int rc;

	vm->pio.counters = &vm->counters;
	vm->mmio.counters = &vm->counters;
	vm->io_wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (vm->io_wake_fd < 0)
		return fl_fail(vm, errno, "eventfd: %s", strerror(errno));
	/* The IOAPIC's id follows the local APICs' (0..N-1), as the MADT says. */
	rc = fl_ioapic_init(&vm->ioapic, (uint8_t)vm->nvcpus,
			    (struct fl_msi_sink){fl_kvm_signal_msi, fl_kvm_set_routes, vm});
	if (rc < 0) {
		fl_fail(vm, -rc, "IOAPIC init");
		goto close_wake;
	}

	rc = fl_serial_init(&vm->serial, (struct fl_irq){irq_set_level, vm, FL_IRQ_COM1}, out_fd,
			    vm->io_wake_fd, &vm->counters);
	if (rc < 0) {
		fl_fail(vm, -rc, "serial init");
		goto ioapic;
	}
	rc = fl_i8042_init(&vm->i8042, (struct fl_irq){irq_set_level, vm, FL_IRQ_I8042}, sink);
	if (rc < 0) {
		fl_fail(vm, -rc, "i8042 init");
		goto serial;
	}
	fl_pm_init(&vm->pm, sink);
	vm->pvpanic.sink = sink;
	vm->debugexit.sink = sink;
	vm->resetctl.sink = sink;

	if ((rc = fl_bus_add(&vm->pio, FL_PORT_COM1, 8, "serial", &vm->serial, fl_serial_io)) ||
	    (rc = fl_bus_add(&vm->pio, FL_PORT_I8042_DATA, 1, "i8042", &vm->i8042,
			     fl_i8042_data_io)) ||
	    (rc = fl_bus_add(&vm->pio, FL_PORT_I8042_CMD, 1, "i8042_cmd", &vm->i8042,
			     fl_i8042_cmd_io)) ||
	    (rc = fl_bus_add(&vm->pio, FL_PORT_SLEEP_CONTROL, 2, "acpi_sleep", &vm->pm,
			     fl_pm_io)) ||
	    (rc = fl_bus_add(&vm->pio, FL_PORT_PVPANIC, 1, "pvpanic", &vm->pvpanic,
			     fl_pvpanic_io)) ||
	    (rc = fl_bus_add(&vm->pio, FL_PORT_DEBUG_EXIT, 4, "debug_exit", &vm->debugexit,
			     fl_debugexit_io)) ||
	    (rc = fl_bus_add(&vm->pio, FL_PORT_RESET_CONTROL, 1, "reset_control", &vm->resetctl,
			     fl_resetctl_io)) ||
	    (rc = fl_bus_add(&vm->pio, FL_PORT_PIC1, 2, "pic1", NULL, fl_pic_io)) ||
	    (rc = fl_bus_add(&vm->pio, FL_PORT_PIC2, 2, "pic2", NULL, fl_pic_io))) {
		fl_fail(vm, -rc, "placing devices on the I/O bus");
		goto i8042;
	}
	rc = fl_bus_add(&vm->mmio, FL_IOAPIC_GPA, 0x1000, "ioapic", &vm->ioapic, fl_ioapic_mmio);
	if (rc < 0) {
		fl_fail(vm, -rc, "placing the IOAPIC on the MMIO bus");
		goto i8042;
	}
	vm->devices_ready = 1;
	return 0;

i8042:
	fl_i8042_fini(&vm->i8042);
serial:
	fl_serial_fini(&vm->serial);
ioapic:
	fl_ioapic_fini(&vm->ioapic);
close_wake:
	close(vm->io_wake_fd);
	vm->io_wake_fd = -1;
	return rc;
}

void fl_devices_fini(struct fl_vm *vm)
{
	if (!vm->devices_ready)
		return;
	fl_i8042_fini(&vm->i8042);
	fl_serial_fini(&vm->serial);
	fl_ioapic_fini(&vm->ioapic);
	close(vm->io_wake_fd);
	vm->io_wake_fd = -1;
	vm->devices_ready = 0;
}

/* Feeds console input into the UART while the machine runs and the FIFO has room. */
static void *console_thread(void *arg)
{
	struct fl_vm *vm = arg;
	int in_fd = vm->console_in_fd;
	uint8_t buf[FL_SERIAL_FIFO];
	sigset_t set;

	sigfillset(&set);
	pthread_sigmask(SIG_SETMASK, &set, NULL);
	while (!__atomic_load_n(&vm->io_stop, __ATOMIC_SEQ_CST)) {
		int running = fl_vm_state(vm) == FL_STATE_RUNNING;
		uint32_t room = fl_serial_room(&vm->serial);
		struct pollfd p[2] = {
			{.fd = vm->io_wake_fd, .events = POLLIN},
			{.fd = (in_fd >= 0 && running && room) ? in_fd : -1, .events = POLLIN},
		};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[0].revents & POLLIN) {
			uint64_t v;
			if (read(vm->io_wake_fd, &v, sizeof(v)) < 0) {
				/* raced with another drain */
			}
		}
		if (p[1].fd >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR))) {
			/* The machine may have paused since `running` was read (a save capturing the
			 * UART): read and feed only if it still runs, under the gate a pause takes. */
			ssize_t n = 0;
			pthread_mutex_lock(&vm->io_gate);
			if (fl_vm_state(vm) == FL_STATE_RUNNING) {
				n = read(in_fd, buf, room < sizeof(buf) ? room : sizeof(buf));
				if (n > 0)
					fl_serial_input(&vm->serial, buf, (uint32_t)n);
				else if (n == 0 || (errno != EINTR && errno != EAGAIN))
					in_fd = -1; /* EOF or a dead fd: no more input */
			}
			pthread_mutex_unlock(&vm->io_gate);
		}
	}
	return NULL;
}

void fl_console_wake(struct fl_vm *vm)
{
	uint64_t one = 1;

	if (vm->io_wake_fd >= 0 && write(vm->io_wake_fd, &one, sizeof(one)) < 0) {
		/* the counter cannot overflow in practice */
	}
}

int fl_console_start(struct fl_vm *vm)
{
	int e;

	if (vm->console_in_fd < 0)
		return 0;
	vm->io_stop = 0;
	e = pthread_create(&vm->io_thread, NULL, console_thread, vm);
	if (e != 0)
		return fl_fail(vm, e, "starting the console thread: %s", strerror(e));
	vm->io_started = 1;
	return 0;
}

void fl_console_stop(struct fl_vm *vm)
{
	if (!vm->io_started)
		return;
	__atomic_store_n(&vm->io_stop, 1, __ATOMIC_SEQ_CST);
	fl_console_wake(vm);
	pthread_join(vm->io_thread, NULL);
	vm->io_started = 0;
}

/*
 * Machine events: a small queue behind an eventfd. The eventfd is readable while the queue
 * holds events; it is drained under the queue lock when the last event is read, so a reader
 * polling it never misses one.
 */
#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vmm.h"

static int is_terminal(uint32_t kind)
{
	return kind == FL_EVENT_POWEROFF || kind == FL_EVENT_REBOOT ||
	       kind == FL_EVENT_INTERNAL_ERROR;
}

int fl_events_init(struct fl_vm *vm)
{
	vm->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (vm->event_fd < 0)
		return fl_fail(vm, errno, "eventfd: %s", strerror(errno));
	if (pthread_mutex_init(&vm->ev_lock, NULL) != 0) {
		close(vm->event_fd);
		vm->event_fd = -1;
		return fl_fail(vm, ENOMEM, "event queue lock");
	}
	vm->ev_head = vm->ev_count = vm->ev_lost = 0;
	return 0;
}

void fl_events_fini(struct fl_vm *vm)
{
	if (vm->event_fd >= 0) {
		close(vm->event_fd);
		pthread_mutex_destroy(&vm->ev_lock);
	}
	vm->event_fd = -1;
}

void fl_event_raise(struct fl_vm *vm, uint32_t vcpu, uint32_t kind, int64_t code,
		    const uint64_t *detail, uint32_t ndetail, const char *reason)
{
	struct fl_event ev;
	int terminal = is_terminal(kind);
	uint64_t one = 1;

	memset(&ev, 0, sizeof(ev));
	ev.kind = kind;
	ev.vcpu = vcpu;
	ev.code = code;
	for (uint32_t i = 0; i < ndetail && i < 4; i++)
		ev.detail[i] = detail[i];
	strncpy(ev.reason, reason ? reason : "", sizeof(ev.reason) - 1);

	pthread_mutex_lock(&vm->ev_lock);
	/* Only the first terminal event counts: later ones come from vCPUs racing to stop. */
	if (terminal && vm->terminated) {
		pthread_mutex_unlock(&vm->ev_lock);
		return;
	}
	if (terminal)
		vm->terminated = 1;
	if (vm->ev_count == FL_EVENT_QUEUE) {
		/* A guest spamming pvpanic must not push out the event that ends it. */
		vm->ev_lost++;
		if (!terminal) {
			pthread_mutex_unlock(&vm->ev_lock);
			return;
		}
		vm->ev_count--;
	}
	vm->events[(vm->ev_head + vm->ev_count) % FL_EVENT_QUEUE] = ev;
	vm->ev_count++;
	if (write(vm->event_fd, &one, sizeof(one)) < 0) {
		/* Counter overflow is impossible at this rate; nothing else can fail. */
	}
	pthread_mutex_unlock(&vm->ev_lock);

	if (terminal)
		fl_vm_terminate(vm);
}

int fl_event_read(struct fl_vm *vm, struct fl_event *ev)
{
	int got = 0;
	uint64_t v;

	if (!vm || !ev)
		return -EINVAL;
	if (vm->event_fd < 0)
		return fl_fail(vm, EBADF, "machine is not configured");
	pthread_mutex_lock(&vm->ev_lock);
	if (vm->ev_count > 0) {
		*ev = vm->events[vm->ev_head];
		vm->ev_head = (vm->ev_head + 1) % FL_EVENT_QUEUE;
		vm->ev_count--;
		got = 1;
	}
	if (vm->ev_count == 0) {
		if (read(vm->event_fd, &v, sizeof(v)) < 0) {
			/* EAGAIN: already drained */
		}
	}
	pthread_mutex_unlock(&vm->ev_lock);
	return got;
}

int fl_event_fd(const struct fl_vm *vm)
{
	return vm ? vm->event_fd : -EINVAL;
}

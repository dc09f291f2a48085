/*
 * vCPUs: one thread each, with explicit RUNNING/PAUSED states. A controller changes a vCPU's
 * request under vm->lock, then kicks it: immediate_exit makes a KVM_RUN about to start return
 * at once, and a signal interrupts one already inside the kernel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vmm.h"

static __thread uint32_t current_vcpu = UINT32_MAX;
static pthread_once_t kick_once = PTHREAD_ONCE_INIT;
static int kick_installed;

static int kick_signal(void)
{
	return SIGRTMIN + 7;
}

static void kick_handler(int sig)
{
	(void)sig; /* its only job is to make KVM_RUN return -EINTR */
}

static void kick_install(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = kick_handler;
	sigemptyset(&sa.sa_mask);
	/* no SA_RESTART: blocking writes to the console are interrupted too */
	kick_installed = sigaction(kick_signal(), &sa, NULL) == 0;
}

uint32_t fl_vcpu_current(void)
{
	return current_vcpu;
}

static void kick(struct fl_vcpu *v)
{
	if (!v->thread_started)
		return;
	__atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
	pthread_kill(v->thread, kick_signal());
}

static int is_stop_state(int state)
{
	return state == FL_VCPU_DONE;
}

void fl_vm_terminate(struct fl_vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	for (uint32_t i = 0; i < vm->nvcpus; i++) {
		struct fl_vcpu *v = &vm->vcpus[i];
		v->request = FL_REQ_STOP;
		if (v->id != current_vcpu)
			kick(v);
	}
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
}

static void raise_error(struct fl_vcpu *v, int64_t code, const uint64_t *detail, uint32_t n,
			const char *reason)
{
	fl_event_raise(v->vm, v->id, FL_EVENT_INTERNAL_ERROR, code, detail, n, reason);
}

static void count(uint64_t *c)
{
	__atomic_add_fetch(c, 1, __ATOMIC_RELAXED);
}

static void handle_io(struct fl_vcpu *v)
{
	struct kvm_run *run = v->run;
	struct fl_vm *vm = v->vm;
	uint64_t size = run->io.size, n = run->io.count, off = run->io.data_offset;
	int is_write = run->io.direction == KVM_EXIT_IO_OUT;

	count(&vm->counters.exits_io);
	if (size == 0 || size > 8 || n == 0 || off > v->run_size ||
	    size * n > v->run_size - off) {
		uint64_t d[3] = {size, n, off};
		raise_error(v, KVM_EXIT_IO, d, 3, "bad_io_exit");
		return;
	}
	uint8_t *data = (uint8_t *)run + off;
	for (uint64_t i = 0; i < n; i++, data += size) {
		if (fl_bus_dispatch(&vm->pio, run->io.port, data, (uint32_t)size, is_write) < 0) {
			count(&vm->counters.unhandled_io);
			if (!is_write)
				memset(data, 0xff, size);
		}
	}
}

static void handle_mmio(struct fl_vcpu *v)
{
	struct kvm_run *run = v->run;
	struct fl_vm *vm = v->vm;
	uint32_t len = run->mmio.len;

	count(&vm->counters.exits_mmio);
	if (len == 0 || len > sizeof(run->mmio.data)) {
		uint64_t d[2] = {run->mmio.phys_addr, len};
		raise_error(v, KVM_EXIT_MMIO, d, 2, "bad_mmio_exit");
		return;
	}
	if (fl_bus_dispatch(&vm->mmio, run->mmio.phys_addr, run->mmio.data, len,
			    run->mmio.is_write) < 0) {
		count(&vm->counters.unhandled_mmio);
		if (!run->mmio.is_write)
			memset(run->mmio.data, 0xff, len);
	}
}

static void handle_exit(struct fl_vcpu *v)
{
	struct kvm_run *run = v->run;
	struct fl_vm *vm = v->vm;
	uint64_t d[4] = {0};

	switch (run->exit_reason) {
	case KVM_EXIT_IO:
		handle_io(v);
		break;
	case KVM_EXIT_MMIO:
		handle_mmio(v);
		break;
	case KVM_EXIT_HLT:
		/* The in-kernel LAPIC handles HLT; seeing one means a halted, dead vCPU. */
		count(&vm->counters.exits_hlt);
		break;
	case KVM_EXIT_IOAPIC_EOI:
		/* A level-triggered vector retired: the IOAPIC may clear Remote IRR. */
		fl_ioapic_eoi(&vm->ioapic, run->eoi.vector);
		break;
	case KVM_EXIT_IRQ_WINDOW_OPEN:
	case KVM_EXIT_INTR:
		count(&vm->counters.exits_intr);
		break;
	case KVM_EXIT_SHUTDOWN:
		count(&vm->counters.exits_shutdown);
		fl_event_raise(vm, v->id, FL_EVENT_REBOOT, 0, NULL, 0, "triple_fault");
		break;
	case KVM_EXIT_SYSTEM_EVENT:
		count(&vm->counters.exits_system_event);
		d[0] = run->system_event.type;
		if (run->system_event.type == KVM_SYSTEM_EVENT_SHUTDOWN)
			fl_event_raise(vm, v->id, FL_EVENT_POWEROFF, 0, d, 1, "system_event");
		else if (run->system_event.type == KVM_SYSTEM_EVENT_RESET)
			fl_event_raise(vm, v->id, FL_EVENT_REBOOT, 0, d, 1, "system_event");
		else if (run->system_event.type == KVM_SYSTEM_EVENT_CRASH)
			fl_event_raise(vm, v->id, FL_EVENT_CRASHED, 0, d, 1, "system_event");
		break;
	case KVM_EXIT_INTERNAL_ERROR: {
		count(&vm->counters.exits_internal_error);
		uint32_t nd = run->internal.ndata;
		d[0] = run->internal.suberror;
		for (uint32_t i = 0; i < nd && i < 3 && i < 16; i++)
			d[1 + i] = run->internal.data[i];
		raise_error(v, KVM_EXIT_INTERNAL_ERROR, d, 4,
			    run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION
				    ? "emulation_failure"
				    : "internal_error");
		break;
	}
	case KVM_EXIT_FAIL_ENTRY:
		count(&vm->counters.exits_internal_error);
		d[0] = run->fail_entry.hardware_entry_failure_reason;
		raise_error(v, KVM_EXIT_FAIL_ENTRY, d, 1, "fail_entry");
		break;
	default:
		count(&vm->counters.exits_other);
		d[0] = run->exit_reason;
		raise_error(v, run->exit_reason, d, 1, "unexpected_exit");
		break;
	}
}

/*
 * KVM finishes an IN or MMIO read only on the next KVM_RUN. Before parking, enter once with
 * immediate_exit so the vCPU state is complete and can be saved.
 */
static void complete_pending_io(struct fl_vcpu *v)
{
	__atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
	if (ioctl(v->fd, KVM_RUN, 0) < 0) {
		/* -EINTR is the expected outcome */
	}
	__atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
}

static void *vcpu_thread(void *arg)
{
	struct fl_vcpu *v = arg;
	struct fl_vm *vm = v->vm;
	sigset_t set;
	int pending_io = 0;

	current_vcpu = v->id;
	sigfillset(&set);
	sigdelset(&set, kick_signal());
	pthread_sigmask(SIG_SETMASK, &set, NULL);

	pthread_mutex_lock(&vm->lock);
	for (;;) {
		if (v->request == FL_REQ_PAUSE && pending_io) {
			pthread_mutex_unlock(&vm->lock);
			complete_pending_io(v);
			pending_io = 0;
			pthread_mutex_lock(&vm->lock);
			continue;
		}
		if (v->request == FL_REQ_PAUSE) {
			if (v->state != FL_VCPU_PAUSED) {
				v->state = FL_VCPU_PAUSED;
				pthread_cond_broadcast(&vm->cond);
			}
			pthread_cond_wait(&vm->cond, &vm->lock);
			continue;
		}
		if (v->request == FL_REQ_STOP)
			break;
		if (v->state != FL_VCPU_RUNNING) {
			v->state = FL_VCPU_RUNNING;
			pthread_cond_broadcast(&vm->cond);
		}
		pthread_mutex_unlock(&vm->lock);

		int r = ioctl(v->fd, KVM_RUN, 0);
		int e = errno;
		__atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
		count(&vm->counters.exits_total);
		pending_io = 0;
		if (r < 0) {
			if (e == EINTR || e == EAGAIN) {
				count(&vm->counters.exits_intr);
			} else {
				uint64_t d[2] = {0, (uint64_t)e};
				raise_error(v, -1, d, 2, "kvm_run_failed");
			}
		} else {
			pending_io = v->run->exit_reason == KVM_EXIT_IO ||
				     v->run->exit_reason == KVM_EXIT_MMIO;
			handle_exit(v);
		}
		pthread_mutex_lock(&vm->lock);
	}
	v->state = FL_VCPU_DONE;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	return NULL;
}

int fl_vcpus_create(struct fl_vm *vm)
{
	int mmap_size, rc;

	pthread_once(&kick_once, kick_install);
	if (!kick_installed)
		return fl_fail(vm, EINVAL, "cannot install the vCPU kick signal handler");
	mmap_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size < (int)sizeof(struct kvm_run))
		return fl_fail(vm, errno ? errno : EINVAL, "KVM_GET_VCPU_MMAP_SIZE: %s",
			       strerror(errno));
	vm->vcpus = calloc(vm->nvcpus, sizeof(*vm->vcpus));
	if (!vm->vcpus)
		return fl_fail(vm, ENOMEM, "allocating %u vCPUs", vm->nvcpus);
	for (uint32_t i = 0; i < vm->nvcpus; i++)
		vm->vcpus[i].fd = -1;
	for (uint32_t i = 0; i < vm->nvcpus; i++) {
		struct fl_vcpu *v = &vm->vcpus[i];
		v->vm = vm;
		v->id = i;
		v->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, (unsigned long)i);
		if (v->fd < 0) {
			rc = fl_fail(vm, errno, "KVM_CREATE_VCPU %u: %s", i, strerror(errno));
			goto fail;
		}
		v->run_size = (size_t)mmap_size;
		v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
		if (v->run == MAP_FAILED) {
			v->run = NULL;
			rc = fl_fail(vm, errno, "mapping kvm_run of vCPU %u: %s", i,
				     strerror(errno));
			goto fail;
		}
		rc = fl_cpuid_apply(vm, v);
		if (rc < 0)
			goto fail;
		rc = fl_lapic_init(vm, v);
		if (rc < 0)
			goto fail;
	}
	return 0;

fail:
	fl_vcpus_destroy(vm);
	return rc;
}

int fl_vcpus_start(struct fl_vm *vm)
{
	pthread_attr_t attr;
	int rc = 0;

	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	pthread_mutex_lock(&vm->lock);
	for (uint32_t i = 0; i < vm->nvcpus; i++) {
		struct fl_vcpu *v = &vm->vcpus[i];
		v->request = FL_REQ_RUN;
		v->state = FL_VCPU_IDLE;
		int e = pthread_create(&v->thread, &attr, vcpu_thread, v);
		if (e != 0) {
			rc = fl_fail(vm, e, "starting vCPU %u thread: %s", i, strerror(e));
			break;
		}
		v->thread_started = 1;
	}
	pthread_mutex_unlock(&vm->lock);
	pthread_attr_destroy(&attr);
	if (rc < 0) {
		fl_vcpus_request(vm, FL_REQ_STOP, 1);
		fl_vcpus_join(vm);
	}
	return rc;
}

int fl_vcpus_request(struct fl_vm *vm, int request, int wait)
{
	pthread_mutex_lock(&vm->lock);
	for (uint32_t i = 0; i < vm->nvcpus; i++) {
		struct fl_vcpu *v = &vm->vcpus[i];
		if (v->request == FL_REQ_STOP)
			continue; /* stopping is final */
		v->request = request;
		if (request != FL_REQ_RUN)
			kick(v);
	}
	pthread_cond_broadcast(&vm->cond);
	while (wait) {
		int done = 1;
		for (uint32_t i = 0; i < vm->nvcpus; i++) {
			struct fl_vcpu *v = &vm->vcpus[i];
			if (!v->thread_started || is_stop_state(v->state))
				continue;
			if (request == FL_REQ_PAUSE && v->state == FL_VCPU_PAUSED &&
			    v->request == FL_REQ_PAUSE)
				continue;
			if (request == FL_REQ_RUN && v->state != FL_VCPU_PAUSED)
				continue;
			done = 0;
		}
		if (done)
			break;
		pthread_cond_wait(&vm->cond, &vm->lock);
	}
	pthread_mutex_unlock(&vm->lock);
	return 0;
}

void fl_vcpus_join(struct fl_vm *vm)
{
	for (uint32_t i = 0; vm->vcpus && i < vm->nvcpus; i++) {
		struct fl_vcpu *v = &vm->vcpus[i];
		if (v->thread_started) {
			pthread_join(v->thread, NULL);
			v->thread_started = 0;
		}
	}
}

void fl_vcpus_destroy(struct fl_vm *vm)
{
	if (!vm->vcpus)
		return;
	for (uint32_t i = 0; i < vm->nvcpus; i++) {
		struct fl_vcpu *v = &vm->vcpus[i];
		if (v->run)
			munmap(v->run, v->run_size);
		if (v->fd >= 0)
			close(v->fd);
	}
	free(vm->vcpus);
	vm->vcpus = NULL;
}

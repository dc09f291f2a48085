/* The public lifecycle of a machine: configure, start, pause, resume, shutdown, stop. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "virtio/blk.h"
#include "vmm.h"

#define FL_MIN_MEMORY_MIB 4

static const uint8_t ctrl_alt_del[] = {0x1d, 0x38, 0x53, 0xd3, 0xb8, 0x9d};

struct fl_vm *fl_vm_new(void)
{
	struct fl_vm *vm = calloc(1, sizeof(*vm));

	if (!vm)
		return NULL;
	vm->kvm_fd = vm->vm_fd = vm->event_fd = vm->io_wake_fd = vm->console_in_fd = -1;
	vm->mem.memfd = vm->mem.file_fd = -1;
	if (pthread_mutex_init(&vm->lock, NULL) != 0)
		goto free_vm;
	if (pthread_cond_init(&vm->cond, NULL) != 0)
		goto lock;
	if (pthread_mutex_init(&vm->api_lock, NULL) != 0)
		goto cond;
	if (pthread_mutex_init(&vm->io_gate, NULL) != 0)
		goto api_lock;
	vm->lock_ready = 1;
	vm->state = FL_STATE_NEW;
	return vm;

api_lock:
	pthread_mutex_destroy(&vm->api_lock);
cond:
	pthread_cond_destroy(&vm->cond);
lock:
	pthread_mutex_destroy(&vm->lock);
free_vm:
	free(vm);
	return NULL;
}

const char *fl_vm_error(const struct fl_vm *vm)
{
	return vm ? vm->err : "no machine handle";
}

int fl_vm_state(const struct fl_vm *vm)
{
	int state = __atomic_load_n(&vm->state, __ATOMIC_SEQ_CST);

	if ((state == FL_STATE_RUNNING || state == FL_STATE_PAUSED) &&
	    __atomic_load_n(&vm->terminated, __ATOMIC_SEQ_CST))
		return FL_STATE_STOPPED;
	return state;
}

static void set_state(struct fl_vm *vm, int state)
{
	__atomic_store_n(&vm->state, state, __ATOMIC_SEQ_CST);
	fl_console_wake(vm);
}

static int check_config(struct fl_vm *vm, const struct fl_config *cfg, int restoring)
{
	if (!restoring && (!cfg->kernel_path || !cfg->kernel_path[0]))
		return fl_fail(vm, EINVAL, "no kernel image given");
	if (cfg->memory_mib < FL_MIN_MEMORY_MIB || cfg->memory_mib > FL_MAX_MEMORY_MIB)
		return fl_fail(vm, EINVAL, "memory must be %d..%d MiB, not %llu",
			       FL_MIN_MEMORY_MIB, FL_MAX_MEMORY_MIB,
			       (unsigned long long)cfg->memory_mib);
	if (cfg->vcpus < 1 || cfg->vcpus > FL_MAX_VCPUS)
		return fl_fail(vm, EINVAL, "vCPU count must be 1..%d, not %u", FL_MAX_VCPUS,
			       cfg->vcpus);
	if (cfg->cmdline && strlen(cfg->cmdline) >= FL_MAX_CMDLINE)
		return fl_fail(vm, EINVAL, "command line longer than %d bytes", FL_MAX_CMDLINE - 1);
	return 0;
}

int fl_vm_configure(struct fl_vm *vm, const struct fl_config *cfg)
{
	int rc;

	if (!vm || !cfg)
		return -EINVAL;
	pthread_mutex_lock(&vm->api_lock);
	if (vm->state != FL_STATE_NEW)
		rc = fl_fail(vm, EBUSY, "machine is already configured");
	else
		rc = fl_vm_build(vm, cfg, -1);
	pthread_mutex_unlock(&vm->api_lock);
	return rc;
}

int fl_vm_build(struct fl_vm *vm, const struct fl_config *cfg, int memory_fd)
{
	struct fl_boot boot;
	struct fl_config with_devices;
	char *cmdline = NULL;
	uint64_t rsdp = 0;
	int restoring = memory_fd >= 0;
	int rc;

	rc = check_config(vm, cfg, restoring);
	if (rc < 0)
		goto out;
	vm->nvcpus = cfg->vcpus;
	rc = fl_kvm_create(vm);
	if (rc < 0)
		goto out;
	if (restoring) {
		rc = fl_mem_init_file(&vm->mem, cfg->memory_mib * FL_MIB, memory_fd, vm->err,
				      sizeof(vm->err));
		memory_fd = -1; /* the memory owns it now */
		/* From the snapshot on, pages written are logged: the next one can be a diff. */
		vm->mem.log_dirty = 1;
	} else {
		rc = fl_mem_init(&vm->mem, cfg->memory_mib * FL_MIB,
				 !!(cfg->flags & FL_CONFIG_MEMFD), vm->err, sizeof(vm->err));
	}
	if (rc < 0)
		goto kvm;
	rc = fl_mem_register(&vm->mem, vm->vm_fd, vm->err, sizeof(vm->err));
	if (rc < 0)
		goto mem;
	rc = fl_kvm_create_irqchip(vm);
	if (rc < 0)
		goto mem;
	rc = fl_events_init(vm);
	if (rc < 0)
		goto mem;
	rc = fl_devices_init(vm, cfg->console_out_fd);
	if (rc < 0)
		goto events;
	rc = fl_virtio_slots_init(vm, cfg);
	if (rc < 0)
		goto slots;
	with_devices = *cfg;
	if (vm->nvirtio && !restoring) {
		cmdline = fl_virtio_cmdline(vm, cfg->cmdline);
		if (!cmdline) {
			rc = -EINVAL;
			goto slots;
		}
		with_devices.cmdline = cmdline;
	}
	rc = fl_cpuid_init(vm);
	if (rc < 0)
		goto slots;
	if (!restoring) {
		/* A restored guest has its tables, kernel and boot data in its memory already. */
		rc = fl_acpi_build(vm, &rsdp);
		if (rc < 0)
			goto cpuid;
		rc = fl_reset_vector_write(vm);
		if (rc < 0)
			goto cpuid;
		rc = fl_boot_load(vm, &with_devices, rsdp, &boot);
		if (rc < 0)
			goto cpuid;
	}
	rc = fl_vcpus_create(vm);
	if (rc < 0)
		goto cpuid;
	if (!restoring) {
		rc = fl_boot_setup_bsp(vm, &vm->vcpus[0], &boot);
		if (rc < 0)
			goto vcpus;
	}
	vm->console_in_fd = cfg->console_in_fd;
	set_state(vm, FL_STATE_CONFIGURED);
	rc = 0;
	goto out;

vcpus:
	fl_vcpus_destroy(vm);
cpuid:
	free(vm->cpuid);
	vm->cpuid = NULL;
slots:
	fl_virtio_slots_fini(vm);
	fl_devices_fini(vm);
events:
	fl_events_fini(vm);
mem:
	fl_mem_fini(&vm->mem);
kvm:
	fl_kvm_destroy(vm);
out:
	if (memory_fd >= 0)
		close(memory_fd);
	free(cmdline);
	return rc;
}

int fl_vm_start(struct fl_vm *vm)
{
	int rc;

	pthread_mutex_lock(&vm->api_lock);
	if (vm->state != FL_STATE_CONFIGURED) {
		rc = fl_fail(vm, EINVAL, "machine cannot start: %s",
			     vm->state == FL_STATE_NEW ? "not configured" : "already started");
		goto out;
	}
	/* No vCPU runs without its disks' locks (a migrated-in machine takes them last). */
	rc = fl_virtio_disks_lock(vm, FL_BLK_LOCK_WHOLE);
	if (rc < 0)
		goto out;
	set_state(vm, FL_STATE_RUNNING);
	rc = fl_console_start(vm);
	if (rc < 0)
		goto fail;
	rc = fl_virtio_slots_start(vm);
	if (rc < 0) {
		fl_console_stop(vm);
		goto fail;
	}
	rc = fl_vcpus_start(vm);
	if (rc < 0) {
		fl_virtio_slots_stop(vm);
		fl_console_stop(vm);
		goto fail;
	}
	goto out;
fail:
	set_state(vm, FL_STATE_STOPPED);
out:
	pthread_mutex_unlock(&vm->api_lock);
	return rc;
}

static int require_live(struct fl_vm *vm, int want, const char *verb)
{
	int state = fl_vm_state(vm);

	if (state == want)
		return 0;
	if (state == FL_STATE_STOPPED)
		return fl_fail(vm, ESRCH, "cannot %s: machine has stopped", verb);
	return fl_fail(vm, EINVAL, "cannot %s: machine is %s", verb,
		       state == FL_STATE_PAUSED	     ? "paused"
		       : state == FL_STATE_RUNNING   ? "running"
						     : "not started");
}

int fl_vm_pause_locked(struct fl_vm *vm)
{
	int rc = require_live(vm, FL_STATE_RUNNING, "pause");

	if (rc == 0) {
		/* Under the console's gate: input read before it is in the UART (and in a snapshot
		 * taken now); none is read after it until the machine runs again. */
		pthread_mutex_lock(&vm->io_gate);
		set_state(vm, FL_STATE_PAUSED);
		pthread_mutex_unlock(&vm->io_gate);
		fl_vcpus_request(vm, FL_REQ_PAUSE, 1);
		/* After the vCPUs: no new notifications come, and guest memory stays still. */
		fl_virtio_slots_pause(vm, 1);
		if (fl_vm_state(vm) == FL_STATE_STOPPED)
			rc = fl_fail(vm, ESRCH, "machine stopped while pausing");
	}
	return rc;
}

int fl_vm_resume_locked(struct fl_vm *vm)
{
	int rc = require_live(vm, FL_STATE_PAUSED, "resume");

	/* A source that handed its disks' locks to a migration target takes them back first:
	 * if someone else holds one now, the machine stays paused (never two writers). */
	if (rc == 0)
		rc = fl_virtio_disks_lock(vm, FL_BLK_LOCK_WHOLE);
	if (rc == 0) {
		fl_virtio_slots_pause(vm, 0);
		fl_vcpus_request(vm, FL_REQ_RUN, 1);
		set_state(vm, FL_STATE_RUNNING);
	}
	return rc;
}

int fl_vm_pause(struct fl_vm *vm)
{
	int rc;

	pthread_mutex_lock(&vm->api_lock);
	rc = fl_vm_pause_locked(vm);
	pthread_mutex_unlock(&vm->api_lock);
	return rc;
}

int fl_vm_resume(struct fl_vm *vm)
{
	int rc;

	pthread_mutex_lock(&vm->api_lock);
	rc = fl_vm_resume_locked(vm);
	pthread_mutex_unlock(&vm->api_lock);
	return rc;
}

int fl_vm_shutdown(struct fl_vm *vm, int method)
{
	int rc;

	pthread_mutex_lock(&vm->api_lock);
	rc = require_live(vm, FL_STATE_RUNNING, "request a shutdown");
	if (rc < 0)
		goto out;
	switch (method) {
	case FL_SHUTDOWN_CTRL_ALT_DEL:
		rc = fl_i8042_inject(&vm->i8042, ctrl_alt_del, sizeof(ctrl_alt_del));
		if (rc < 0)
			rc = fl_fail(vm, -rc, "i8042 output queue is full");
		break;
	case FL_SHUTDOWN_ACPI:
		/* A press of the power button: an edge on the GED's pin (the DSDT's \_SB.GED0). */
		fl_ioapic_set_level(&vm->ioapic, FL_GSI_POWER_BUTTON, 1);
		fl_ioapic_set_level(&vm->ioapic, FL_GSI_POWER_BUTTON, 0);
		break;
	default:
		rc = fl_fail(vm, EINVAL, "unknown shutdown method %d", method);
		break;
	}
out:
	pthread_mutex_unlock(&vm->api_lock);
	return rc;
}

static void stop_locked(struct fl_vm *vm)
{
	if (vm->vcpus) {
		fl_vcpus_request(vm, FL_REQ_STOP, 1);
		fl_vcpus_join(vm);
	}
	fl_virtio_slots_stop(vm);
	fl_console_stop(vm);
	if (vm->state != FL_STATE_NEW)
		set_state(vm, FL_STATE_STOPPED);
}

int fl_vm_stop(struct fl_vm *vm)
{
	pthread_mutex_lock(&vm->api_lock);
	stop_locked(vm);
	pthread_mutex_unlock(&vm->api_lock);
	return 0;
}

/* Releases what fl_vm_build made; the handle is NEW again. */
void fl_vm_unbuild(struct fl_vm *vm)
{
	stop_locked(vm);
	fl_vcpus_destroy(vm);
	free(vm->cpuid);
	vm->cpuid = NULL;
	fl_virtio_slots_fini(vm);
	fl_devices_fini(vm);
	fl_events_fini(vm);
	fl_mem_fini(&vm->mem);
	fl_kvm_destroy(vm);
	free(vm->snap.pending);
	free(vm->snap.devices);
	memset(&vm->snap, 0, sizeof(vm->snap));
	vm->gmem.dirty = NULL;
	vm->nvcpus = 0;
	vm->console_in_fd = -1;
	__atomic_store_n(&vm->terminated, 0, __ATOMIC_SEQ_CST);
	__atomic_store_n(&vm->state, FL_STATE_NEW, __ATOMIC_SEQ_CST);
}

void fl_vm_destroy(struct fl_vm *vm)
{
	if (!vm)
		return;
	pthread_mutex_lock(&vm->api_lock);
	fl_vm_unbuild(vm);
	pthread_mutex_unlock(&vm->api_lock);
	pthread_mutex_destroy(&vm->io_gate);
	pthread_mutex_destroy(&vm->api_lock);
	pthread_cond_destroy(&vm->cond);
	pthread_mutex_destroy(&vm->lock);
	free(vm);
}

int fl_vm_irqfd(struct fl_vm *vm, uint32_t gsi, int fd)
{
	int rc;

	if (!vm)
		return -EINVAL;
	pthread_mutex_lock(&vm->api_lock);
	if (vm->state == FL_STATE_NEW)
		rc = fl_fail(vm, EINVAL, "machine is not configured");
	else if (fl_vm_state(vm) == FL_STATE_STOPPED)
		rc = fl_fail(vm, ESRCH, "machine has stopped");
	else
		rc = fl_kvm_irqfd_bind(vm, gsi, fd);
	pthread_mutex_unlock(&vm->api_lock);
	return rc;
}

int fl_memory_read(struct fl_vm *vm, uint64_t gpa, void *buf, uint64_t len)
{
	const void *p;

	if (!vm || (!buf && len))
		return -EINVAL;
	if (!vm->mem.host)
		return fl_fail(vm, EINVAL, "machine has no memory yet");
	p = fl_mem_ptr(&vm->mem, gpa, len);
	if (!p)
		return fl_fail(vm, EFAULT, "guest range 0x%llx+0x%llx is not RAM",
			       (unsigned long long)gpa, (unsigned long long)len);
	memcpy(buf, p, len);
	return 0;
}

int fl_counters_read(struct fl_vm *vm, struct fl_counters *out)
{
	if (!vm || !out)
		return -EINVAL;
	/* Relaxed copies: each field is consistent, the set is a snapshot in time only roughly. */
	memcpy(out, &vm->counters, sizeof(*out));
	return 0;
}

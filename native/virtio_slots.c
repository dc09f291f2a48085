/*
 * The machine's virtio-mmio slots: slot i is a 512-byte window at 0xE0000000 + i * 4 KiB
 * on IOAPIC pin 16 + i, disks first, then NICs. Queue notifications reach the device thread
 * through an ioeventfd per queue (no exit to the VMM), interrupts leave through an irqfd.
 * The guest finds the slots in the DSDT (x86/acpi.c) and on its command line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "virtio/blk.h"
#include "virtio/net.h"
#include "vmm.h"

#define STATE_MAGIC 0x53564c46u /* "FLVS" */
#define STATE_VERSION 1

struct state_blob {
	uint32_t magic;
	uint32_t version;
	uint32_t device_id;
	uint32_t size;
	struct fl_virtio_state s;
	uint64_t checksum; /* FNV-1a of everything before it */
};

static void irq_raise(void *ctx)
{
	struct fl_virtio_slot *slot = ctx;
	uint64_t one = 1;

	if (write(slot->irq_fd, &one, sizeof(one)) < 0) {
		/* the counter cannot overflow in practice */
	}
}

int fl_kvm_ioeventfd(struct fl_vm *vm, uint64_t addr, uint32_t datamatch, int fd)
{
	struct kvm_ioeventfd io = {
		.datamatch = datamatch,
		.addr = addr,
		.len = 4,
		.fd = fd,
		.flags = KVM_IOEVENTFD_FLAG_DATAMATCH,
	};

	return ioctl(vm->vm_fd, KVM_IOEVENTFD, &io) < 0 ? -errno : 0;
}

static void build_gmem(struct fl_vm *vm)
{
	struct fl_guest_mem *g = &vm->gmem;

	g->n = 0;
	g->r[g->n].first_page = 0;
	g->r[g->n].gpa = 0;
	g->r[g->n].len = vm->mem.low_size;
	g->r[g->n].host = vm->mem.host;
	g->n++;
	if (vm->mem.size > vm->mem.low_size) {
		g->r[g->n].first_page = vm->mem.low_size / 4096;
		g->r[g->n].gpa = FL_HIGH_RAM_BASE;
		g->r[g->n].len = vm->mem.size - vm->mem.low_size;
		g->r[g->n].host = vm->mem.host + vm->mem.low_size;
		g->n++;
	}
}

static int add_slot(struct fl_vm *vm, struct fl_virtio_dev *dev)
{
	uint32_t i = vm->nvirtio;
	struct fl_virtio_slot *slot = &vm->virtio[i];
	int rc;

	slot->dev = dev;
	slot->base = FL_VIRTIO_MMIO_BASE + i * FL_VIRTIO_MMIO_STRIDE;
	slot->gsi = FL_VIRTIO_GSI_BASE + i;
	slot->irq_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	vm->nvirtio++; /* from here on fini releases it */
	if (slot->irq_fd < 0)
		return fl_fail(vm, errno, "virtio slot %u: eventfd: %s", i, strerror(errno));
	rc = fl_kvm_irqfd_bind(vm, slot->gsi, slot->irq_fd);
	if (rc < 0)
		return rc;
	fl_virtio_set_irq(dev, (struct fl_virtio_irq){irq_raise, slot});
	for (uint32_t q = 0; q < dev->nqueues; q++) {
		/* Without it the MMIO handler writes the eventfd itself: slower, same effect. */
		(void)fl_kvm_ioeventfd(vm, slot->base + FL_VIRTIO_QUEUE_NOTIFY, q, dev->notify_fd[q]);
	}
	rc = fl_bus_add(&vm->mmio, slot->base, FL_VIRTIO_MMIO_SIZE, dev->device_id == VIRTIO_ID_NET ? "virtio_net" : "virtio_blk", dev, fl_virtio_mmio);
	if (rc < 0)
		return fl_fail(vm, -rc, "placing virtio slot %u on the MMIO bus", i);
	return 0;
}

int fl_virtio_slots_init(struct fl_vm *vm, const struct fl_config *cfg)
{
	char err[200];
	int rc;

	build_gmem(vm);
	if (cfg->ndisks > FL_MAX_DISKS || cfg->nnics > FL_MAX_NICS ||
	    cfg->ndisks + cfg->nnics > FL_VIRTIO_SLOTS)
		return fl_fail(vm, EINVAL, "at most %d disks and %d NICs", FL_MAX_DISKS,
			       FL_MAX_NICS);
	if ((cfg->ndisks && !cfg->disks) || (cfg->nnics && !cfg->nics))
		return fl_fail(vm, EINVAL, "device list missing");
	for (uint32_t i = 0; i < cfg->ndisks; i++) {
		const struct fl_disk_config *dc = &cfg->disks[i];
		struct fl_blk *b = calloc(1, sizeof(*b));
		if (!b)
			return fl_fail(vm, ENOMEM, "allocating a disk");
		if (!dc->path) {
			free(b);
			return fl_fail(vm, EINVAL, "disk %u has no path", i);
		}
		rc = fl_blk_init(b, dc->path,
				 (dc->flags & FL_DISK_READONLY ? FL_BLK_READ_ONLY : 0) |
					 (vm->disks_unlocked ? FL_BLK_UNLOCKED : 0),
				 dc->id, &vm->gmem, err, sizeof(err));
		if (rc < 0) {
			free(b);
			return fl_fail(vm, -rc, "%s", err);
		}
		rc = add_slot(vm, &b->vdev);
		if (rc < 0)
			return rc;
	}
	for (uint32_t i = 0; i < cfg->nnics; i++) {
		struct fl_net *n = calloc(1, sizeof(*n));
		if (!n)
			return fl_fail(vm, ENOMEM, "allocating a NIC");
		rc = fl_net_init(n, cfg->nics[i].tap_fd, cfg->nics[i].mac, &vm->gmem, err,
				 sizeof(err));
		if (rc < 0) {
			free(n);
			return fl_fail(vm, -rc, "%s", err);
		}
		rc = add_slot(vm, &n->vdev);
		if (rc < 0)
			return rc;
	}
	return 0;
}

int fl_virtio_disks_lock(struct fl_vm *vm, int want)
{
	char err[200];

	for (uint32_t i = 0; i < vm->nvirtio; i++) {
		struct fl_virtio_dev *dev = vm->virtio[i].dev;
		if (dev->device_id != VIRTIO_ID_BLOCK)
			continue;
		int rc = fl_blk_set_lock((struct fl_blk *)dev, want, err, sizeof(err));
		if (rc < 0)
			return fl_fail(vm, -rc, "%s", err);
	}
	return 0;
}

struct fl_blk *fl_virtio_disk(struct fl_vm *vm, uint32_t index)
{
	for (uint32_t i = 0; i < vm->nvirtio; i++) {
		struct fl_virtio_dev *dev = vm->virtio[i].dev;
		if (dev->device_id == VIRTIO_ID_BLOCK && index-- == 0)
			return (struct fl_blk *)dev;
	}
	return NULL;
}

void fl_virtio_slots_fini(struct fl_vm *vm)
{
	fl_virtio_slots_stop(vm);
	for (uint32_t i = 0; i < vm->nvirtio; i++) {
		struct fl_virtio_slot *slot = &vm->virtio[i];
		if (slot->dev->device_id == VIRTIO_ID_NET)
			fl_net_fini((struct fl_net *)slot->dev);
		else
			fl_blk_fini((struct fl_blk *)slot->dev);
		free(slot->dev);
		if (slot->irq_fd >= 0)
			close(slot->irq_fd);
		memset(slot, 0, sizeof(*slot));
	}
	vm->nvirtio = 0;
}

int fl_virtio_slots_start(struct fl_vm *vm)
{
	for (uint32_t i = 0; i < vm->nvirtio; i++) {
		int rc = fl_virtio_worker_start(vm->virtio[i].dev);
		if (rc < 0) {
			fl_virtio_slots_stop(vm);
			return fl_fail(vm, -rc, "starting the thread of virtio slot %u", i);
		}
	}
	return 0;
}

void fl_virtio_slots_pause(struct fl_vm *vm, int paused)
{
	for (uint32_t i = 0; i < vm->nvirtio; i++)
		fl_virtio_worker_pause(vm->virtio[i].dev, paused);
}

void fl_virtio_slots_stop(struct fl_vm *vm)
{
	for (uint32_t i = 0; i < vm->nvirtio; i++)
		fl_virtio_worker_stop(vm->virtio[i].dev);
}

char *fl_virtio_cmdline(struct fl_vm *vm, const char *cmdline)
{
	size_t cap = FL_MAX_CMDLINE, len;
	char *out = malloc(cap);

	if (!out) {
		fl_fail(vm, ENOMEM, "allocating the command line");
		return NULL;
	}
	len = (size_t)snprintf(out, cap, "%s", cmdline ? cmdline : "");
	/* The form Linux's virtio_mmio and kvmtool use: size@base:irq. */
	for (uint32_t i = 0; i < vm->nvirtio && len < cap; i++)
		len += (size_t)snprintf(out + len, cap - len, "%svirtio_mmio.device=0x%llx@0x%llx:%u",
					len ? " " : "", (unsigned long long)FL_VIRTIO_MMIO_SIZE,
					(unsigned long long)vm->virtio[i].base, vm->virtio[i].gsi);
	if (len >= cap) {
		free(out);
		fl_fail(vm, EINVAL, "command line too long with the virtio devices appended");
		return NULL;
	}
	return out;
}

/* ---- public: introspection and state ---- */

static int slot_of(struct fl_vm *vm, uint32_t slot, struct fl_virtio_dev **d)
{
	if (!vm)
		return -EINVAL;
	if (slot >= vm->nvirtio)
		return fl_fail(vm, ENOENT, "no virtio device in slot %u", slot);
	*d = vm->virtio[slot].dev;
	return 0;
}

int fl_virtio_count(struct fl_vm *vm)
{
	return vm ? (int)vm->nvirtio : -EINVAL;
}

int fl_virtio_info(struct fl_vm *vm, uint32_t slot, struct fl_virtio_info *out)
{
	struct fl_virtio_dev *d = NULL;
	int rc = slot_of(vm, slot, &d);

	if (rc < 0)
		return rc;
	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&d->lock);
	strncpy(out->name, d->name, sizeof(out->name) - 1);
	out->device_id = d->device_id;
	out->gsi = vm->virtio[slot].gsi;
	out->base = vm->virtio[slot].base;
	out->status = d->s.status;
	out->broken = d->s.broken;
	out->malformed = d->malformed;
	out->interrupts = d->interrupts;
	if (d->device_id == VIRTIO_ID_NET) {
		struct fl_net *n = (struct fl_net *)d;
		out->ops[0] = n->rx_frames;
		out->ops[1] = n->tx_frames;
		out->ops[2] = n->rx_dropped;
		out->ops[3] = n->tx_dropped;
	} else {
		struct fl_blk *b = (struct fl_blk *)d;
		out->ops[0] = b->reads;
		out->ops[1] = b->writes;
		out->ops[2] = b->errors;
	}
	pthread_mutex_unlock(&d->lock);
	return 0;
}

static uint64_t fnv1a(const void *p, size_t n)
{
	const uint8_t *b = p;
	uint64_t h = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < n; i++)
		h = (h ^ b[i]) * 0x100000001b3ULL;
	return h;
}

int fl_device_state_size(void)
{
	return (int)sizeof(struct state_blob);
}

static int require_paused(struct fl_vm *vm)
{
	if (fl_vm_state(vm) != FL_STATE_PAUSED)
		return fl_fail(vm, EINVAL, "device state moves only while the machine is paused");
	return 0;
}

int fl_device_blob_get(struct fl_vm *vm, uint32_t slot, void *buf)
{
	struct fl_virtio_dev *d = vm->virtio[slot].dev;
	struct state_blob b;

	memset(&b, 0, sizeof(b));
	b.magic = STATE_MAGIC;
	b.version = STATE_VERSION;
	b.device_id = d->device_id;
	b.size = sizeof(b);
	fl_virtio_save(d, &b.s);
	b.checksum = fnv1a(&b, offsetof(struct state_blob, checksum));
	memcpy(buf, &b, sizeof(b));
	return (int)sizeof(b);
}

int fl_device_blob_check(const void *buf, size_t len, uint32_t device_id)
{
	struct state_blob b;

	if (!buf || len != sizeof(b))
		return -EINVAL;
	memcpy(&b, buf, sizeof(b));
	if (b.magic != STATE_MAGIC || b.version != STATE_VERSION || b.size != sizeof(b) ||
	    b.checksum != fnv1a(&b, offsetof(struct state_blob, checksum)) ||
	    b.device_id != device_id)
		return -EINVAL;
	return 0;
}

int fl_device_blob_put(struct fl_vm *vm, uint32_t slot, const void *buf)
{
	struct fl_virtio_dev *d = vm->virtio[slot].dev;
	struct state_blob b;
	int rc;

	memcpy(&b, buf, sizeof(b));
	if (b.magic != STATE_MAGIC || b.version != STATE_VERSION || b.size != sizeof(b) ||
	    b.checksum != fnv1a(&b, offsetof(struct state_blob, checksum)))
		return fl_fail(vm, EINVAL, "not a device state blob of version %d (or corrupt)",
			       STATE_VERSION);
	if (b.device_id != d->device_id)
		return fl_fail(vm, EINVAL, "state of device type %u for a device of type %u",
			       b.device_id, d->device_id);
	rc = fl_virtio_restore(d, &b.s);
	if (rc < 0)
		rc = fl_fail(vm, -rc, "device state is inconsistent with this machine");
	return rc;
}

int fl_device_save(struct fl_vm *vm, uint32_t slot, void *buf, size_t len)
{
	struct fl_virtio_dev *d = NULL;
	int rc = slot_of(vm, slot, &d);

	if (rc < 0)
		return rc;
	pthread_mutex_lock(&vm->api_lock);
	rc = require_paused(vm);
	if (rc == 0 && (!buf || len < sizeof(struct state_blob)))
		rc = fl_fail(vm, ENOSPC, "device state needs %zu bytes", sizeof(struct state_blob));
	if (rc == 0)
		rc = fl_device_blob_get(vm, slot, buf);
	pthread_mutex_unlock(&vm->api_lock);
	return rc;
}

int fl_device_restore(struct fl_vm *vm, uint32_t slot, const void *buf, size_t len)
{
	struct fl_virtio_dev *d = NULL;
	int rc = slot_of(vm, slot, &d);

	if (rc < 0)
		return rc;
	pthread_mutex_lock(&vm->api_lock);
	rc = require_paused(vm);
	if (rc == 0 && (!buf || len != sizeof(struct state_blob)))
		rc = fl_fail(vm, EINVAL, "device state must be %zu bytes, not %zu",
			     sizeof(struct state_blob), len);
	if (rc == 0)
		rc = fl_device_blob_put(vm, slot, buf);
	pthread_mutex_unlock(&vm->api_lock);
	return rc;
}

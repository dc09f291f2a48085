/*
 * The virtio-mmio transport (virtio 1.x, "modern" register layout, version 2) and the
 * device thread that serves its queues. Registers below 0x100 take aligned 32-bit accesses
 * only (others read 0 and are ignored, as the spec lets a device do); the config space
 * above takes any width. Queue notifications arrive on one eventfd per queue, written by
 * KVM (ioeventfd) or, when KVM did not take the write, by the handler below.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "virtio.h"

#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_VENDOR_ID 0x00c
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_INTERRUPT_STATUS 0x060
#define REG_INTERRUPT_ACK 0x064
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG_GENERATION 0x0fc
#define REG_CONFIG 0x100

#define MAGIC 0x74726976 /* "virt" */
#define VENDOR 0x4c54464c /* "FLTL" */
#define STATUS_BITS 0xcf  /* ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED */

int fl_virtio_init(struct fl_virtio_dev *d, const char *name, uint32_t device_id,
		   uint64_t features, uint32_t nqueues, const struct fl_guest_mem *mem,
		   const struct fl_virtio_ops *ops)
{
	int e;

	memset(d, 0, sizeof(*d));
	d->worker.ctl_fd = d->worker.extra_fd = -1;
	for (uint32_t i = 0; i < FL_VIRTIO_MAX_QUEUES; i++)
		d->notify_fd[i] = -1;
	if (nqueues == 0 || nqueues > FL_VIRTIO_MAX_QUEUES)
		return -EINVAL;
	e = pthread_mutex_init(&d->lock, NULL);
	if (e)
		return -e;
	d->name = name;
	d->device_id = device_id;
	d->features = features | VIRTIO_F_VERSION_1;
	d->nqueues = nqueues;
	d->mem = mem;
	d->ops = ops;
	for (uint32_t i = 0; i < nqueues; i++) {
		d->notify_fd[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
		if (d->notify_fd[i] < 0) {
			e = -errno;
			fl_virtio_fini(d);
			return e;
		}
	}
	return 0;
}

void fl_virtio_fini(struct fl_virtio_dev *d)
{
	for (uint32_t i = 0; i < FL_VIRTIO_MAX_QUEUES; i++) {
		if (d->notify_fd[i] >= 0)
			close(d->notify_fd[i]);
		d->notify_fd[i] = -1;
	}
	pthread_mutex_destroy(&d->lock);
}

void fl_virtio_set_irq(struct fl_virtio_dev *d, struct fl_virtio_irq irq)
{
	d->irq = irq;
}

static void raise_irq(struct fl_virtio_dev *d, uint32_t why)
{
	d->s.interrupt_status |= why;
	d->interrupts++;
	if (d->irq.raise)
		d->irq.raise(d->irq.ctx);
}

static void reset_locked(struct fl_virtio_dev *d)
{
	if (d->ops->reset)
		d->ops->reset(d);
	for (uint32_t i = 0; i < FL_VIRTIO_MAX_QUEUES; i++) {
		fl_vq_disable(&d->vq[i]);
		memset(&d->vq[i], 0, sizeof(d->vq[i]));
	}
	uint32_t gen = d->s.config_generation;
	memset(&d->s, 0, sizeof(d->s));
	d->s.config_generation = gen;
}

void fl_virtio_set_broken(struct fl_virtio_dev *d)
{
	d->malformed++;
	if (d->s.broken)
		return;
	d->s.broken = 1;
	for (uint32_t i = 0; i < d->nqueues; i++)
		fl_vq_disable(&d->vq[i]);
	if (d->ops->reset)
		d->ops->reset(d);
	d->s.status |= VIRTIO_STATUS_NEEDS_RESET;
	/* Only a driver that got as far as DRIVER_OK listens for it. */
	if (d->s.status & VIRTIO_STATUS_DRIVER_OK)
		raise_irq(d, VIRTIO_INT_CONFIG);
}

int fl_virtio_queue_live(struct fl_virtio_dev *d, uint32_t qi)
{
	return qi < d->nqueues && !d->s.broken && (d->s.status & VIRTIO_STATUS_DRIVER_OK) &&
	       d->vq[qi].enabled;
}

void fl_virtio_signal_used(struct fl_virtio_dev *d, uint32_t qi)
{
	if (fl_vq_should_notify(&d->vq[qi]))
		raise_irq(d, VIRTIO_INT_USED);
}

int fl_virtio_take_notify(struct fl_virtio_dev *d, uint32_t qi)
{
	uint64_t v;

	return qi < d->nqueues && read(d->notify_fd[qi], &v, sizeof(v)) == sizeof(v);
}

static void notify(struct fl_virtio_dev *d, uint32_t qi)
{
	uint64_t one = 1;

	if (qi < d->nqueues && write(d->notify_fd[qi], &one, sizeof(one)) < 0) {
		/* the counter cannot overflow in practice */
	}
}

static struct fl_vq_config *selected(struct fl_virtio_dev *d)
{
	return d->s.queue_sel < d->nqueues ? &d->vq[d->s.queue_sel].cfg : NULL;
}

static uint32_t reg_read(struct fl_virtio_dev *d, uint32_t reg)
{
	struct fl_vq_config *q = selected(d);

	switch (reg) {
	case REG_MAGIC:
		return MAGIC;
	case REG_VERSION:
		return 2;
	case REG_DEVICE_ID:
		return d->device_id;
	case REG_VENDOR_ID:
		return VENDOR;
	case REG_DEVICE_FEATURES:
		return d->s.device_features_sel == 0   ? (uint32_t)d->features
		       : d->s.device_features_sel == 1 ? (uint32_t)(d->features >> 32)
						       : 0;
	case REG_QUEUE_NUM_MAX:
		return q ? FL_VQ_MAX_SIZE : 0;
	case REG_QUEUE_READY:
		return q ? q->ready : 0;
	case REG_INTERRUPT_STATUS:
		return d->s.interrupt_status;
	case REG_STATUS:
		return d->s.status;
	case REG_CONFIG_GENERATION:
		return d->s.config_generation;
	default:
		return 0;
	}
}

/* FEATURES_OK only for a subset of what we offer that includes VERSION_1. */
static int features_acceptable(const struct fl_virtio_dev *d)
{
	return !(d->s.driver_features & ~d->features) &&
	       (d->s.driver_features & VIRTIO_F_VERSION_1);
}

static void write_status(struct fl_virtio_dev *d, uint32_t v)
{
	uint32_t old = d->s.status;

	if (v == 0) {
		reset_locked(d);
		return;
	}
	v &= STATUS_BITS;
	v |= old & VIRTIO_STATUS_NEEDS_RESET; /* only a reset clears it */
	if ((v & VIRTIO_STATUS_FEATURES_OK) && !(old & VIRTIO_STATUS_FEATURES_OK) &&
	    !features_acceptable(d))
		v &= ~(uint32_t)VIRTIO_STATUS_FEATURES_OK;
	if ((v & VIRTIO_STATUS_DRIVER_OK) && !(v & VIRTIO_STATUS_FEATURES_OK))
		v &= ~(uint32_t)VIRTIO_STATUS_DRIVER_OK;
	d->s.status = v;
	if ((v & VIRTIO_STATUS_DRIVER_OK) && !(old & VIRTIO_STATUS_DRIVER_OK) && !d->s.broken) {
		if (d->ops->activate)
			d->ops->activate(d);
		/* Work posted before DRIVER_OK is served now. */
		for (uint32_t i = 0; i < d->nqueues; i++)
			notify(d, i);
	}
}

static void set_half(uint64_t *v, int high, uint32_t x)
{
	if (high)
		*v = (*v & 0xffffffffULL) | (uint64_t)x << 32;
	else
		*v = (*v & ~0xffffffffULL) | x;
}

static void reg_write(struct fl_virtio_dev *d, uint32_t reg, uint32_t v)
{
	struct fl_vq_config *q = selected(d);
	/* Queue layout is fixed once the queue is ready, and features once accepted. */
	int q_open = q && !q->ready;
	int feat_open = !(d->s.status & VIRTIO_STATUS_FEATURES_OK);

	switch (reg) {
	case REG_DEVICE_FEATURES_SEL:
		d->s.device_features_sel = v;
		break;
	case REG_DRIVER_FEATURES:
		if (feat_open && d->s.driver_features_sel < 2)
			set_half(&d->s.driver_features, d->s.driver_features_sel == 1, v);
		break;
	case REG_DRIVER_FEATURES_SEL:
		d->s.driver_features_sel = v;
		break;
	case REG_QUEUE_SEL:
		d->s.queue_sel = v;
		break;
	case REG_QUEUE_NUM:
		if (q_open)
			q->size = (uint16_t)(v <= FL_VQ_MAX_SIZE ? v : 0);
		break;
	case REG_QUEUE_READY:
		if (!q)
			break;
		if (v & 1) {
			if (q->ready)
				break;
			struct fl_vq *vq = &d->vq[d->s.queue_sel];
			q->ready = 1;
			vq->last_avail = vq->used_idx = 0;
			if (!d->s.broken && fl_vq_enable(vq, d->mem) < 0)
				fl_virtio_set_broken(d);
		} else {
			q->ready = 0;
			fl_vq_disable(&d->vq[d->s.queue_sel]);
		}
		break;
	case REG_QUEUE_NOTIFY:
		notify(d, v);
		break;
	case REG_INTERRUPT_ACK:
		d->s.interrupt_status &= ~v;
		break;
	case REG_STATUS:
		write_status(d, v);
		break;
	case REG_QUEUE_DESC_LOW:
	case REG_QUEUE_DESC_HIGH:
		if (q_open)
			set_half(&q->desc, reg == REG_QUEUE_DESC_HIGH, v);
		break;
	case REG_QUEUE_DRIVER_LOW:
	case REG_QUEUE_DRIVER_HIGH:
		if (q_open)
			set_half(&q->avail, reg == REG_QUEUE_DRIVER_HIGH, v);
		break;
	case REG_QUEUE_DEVICE_LOW:
	case REG_QUEUE_DEVICE_HIGH:
		if (q_open)
			set_half(&q->used, reg == REG_QUEUE_DEVICE_HIGH, v);
		break;
	default:
		break;
	}
}

void fl_virtio_mmio(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	struct fl_virtio_dev *d = dev;

	pthread_mutex_lock(&d->lock);
	if (offset >= REG_CONFIG) {
		uint64_t off = offset - REG_CONFIG;
		/* The device config is read-only here (no writable fields offered). */
		if (!is_write)
			for (uint32_t i = 0; i < size; i++)
				data[i] = off + i < d->config_len ? d->config[off + i] : 0;
	} else if (size != 4 || (offset & 3)) {
		if (!is_write)
			memset(data, 0, size);
	} else if (is_write) {
		reg_write(d, (uint32_t)offset, (uint32_t)fl_le_get32(data));
	} else {
		fl_le_put32(data, reg_read(d, (uint32_t)offset));
	}
	pthread_mutex_unlock(&d->lock);
}

/* ---- state ---- */

void fl_virtio_save(struct fl_virtio_dev *d, struct fl_virtio_state *out)
{
	pthread_mutex_lock(&d->lock);
	if (d->ops->quiesce)
		d->ops->quiesce(d);
	for (uint32_t i = 0; i < FL_VIRTIO_MAX_QUEUES; i++) {
		d->s.vq[i] = d->vq[i].cfg;
		d->s.last_avail[i] = d->vq[i].last_avail;
		d->s.used_idx[i] = d->vq[i].used_idx;
	}
	*out = d->s;
	pthread_mutex_unlock(&d->lock);
}

int fl_virtio_restore(struct fl_virtio_dev *d, const struct fl_virtio_state *in)
{
	struct fl_vq vq[FL_VIRTIO_MAX_QUEUES];
	int rc = 0;

	/* Before FEATURES_OK the driver may have written any feature bits (the device judges
	 * them only then): the saved state is valid with them, and must restore. */
	if ((in->status & ~(uint32_t)STATUS_BITS) || (in->interrupt_status & ~3u) ||
	    ((in->status & VIRTIO_STATUS_FEATURES_OK) && (in->driver_features & ~d->features)) ||
	    in->broken > 1)
		return -EINVAL;
	memset(vq, 0, sizeof(vq));
	for (uint32_t i = 0; i < FL_VIRTIO_MAX_QUEUES; i++) {
		const struct fl_vq_config *c = &in->vq[i];
		if (c->ready > 1 || (i >= d->nqueues && c->ready))
			return -EINVAL;
		vq[i].cfg = *c;
		vq[i].last_avail = in->last_avail[i];
		vq[i].used_idx = in->used_idx[i];
		if (c->ready && !in->broken && fl_vq_enable(&vq[i], d->mem) < 0)
			return -EINVAL;
	}
	pthread_mutex_lock(&d->lock);
	if (d->ops->reset)
		d->ops->reset(d);
	d->s = *in;
	memcpy(d->vq, vq, sizeof(vq));
	if ((d->s.status & VIRTIO_STATUS_DRIVER_OK) && !d->s.broken && d->ops->activate)
		d->ops->activate(d);
	pthread_mutex_unlock(&d->lock);
	/* Whatever the driver posted before the snapshot is looked at again. */
	for (uint32_t i = 0; i < d->nqueues; i++)
		notify(d, i);
	return rc;
}

/* ---- the device thread ---- */

static void *worker_main(void *arg)
{
	struct fl_virtio_dev *d = arg;
	struct fl_virtio_worker *w = &d->worker;
	sigset_t set;

	sigfillset(&set);
	pthread_sigmask(SIG_SETMASK, &set, NULL);
	for (;;) {
		struct pollfd p[2 + FL_VIRTIO_MAX_QUEUES];
		uint32_t n = 0;
		int paused, extra;

		pthread_mutex_lock(&d->lock);
		paused = w->paused;
		extra = w->extra_fd >= 0 && w->extra_wanted && !paused;
		if (w->stop) {
			pthread_mutex_unlock(&d->lock);
			break;
		}
		pthread_mutex_unlock(&d->lock);

		p[n++] = (struct pollfd){.fd = w->ctl_fd, .events = POLLIN};
		for (uint32_t i = 0; i < d->nqueues; i++)
			p[n++] = (struct pollfd){.fd = paused ? -1 : d->notify_fd[i], .events = POLLIN};
		p[n++] = (struct pollfd){.fd = extra ? w->extra_fd : -1, .events = POLLIN};
		if (poll(p, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[0].revents & POLLIN) {
			uint64_t v;
			if (read(w->ctl_fd, &v, sizeof(v)) < 0) {
				/* drained by an earlier pass */
			}
		}
		pthread_mutex_lock(&d->lock);
		if (!w->paused && !w->stop) {
			for (uint32_t i = 0; i < d->nqueues; i++)
				if ((p[1 + i].revents & POLLIN) && fl_virtio_take_notify(d, i) &&
				    fl_virtio_queue_live(d, i))
					d->ops->process(d, i);
			if (extra && (p[n - 1].revents & (POLLIN | POLLERR | POLLHUP)) &&
			    d->ops->extra)
				d->ops->extra(d);
		}
		pthread_mutex_unlock(&d->lock);
	}
	return NULL;
}

static void kick(struct fl_virtio_worker *w)
{
	uint64_t one = 1;

	if (w->ctl_fd >= 0 && write(w->ctl_fd, &one, sizeof(one)) < 0) {
		/* cannot overflow in practice */
	}
}

int fl_virtio_worker_start(struct fl_virtio_dev *d)
{
	struct fl_virtio_worker *w = &d->worker;
	int e;

	if (w->started)
		return 0;
	w->ctl_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (w->ctl_fd < 0)
		return -errno;
	w->stop = 0;
	e = pthread_create(&w->thread, NULL, worker_main, d);
	if (e) {
		close(w->ctl_fd);
		w->ctl_fd = -1;
		return -e;
	}
	w->started = 1;
	return 0;
}

void fl_virtio_worker_pause(struct fl_virtio_dev *d, int paused)
{
	/* Once we hold the lock the thread is between batches, and it checks the flag under
	 * the lock before each: nothing touches guest memory after this returns. */
	pthread_mutex_lock(&d->lock);
	d->worker.paused = paused;
	pthread_mutex_unlock(&d->lock);
	kick(&d->worker);
}

void fl_virtio_worker_kick(struct fl_virtio_dev *d)
{
	kick(&d->worker);
}

void fl_virtio_worker_stop(struct fl_virtio_dev *d)
{
	struct fl_virtio_worker *w = &d->worker;

	if (!w->started)
		return;
	pthread_mutex_lock(&d->lock);
	w->stop = 1;
	pthread_mutex_unlock(&d->lock);
	kick(w);
	pthread_join(w->thread, NULL);
	close(w->ctl_fd);
	w->ctl_fd = -1;
	w->started = 0;
}

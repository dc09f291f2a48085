/* The guest and the device thread for the virtio targets (guest.h). */
#include <string.h>

#include "guest.h"

uint8_t fz_ram[FZ_RAM_SIZE];
/* Devices mark what they may write, as for a diff snapshot: the marking is exercised too. */
static uint64_t fz_dirty[(FZ_RAM_SIZE / 4096 + 63) / 64];
struct fl_guest_mem fz_mem = {
	.r = {{0, FZ_RAM_LOW, fz_ram, 0},
	      {FZ_HIGH_GPA, FZ_RAM_HIGH, fz_ram + FZ_RAM_LOW, FZ_RAM_LOW / 4096}},
	.n = 2,
	.dirty = fz_dirty,
};

void fz_ram_fill(struct fz_input *in)
{
	size_t got;
	const uint8_t *p = fz_bytes(in, FZ_RAM_SIZE, &got);

	memset(fz_ram, 0, sizeof(fz_ram));
	memcpy(fz_ram, p, got);
}

uint64_t fz_gpa(uint16_t low, int high)
{
	return high ? FZ_HIGH_GPA + (low % FZ_RAM_HIGH) : low;
}

uint32_t fz_mmio_read(struct fl_virtio_dev *d, uint64_t off)
{
	uint8_t b[4];

	fl_virtio_mmio(d, off, b, 4, 0);
	return fl_le_get32(b);
}

void fz_mmio_write(struct fl_virtio_dev *d, uint64_t off, uint32_t v)
{
	uint8_t b[4];

	fl_le_put32(b, v);
	fl_virtio_mmio(d, off, b, 4, 1);
}

void fz_driver_up(struct fl_virtio_dev *d, uint32_t features_lo, struct fz_input *in)
{
	fz_mmio_write(d, 0x70, 0);
	fz_mmio_write(d, 0x70, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
	fz_mmio_write(d, 0x14, 0);
	uint32_t offered = fz_mmio_read(d, 0x10);
	fz_mmio_write(d, 0x24, 0);
	fz_mmio_write(d, 0x20, features_lo & offered);
	fz_mmio_write(d, 0x24, 1);
	fz_mmio_write(d, 0x20, 1); /* VERSION_1 */
	fz_mmio_write(d, 0x70, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
				       VIRTIO_STATUS_FEATURES_OK);
	for (uint32_t q = 0; q < d->nqueues; q++) {
		uint32_t shape = (uint32_t)fz_take(in, 1);
		uint64_t desc = fz_gpa((uint16_t)fz_take(in, 2), shape & 0x10);
		uint64_t avail = fz_gpa((uint16_t)fz_take(in, 2), shape & 0x20);
		uint64_t used = fz_gpa((uint16_t)fz_take(in, 2), shape & 0x40);
		fz_mmio_write(d, 0x30, q);
		fz_mmio_write(d, 0x38, 1u << ((shape & 0xf) % 9));
		fz_mmio_write(d, 0x80, (uint32_t)desc);
		fz_mmio_write(d, 0x84, (uint32_t)(desc >> 32));
		fz_mmio_write(d, 0x90, (uint32_t)avail);
		fz_mmio_write(d, 0x94, (uint32_t)(avail >> 32));
		fz_mmio_write(d, 0xa0, (uint32_t)used);
		fz_mmio_write(d, 0xa4, (uint32_t)(used >> 32));
		fz_mmio_write(d, 0x44, 1);
	}
	fz_mmio_write(d, 0x70, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
				       VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
}

void fz_serve(struct fl_virtio_dev *d)
{
	pthread_mutex_lock(&d->lock);
	for (uint32_t i = 0; i < d->nqueues; i++)
		if (fl_virtio_take_notify(d, i) && fl_virtio_queue_live(d, i))
			d->ops->process(d, i);
	if (d->worker.extra_fd >= 0 && d->worker.extra_wanted && d->ops->extra)
		d->ops->extra(d);
	pthread_mutex_unlock(&d->lock);
	fz_check_transport(d);
}

void fz_check_transport(const struct fl_virtio_dev *d)
{
	const struct fl_virtio_state *s = &d->s;

	if ((s->status & VIRTIO_STATUS_DRIVER_OK) && !(s->status & VIRTIO_STATUS_FEATURES_OK))
		__builtin_trap();
	if ((s->status & VIRTIO_STATUS_FEATURES_OK) &&
	    ((s->driver_features & ~d->features) || !(s->driver_features & VIRTIO_F_VERSION_1)))
		__builtin_trap();
	for (uint32_t i = 0; i < FL_VIRTIO_MAX_QUEUES; i++) {
		const struct fl_vq *vq = &d->vq[i];
		if (!vq->enabled)
			continue;
		/* An enabled queue is a ready one, of a valid size, with rings inside RAM. */
		if (i >= d->nqueues || !vq->cfg.ready || s->broken || !vq->cfg.size ||
		    vq->cfg.size > FL_VQ_MAX_SIZE || (vq->cfg.size & (vq->cfg.size - 1)) ||
		    vq->desc < fz_ram || vq->desc + 16u * vq->cfg.size > fz_ram + FZ_RAM_SIZE ||
		    vq->used < fz_ram || vq->used + 6u + 8u * vq->cfg.size > fz_ram + FZ_RAM_SIZE)
			__builtin_trap();
	}
}

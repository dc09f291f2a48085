/* A ring-3 virtio-mmio driver: devices named on the command line
 * (`virtio_mmio.device=<size>@<base>:<irq>`, as the VMM appends them), split
 * virtqueues in identity-mapped memory from mem_alloc, waits that spin
 * natively first and then sleep for the device's interrupt. */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include "types.h"

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_MAX_DEVICES 8

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1

#define VIRTIO_STATUS_NEEDS_RESET 0x40

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vq {
	u16 size;
	u16 index;
	struct vring_desc *desc;
	volatile u16 *avail; /* flags, idx, ring[size] */
	volatile u8 *used;   /* flags, idx, ring[size] of {id, len} */
	u16 avail_idx;	     /* next avail entry we publish */
	u16 last_used;	     /* next used entry we take */
};

struct vdev {
	u64 base;
	u32 irq;
	u32 device_id;
	bool claimed;
};

/* Record the devices named on the command line (before any action runs). */
void virtio_scan(const char *cmdline);
/* The n-th device (0-based) of a type not yet claimed, or NULL. */
struct vdev *virtio_find(u32 device_id, unsigned nth);
/* Reset, negotiate (VERSION_1 plus `want` of what the device offers), route
 * its interrupt to this CPU. false (and a printed reason) on failure. */
bool virtio_start(struct vdev *d, u64 want, u64 *got);
/* Set queue qi up with `size` entries; false if the device refuses. */
bool virtio_queue(struct vdev *d, struct vq *q, unsigned qi, u16 size);
bool virtio_driver_ok(struct vdev *d);
u32 virtio_status(struct vdev *d);
void virtio_reset(struct vdev *d);
u8 virtio_config8(struct vdev *d, unsigned off);
u32 virtio_config32(struct vdev *d, unsigned off);

/* Publish chain head `head` (no notify). */
void vq_post(struct vq *q, u16 head);
void vq_notify(struct vdev *d, struct vq *q);
/* Take one used entry: true with the id and length set, false when none. */
bool vq_take(struct vq *q, u32 *id, u32 *len);
/* True when the device has used buffers not taken yet (a memory read: no exit). */
bool vq_pending(const struct vq *q);
/* Wait until the queue has a used entry or the TSC passes deadline; spins
 * natively for a while, then sleeps with the device's interrupt enabled.
 * false on timeout. */
bool vq_wait(struct vdev *d, struct vq *q, u64 deadline);
/* Allow or suppress the device's interrupts for this queue. */
void vq_interrupts(struct vq *q, bool on);
/* Acknowledge the device's interrupt status. */
void virtio_ack(struct vdev *d);

/* `virtiohostile`: malformed chains at the first block device; each must
 * leave it NEEDS_RESET. */
void virtio_hostile(void);

#endif

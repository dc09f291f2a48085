/*
 * Virtio 1.x devices on the virtio-mmio transport. What a device sees: guest RAM as a list of
 * regions (struct fl_guest_mem), its MMIO window on a bus, and an interrupt callback. Nothing
 * of KVM: the machine wires queue notifications (ioeventfd) and interrupts (irqfd) around it.
 *
 * Everything read from guest memory or the MMIO window is untrusted. A request the device
 * cannot make sense of marks it broken (status NEEDS_RESET) until the driver resets it.
 */
#ifndef FL_VIRTIO_H
#define FL_VIRTIO_H

#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>

/* ---- guest memory as the devices see it ---- */
#define FL_GMEM_REGIONS 2

struct fl_guest_mem {
	struct {
		uint64_t gpa;
		uint64_t len;
		uint8_t *host;
		uint64_t first_page; /* the region's first page in `dirty` */
	} r[FL_GMEM_REGIONS];
	uint32_t n;
	/* One bit per page of RAM (regions in order) that a device may have written, for diff
	 * snapshots: KVM logs only what vCPUs write. NULL while no snapshot is tracked. */
	uint64_t *dirty;
};

/* Marks [gpa, gpa+len) written by a device (a range already checked to lie in one region). */
static inline void fl_gmem_mark(const struct fl_guest_mem *m, uint64_t gpa, uint64_t len)
{
	uint64_t *dirty = __atomic_load_n(&m->dirty, __ATOMIC_ACQUIRE);

	if (!dirty || !len)
		return;
	for (uint32_t i = 0; i < m->n && i < FL_GMEM_REGIONS; i++) {
		uint64_t off = gpa - m->r[i].gpa;
		if (gpa < m->r[i].gpa || off >= m->r[i].len || len > m->r[i].len - off)
			continue;
		uint64_t first = m->r[i].first_page + off / 4096;
		uint64_t last = m->r[i].first_page + (off + len - 1) / 4096;
		for (uint64_t p = first; p <= last; p++)
			__atomic_fetch_or(&dirty[p / 64], 1ULL << (p % 64), __ATOMIC_RELAXED);
		return;
	}
}

/* Host pointer for [gpa, gpa+len) when it lies wholly inside one region, else NULL. */
static inline uint8_t *fl_gmem_ptr(const struct fl_guest_mem *m, uint64_t gpa, uint64_t len)
{
	for (uint32_t i = 0; i < m->n && i < FL_GMEM_REGIONS; i++) {
		uint64_t off = gpa - m->r[i].gpa;
		if (gpa >= m->r[i].gpa && off < m->r[i].len && len <= m->r[i].len - off)
			return m->r[i].host + off;
	}
	return NULL;
}

/* ---- split virtqueues (queue.c) ---- */
#define FL_VQ_MAX_SIZE 256
/* A chain longer than the queue is a loop; longer than this is more than any device here
 * needs (a 1 MiB block request in 4 KiB pages plus header and status). */
#define FL_VQ_MAX_SEGS 260
/* Total bytes one chain may describe: bounds every length sum below 2^32. */
#define FL_VQ_MAX_CHAIN_BYTES (64u << 20)

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1

/* The driver-set part of a queue, as the transport registers hold it. */
struct fl_vq_config {
	uint16_t size; /* QueueNum: a power of two, 1..FL_VQ_MAX_SIZE */
	uint16_t ready;
	uint64_t desc, avail, used; /* guest-physical */
};

struct fl_vq {
	struct fl_vq_config cfg;
	const struct fl_guest_mem *mem; /* set by fl_vq_enable */
	uint16_t last_avail; /* next avail entry to take */
	uint16_t used_idx;   /* next used entry to fill (our copy of used->idx) */
	/* Host views, valid while enabled; the guest may rewrite them at any time. */
	uint8_t *desc, *avail, *used;
	int enabled;
};

struct fl_vq_chain {
	uint16_t head;
	uint32_t nout, nin;	 /* device-readable segments first, then device-writable */
	uint32_t out_len, in_len; /* bytes in each part */
	struct iovec iov[FL_VQ_MAX_SEGS];
};

/* Checks the rings lie in RAM, aligned, and maps them. 0 or -EINVAL. */
int fl_vq_enable(struct fl_vq *vq, const struct fl_guest_mem *mem);
void fl_vq_disable(struct fl_vq *vq);
/* Takes the next available chain: 1 and *c filled, 0 when none, -EINVAL when the driver
 * broke the ring or the chain (the device must stop using the queue). */
int fl_vq_pop(struct fl_vq *vq, const struct fl_guest_mem *mem, struct fl_vq_chain *c);
/* Returns a chain to the driver with len bytes written into its device-writable part. */
void fl_vq_push(struct fl_vq *vq, uint16_t head, uint32_t len);
/* Whether the driver wants an interrupt for what was pushed (VRING_AVAIL_F_NO_INTERRUPT). */
int fl_vq_should_notify(struct fl_vq *vq);

/* Copies to/from a chain's segments starting at byte offset off of the part (in/out);
 * returns the bytes copied. */
uint32_t fl_iov_to(struct iovec *iov, uint32_t n, uint32_t off, const void *src, uint32_t len);
uint32_t fl_iov_from(const struct iovec *iov, uint32_t n, uint32_t off, void *dst, uint32_t len);
/* Fills out[] with the byte range [off, off+len) of iov[]; returns the segment count. */
uint32_t fl_iov_slice(const struct iovec *iov, uint32_t n, uint32_t off, uint32_t len,
		      struct iovec *out, uint32_t max);

/* ---- the virtio-mmio transport (mmio.c) ---- */
#define FL_VIRTIO_MAX_QUEUES 2
#define FL_VIRTIO_CONFIG_SIZE 64

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2

#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

#define VIRTIO_F_VERSION_1 (1ULL << 32)

#define VIRTIO_INT_USED 1
#define VIRTIO_INT_CONFIG 2

/* Interrupt to the driver: called from the device thread or a vCPU. */
struct fl_virtio_irq {
	void (*raise)(void *ctx);
	void *ctx;
};

struct fl_virtio_dev;

struct fl_virtio_ops {
	/* Queue qi was notified: take and complete what is available (device lock held). */
	void (*process)(struct fl_virtio_dev *d, uint32_t qi);
	/* The driver reset the device or it was broken: forget in-flight state (lock held). */
	void (*reset)(struct fl_virtio_dev *d);
	/* The driver set DRIVER_OK (lock held). */
	void (*activate)(struct fl_virtio_dev *d);
	/* The worker's extra fd (a tap) is readable (lock held). Optional. */
	void (*extra)(struct fl_virtio_dev *d);
	/* Before a save: give back chains taken but not completed (lock held). Optional. */
	void (*quiesce)(struct fl_virtio_dev *d);
};

/* The device thread: polls the queue eventfds, a control eventfd and an optional extra fd,
 * and runs the device's handlers under its lock. */
struct fl_virtio_worker {
	pthread_t thread;
	int started;
	int ctl_fd;
	int stop, paused;   /* under the device lock */
	int extra_fd;	    /* -1: none */
	int extra_wanted;   /* poll extra_fd (under the device lock) */
};

/* The transport's state: what a snapshot carries besides the device's own. */
struct fl_virtio_state {
	uint32_t status;
	uint32_t device_features_sel, driver_features_sel;
	uint64_t driver_features;
	uint32_t queue_sel;
	uint32_t interrupt_status;
	uint32_t config_generation;
	uint32_t broken; /* a malformed request was seen; cleared by reset */
	struct fl_vq_config vq[FL_VIRTIO_MAX_QUEUES];
	uint16_t last_avail[FL_VIRTIO_MAX_QUEUES];
	uint16_t used_idx[FL_VIRTIO_MAX_QUEUES];
};

struct fl_virtio_dev {
	pthread_mutex_t lock;
	const char *name;
	uint32_t device_id;
	uint64_t features; /* offered */
	uint32_t nqueues;
	uint8_t config[FL_VIRTIO_CONFIG_SIZE]; /* device-specific config space */
	uint32_t config_len;
	struct fl_virtio_state s;
	struct fl_vq vq[FL_VIRTIO_MAX_QUEUES];
	const struct fl_guest_mem *mem;
	struct fl_virtio_irq irq;
	int notify_fd[FL_VIRTIO_MAX_QUEUES]; /* eventfds: a write means "queue notified" */
	const struct fl_virtio_ops *ops;
	struct fl_virtio_worker worker;
	uint64_t malformed; /* chains refused as malformed, ever */
	uint64_t interrupts;
};

int fl_virtio_init(struct fl_virtio_dev *d, const char *name, uint32_t device_id,
		   uint64_t features, uint32_t nqueues, const struct fl_guest_mem *mem,
		   const struct fl_virtio_ops *ops);
void fl_virtio_fini(struct fl_virtio_dev *d);
void fl_virtio_set_irq(struct fl_virtio_dev *d, struct fl_virtio_irq irq);
/* The MMIO window handler (offset 0..0x1ff). */
void fl_virtio_mmio(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write);
/* Device thread helpers (lock held): whether queue qi may be used now; signal used buffers;
 * mark the device broken (NEEDS_RESET, config interrupt). */
int fl_virtio_queue_live(struct fl_virtio_dev *d, uint32_t qi);
void fl_virtio_signal_used(struct fl_virtio_dev *d, uint32_t qi);
void fl_virtio_set_broken(struct fl_virtio_dev *d);
/* Drains notify eventfd qi; returns whether it had been written. */
int fl_virtio_take_notify(struct fl_virtio_dev *d, uint32_t qi);
/* The device thread: start once the machine runs; pause returns when the thread is between
 * batches and will not touch guest memory until unpaused; kick re-reads extra_wanted. */
int fl_virtio_worker_start(struct fl_virtio_dev *d);
void fl_virtio_worker_pause(struct fl_virtio_dev *d, int paused);
void fl_virtio_worker_kick(struct fl_virtio_dev *d);
void fl_virtio_worker_stop(struct fl_virtio_dev *d);
/* State while the machine is paused (no vCPU and no device thread touches it). Restore
 * validates: the blob is untrusted. */
void fl_virtio_save(struct fl_virtio_dev *d, struct fl_virtio_state *out);
int fl_virtio_restore(struct fl_virtio_dev *d, const struct fl_virtio_state *in);

static inline uint32_t fl_le_get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void fl_le_put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* Window layout on the MMIO bus (docs/machine.md). */
#define FL_VIRTIO_MMIO_BASE 0xe0000000ULL
#define FL_VIRTIO_MMIO_STRIDE 0x1000ULL
#define FL_VIRTIO_MMIO_SIZE 0x200ULL
#define FL_VIRTIO_GSI_BASE 16
#define FL_VIRTIO_SLOTS 8
#define FL_VIRTIO_QUEUE_NOTIFY 0x50

#endif

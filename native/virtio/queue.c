/*
 * Split virtqueues, device side, for a driver we do not trust. Every index is taken modulo
 * nothing: it is checked against the queue size; every buffer must lie wholly inside one RAM
 * region; a chain may not be longer than the queue (a loop), than FL_VQ_MAX_SEGS segments or
 * FL_VQ_MAX_CHAIN_BYTES bytes, nor put device-readable segments after device-writable ones.
 * Each descriptor is read once into a local copy, so a guest rewriting the table while we
 * walk it changes nothing we already checked.
 */
#include <errno.h>
#include <string.h>

#include "virtio.h"

#define DESC_SIZE 16
#define AVAIL_RING 4
#define USED_RING 4
#define USED_ELEM 8

struct desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

static uint16_t load16(const uint8_t *p, int order)
{
	return __atomic_load_n((const uint16_t *)(const void *)p, order);
}

int fl_vq_enable(struct fl_vq *vq, const struct fl_guest_mem *mem)
{
	uint32_t n = vq->cfg.size;

	fl_vq_disable(vq);
	if (n == 0 || n > FL_VQ_MAX_SIZE || (n & (n - 1)))
		return -EINVAL;
	if ((vq->cfg.desc & 15) || (vq->cfg.avail & 1) || (vq->cfg.used & 3))
		return -EINVAL;
	vq->desc = fl_gmem_ptr(mem, vq->cfg.desc, (uint64_t)DESC_SIZE * n);
	vq->avail = fl_gmem_ptr(mem, vq->cfg.avail, AVAIL_RING + 2ULL * n + 2);
	vq->used = fl_gmem_ptr(mem, vq->cfg.used, USED_RING + (uint64_t)USED_ELEM * n + 2);
	if (!vq->desc || !vq->avail || !vq->used) {
		fl_vq_disable(vq);
		return -EINVAL;
	}
	vq->mem = mem;
	vq->enabled = 1;
	return 0;
}

void fl_vq_disable(struct fl_vq *vq)
{
	vq->desc = vq->avail = vq->used = NULL;
	vq->enabled = 0;
}

static void read_desc(const struct fl_vq *vq, uint16_t i, struct desc *d)
{
	const volatile uint8_t *p = vq->desc + (size_t)i * DESC_SIZE;
	uint64_t addr = 0;
	uint32_t len = 0;

	for (int b = 7; b >= 0; b--)
		addr = addr << 8 | p[b];
	for (int b = 11; b >= 8; b--)
		len = len << 8 | p[b];
	d->addr = addr;
	d->len = len;
	d->flags = (uint16_t)(p[12] | p[13] << 8);
	d->next = (uint16_t)(p[14] | p[15] << 8);
}

int fl_vq_pop(struct fl_vq *vq, const struct fl_guest_mem *mem, struct fl_vq_chain *c)
{
	uint16_t size = vq->cfg.size, avail_idx, pending, head, i;
	uint64_t total = 0;

	if (!vq->enabled)
		return 0;
	/* Acquire: the ring entries we read next were written before this index. */
	avail_idx = load16(vq->avail + 2, __ATOMIC_ACQUIRE);
	pending = (uint16_t)(avail_idx - vq->last_avail);
	if (pending == 0)
		return 0;
	if (pending > size)
		return -EINVAL;
	head = load16(vq->avail + AVAIL_RING + 2u * (vq->last_avail & (size - 1)),
		      __ATOMIC_RELAXED);
	if (head >= size)
		return -EINVAL;

	c->head = head;
	c->nout = c->nin = 0;
	c->out_len = c->in_len = 0;
	i = head;
	for (uint32_t walked = 0;; walked++) {
		struct desc d;

		if (walked >= size)
			return -EINVAL; /* more links than descriptors: a loop */
		read_desc(vq, i, &d);
		if (d.flags & VRING_DESC_F_INDIRECT)
			return -EINVAL; /* not offered */
		if (d.flags & VRING_DESC_F_WRITE) {
			c->in_len += d.len;
		} else {
			if (c->nin)
				return -EINVAL; /* readable after writable */
			c->out_len += d.len;
		}
		total += d.len;
		if (total > FL_VQ_MAX_CHAIN_BYTES)
			return -EINVAL;
		if (d.len) {
			uint8_t *p = fl_gmem_ptr(mem, d.addr, d.len);
			uint32_t k = c->nout + c->nin;
			if (!p || k >= FL_VQ_MAX_SEGS)
				return -EINVAL;
			c->iov[k].iov_base = p;
			c->iov[k].iov_len = d.len;
			if (d.flags & VRING_DESC_F_WRITE) {
				/* The device may write any of it: a diff snapshot must carry it. */
				fl_gmem_mark(mem, d.addr, d.len);
				c->nin++;
			} else {
				c->nout++;
			}
		}
		if (!(d.flags & VRING_DESC_F_NEXT))
			break;
		if (d.next >= size)
			return -EINVAL;
		i = d.next;
	}
	vq->last_avail++;
	return 1;
}

void fl_vq_push(struct fl_vq *vq, uint16_t head, uint32_t len)
{
	uint8_t *e;

	if (!vq->enabled)
		return;
	e = vq->used + USED_RING + (size_t)USED_ELEM * (vq->used_idx & (vq->cfg.size - 1));
	__atomic_store_n((uint32_t *)(void *)e, (uint32_t)head, __ATOMIC_RELAXED);
	__atomic_store_n((uint32_t *)(void *)(e + 4), len, __ATOMIC_RELAXED);
	if (vq->mem)
		fl_gmem_mark(vq->mem, vq->cfg.used, USED_RING + (uint64_t)USED_ELEM * vq->cfg.size);
	vq->used_idx++;
	/* Release: the element is visible before the index that publishes it. */
	__atomic_store_n((uint16_t *)(void *)(vq->used + 2), vq->used_idx, __ATOMIC_RELEASE);
}

int fl_vq_should_notify(struct fl_vq *vq)
{
	if (!vq->enabled)
		return 0;
	/* Our used->idx store must be ordered before reading the driver's flags (the driver
	 * clears NO_INTERRUPT, then re-reads used->idx before sleeping). */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return !(load16(vq->avail, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);
}

uint32_t fl_iov_to(struct iovec *iov, uint32_t n, uint32_t off, const void *src, uint32_t len)
{
	const uint8_t *s = src;
	uint32_t done = 0;

	for (uint32_t i = 0; i < n && done < len; i++) {
		if (off >= iov[i].iov_len) {
			off -= (uint32_t)iov[i].iov_len;
			continue;
		}
		uint32_t k = (uint32_t)iov[i].iov_len - off;
		if (k > len - done)
			k = len - done;
		memcpy((uint8_t *)iov[i].iov_base + off, s + done, k);
		done += k;
		off = 0;
	}
	return done;
}

uint32_t fl_iov_from(const struct iovec *iov, uint32_t n, uint32_t off, void *dst, uint32_t len)
{
	uint8_t *d = dst;
	uint32_t done = 0;

	for (uint32_t i = 0; i < n && done < len; i++) {
		if (off >= iov[i].iov_len) {
			off -= (uint32_t)iov[i].iov_len;
			continue;
		}
		uint32_t k = (uint32_t)iov[i].iov_len - off;
		if (k > len - done)
			k = len - done;
		memcpy(d + done, (const uint8_t *)iov[i].iov_base + off, k);
		done += k;
		off = 0;
	}
	return done;
}

uint32_t fl_iov_slice(const struct iovec *iov, uint32_t n, uint32_t off, uint32_t len,
		      struct iovec *out, uint32_t max)
{
	uint32_t k = 0;

	for (uint32_t i = 0; i < n && len && k < max; i++) {
		if (off >= iov[i].iov_len) {
			off -= (uint32_t)iov[i].iov_len;
			continue;
		}
		uint32_t take = (uint32_t)iov[i].iov_len - off;
		if (take > len)
			take = len;
		out[k].iov_base = (uint8_t *)iov[i].iov_base + off;
		out[k].iov_len = take;
		k++;
		len -= take;
		off = 0;
	}
	return k;
}

/*
 * virtio-blk on a raw image file (or block device): read, write, flush, get-id; read-only
 * disks fail writes with VIRTIO_BLK_S_IOERR. Data moves straight between the file and the
 * guest's buffers (preadv/pwritev on the chain's segments), and a request is completed only
 * after the kernel took or returned all of its data. The capacity is the file size in whole
 * 512-byte sectors; a trailing partial sector is not reachable. The open holds an OFD lock:
 * exclusive for a writable disk, shared for a read-only one; a live migration hands it over
 * through a hand-off byte (fl_blk_set_lock, docs/storage.md "Locks").
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/fs.h>

#include "blk.h"

#define VIRTIO_BLK_F_SEG_MAX (1ULL << 2)
#define VIRTIO_BLK_F_RO (1ULL << 5)
#define VIRTIO_BLK_F_BLK_SIZE (1ULL << 6)
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define SECTOR 512u
#define HEADER 16u
/*
 * Data segments in one request. No indirect descriptors are offered, so a request takes
 * SEG_MAX + 2 ring entries (header, status): more than the ring holds and the driver can
 * never add it (Linux then waits forever, as its zeroing fallback's 256 zero-page bio_vecs
 * did). QEMU sizes it the same way.
 */
#define SEG_MAX (FL_VQ_MAX_SIZE - 2)

static int fail(char *err, size_t errlen, int e, const char *path, const char *what)
{
	snprintf(err, errlen, "disk %s: %s", path, what ? what : strerror(e));
	return -e;
}

static struct fl_blk *blk_of(struct fl_virtio_dev *d)
{
	return (struct fl_blk *)d;
}

/* All of [off, off+len) through the segments, retrying short transfers. */
static int transfer(int fd, const struct iovec *iov, uint32_t n, uint32_t skip, uint64_t pos,
		    uint32_t len, int is_write)
{
	struct iovec part[FL_VQ_MAX_SEGS];
	uint32_t done = 0;

	while (done < len) {
		uint32_t k = fl_iov_slice(iov, n, skip + done, len - done, part, FL_VQ_MAX_SEGS);
		ssize_t r = is_write ? pwritev(fd, part, (int)k, (off_t)(pos + done))
				     : preadv(fd, part, (int)k, (off_t)(pos + done));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		done += (uint32_t)r;
	}
	return 0;
}

static int in_range(const struct fl_blk *b, uint64_t sector, uint32_t len)
{
	uint64_t n = len / SECTOR;

	return len % SECTOR == 0 && sector <= b->capacity && n <= b->capacity - sector;
}

/* A write to [sector, +len) reached the file (or may have, partly): its chunks are dirty.
 * Only with in_range's checked values, so the chunks lie inside the bitmap (the capacity
 * is the file size in whole sectors, the bitmap covers the file). Device thread, under
 * vdev.lock. */
static void mark_written(struct fl_blk *b, uint64_t sector, uint32_t len)
{
	uint64_t first, last;

	if (!b->dirty || !len)
		return;
	first = sector * SECTOR / FL_BLK_CHUNK;
	last = (sector * SECTOR + len - 1) / FL_BLK_CHUNK;
	for (uint64_t c = first; c <= last; c++)
		b->dirty[c / 64] |= 1ULL << (c % 64);
}

/* One request; returns the bytes written into the chain's device-writable part, or -1 when
 * the chain has no room for a status byte or header (malformed). */
static int64_t handle(struct fl_blk *b, struct fl_vq_chain *c)
{
	uint8_t hdr[HEADER];
	struct iovec *in = c->iov + c->nout;
	uint32_t type, data_len;
	uint64_t sector;
	uint8_t status = VIRTIO_BLK_S_OK;
	uint32_t written = 0;

	if (c->in_len < 1 || c->out_len < HEADER)
		return -1;
	fl_iov_from(c->iov, c->nout, 0, hdr, HEADER);
	type = fl_le_get32(hdr);
	sector = (uint64_t)fl_le_get32(hdr + 8) | (uint64_t)fl_le_get32(hdr + 12) << 32;

	switch (type) {
	case VIRTIO_BLK_T_IN:
		data_len = c->in_len - 1;
		if (!in_range(b, sector, data_len) ||
		    transfer(b->fd, in, c->nin, 0, sector * SECTOR, data_len, 0) < 0) {
			status = VIRTIO_BLK_S_IOERR;
			b->errors++;
		} else {
			written = data_len;
			b->read_bytes += data_len;
			b->reads++;
		}
		break;
	case VIRTIO_BLK_T_OUT:
		data_len = c->out_len - HEADER;
		if (b->read_only || !in_range(b, sector, data_len)) {
			status = VIRTIO_BLK_S_IOERR;
			b->errors++;
		} else if (transfer(b->fd, c->iov, c->nout, HEADER, sector * SECTOR, data_len,
				    1) < 0) {
			mark_written(b, sector, data_len); /* part of it may have landed */
			status = VIRTIO_BLK_S_IOERR;
			b->errors++;
		} else {
			mark_written(b, sector, data_len);
			b->write_bytes += data_len;
			b->writes++;
		}
		break;
	case VIRTIO_BLK_T_FLUSH:
		if (!b->read_only && fdatasync(b->fd) < 0) {
			status = VIRTIO_BLK_S_IOERR;
			b->errors++;
		}
		break;
	case VIRTIO_BLK_T_GET_ID:
		data_len = c->in_len - 1;
		written = data_len < FL_BLK_ID_LEN ? data_len : FL_BLK_ID_LEN;
		fl_iov_to(in, c->nin, 0, b->id, written);
		break;
	default:
		status = VIRTIO_BLK_S_UNSUPP;
		break;
	}
	fl_iov_to(in, c->nin, c->in_len - 1, &status, 1);
	return (int64_t)written + 1;
}

static void blk_process(struct fl_virtio_dev *d, uint32_t qi)
{
	struct fl_blk *b = blk_of(d);
	struct fl_vq *vq = &d->vq[qi];
	int pushed = 0;

	/* Bounded: each pass consumes one of at most size pending entries, or stops. */
	for (uint32_t i = 0; i < vq->cfg.size; i++) {
		int rc = fl_vq_pop(vq, d->mem, &b->chain);
		if (rc == 0)
			break;
		if (rc < 0) {
			fl_virtio_set_broken(d);
			return;
		}
		int64_t len = handle(b, &b->chain);
		if (len < 0) {
			fl_virtio_set_broken(d);
			return;
		}
		fl_vq_push(vq, b->chain.head, (uint32_t)len);
		pushed = 1;
	}
	if (pushed)
		fl_virtio_signal_used(d, qi);
}

static const struct fl_virtio_ops blk_ops = {.process = blk_process};

/* One byte range of the lock: F_RDLCK/F_WRLCK/F_UNLCK on [start, start + len), len 0 to
 * the end of any file. 0, or -errno (EAGAIN/EACCES: someone else holds a conflicting one). */
static int range_lock(int fd, short type, uint64_t start, uint64_t len)
{
	struct flock lk = {.l_type = type, .l_whence = SEEK_SET, .l_start = (off_t)start,
			   .l_len = (off_t)len};

	return fcntl(fd, F_OFD_SETLK, &lk) < 0 ? -errno : 0;
}

int fl_blk_set_lock(struct fl_blk *b, int want, char *err, size_t errlen)
{
	const char *name = b->name;
	short type = b->read_only ? F_RDLCK : F_WRLCK;
	uint64_t hb = FL_BLK_HANDOFF_BYTE;
	int rc = 0;

	if (want == b->lock)
		return 0;
	switch (want) {
	case FL_BLK_LOCK_WHOLE:
		rc = range_lock(b->fd, type, 0, 0);
		break;
	case FL_BLK_LOCK_HANDOFF:
		if (b->lock != FL_BLK_LOCK_WHOLE)
			return fail(err, errlen, EINVAL, name, "hand-off of a lock it does not hold");
		/* Everything the guest wrote is on the file (and the server) before we let go. */
		if (!b->read_only && fdatasync(b->fd) < 0)
			return fail(err, errlen, errno, name, NULL);
		/* Unlocking parts of a held range cannot conflict; the byte stays held. */
		rc = range_lock(b->fd, F_UNLCK, 0, hb);
		if (rc == 0)
			rc = range_lock(b->fd, F_UNLCK, hb + 1, 0);
		break;
	case FL_BLK_LOCK_REST:
		/* A copied disk's target holds its own file whole from the start: nothing to take. */
		if (b->lock == FL_BLK_LOCK_WHOLE)
			return 0;
		if (b->lock != FL_BLK_LOCK_NONE)
			return fail(err, errlen, EINVAL, name, "the rest of a lock it holds");
		rc = range_lock(b->fd, type, 0, hb);
		if (rc == 0) {
			rc = range_lock(b->fd, type, hb + 1, 0);
			if (rc < 0)
				range_lock(b->fd, F_UNLCK, 0, hb);
		}
		break;
	case FL_BLK_LOCK_NONE:
		rc = range_lock(b->fd, F_UNLCK, 0, 0);
		break;
	default:
		return fail(err, errlen, EINVAL, name, "unknown lock state");
	}
	if (rc == -EAGAIN || rc == -EACCES)
		return fail(err, errlen, EBUSY, name, "in use: another process holds its lock");
	if (rc < 0)
		return fail(err, errlen, -rc, name, NULL);
	b->lock = want;
	return 0;
}

int fl_blk_init(struct fl_blk *b, const char *path, unsigned flags, const char *id,
		const struct fl_guest_mem *mem, char *err, size_t errlen)
{
	struct stat st;
	uint64_t size;
	uint64_t features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
	int rc;

	int read_only = !!(flags & FL_BLK_READ_ONLY);

	memset(b, 0, sizeof(*b));
	b->fd = open(path, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (b->fd < 0)
		return fail(err, errlen, errno, path, NULL);
	if (fstat(b->fd, &st) < 0) {
		rc = fail(err, errlen, errno, path, NULL);
		goto close_fd;
	}
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(b->fd, BLKGETSIZE64, &size) < 0) {
			rc = fail(err, errlen, errno, path, NULL);
			goto close_fd;
		}
	} else if (S_ISREG(st.st_mode)) {
		size = (uint64_t)st.st_size;
	} else {
		rc = fail(err, errlen, EINVAL, path, "neither a file nor a block device");
		goto close_fd;
	}
	/*
	 * One writer per disk, readers may share (docs/storage.md): an OFD lock on the whole
	 * file, held by this open file description until the device closes it. Whoever else
	 * holds a conflicting lock (another VMM, the storage agent wiping or deleting it) makes
	 * this open fail instead of two writers corrupting one volume. A migration target opens
	 * unlocked and takes the lock from the source (fl_blk_set_lock).
	 */
	snprintf(b->name, sizeof(b->name), "%s", path);
	b->read_only = read_only;
	if (!(flags & FL_BLK_UNLOCKED)) {
		rc = fl_blk_set_lock(b, FL_BLK_LOCK_WHOLE, err, errlen);
		if (rc < 0)
			goto close_fd;
	}
	b->capacity = size / SECTOR;
	b->size = size;
	b->read_only = read_only;
	if (read_only)
		features |= VIRTIO_BLK_F_RO;
	strncpy(b->id, id ? id : "", FL_BLK_ID_LEN);
	rc = fl_virtio_init(&b->vdev, "virtio_blk", VIRTIO_ID_BLOCK, features, 1, mem, &blk_ops);
	if (rc < 0) {
		fail(err, errlen, -rc, path, NULL);
		goto close_fd;
	}
	/* struct virtio_blk_config: capacity, size_max, seg_max, geometry, blk_size. */
	uint8_t *cfg = b->vdev.config;
	fl_le_put32(cfg, (uint32_t)b->capacity);
	fl_le_put32(cfg + 4, (uint32_t)(b->capacity >> 32));
	fl_le_put32(cfg + 12, SEG_MAX);
	fl_le_put32(cfg + 20, SECTOR);
	b->vdev.config_len = 24;
	return 0;

close_fd:
	close(b->fd);
	b->fd = -1;
	return rc;
}

uint64_t fl_blk_chunks(const struct fl_blk *b)
{
	return (b->size + FL_BLK_CHUNK - 1) / FL_BLK_CHUNK;
}

int fl_blk_track_start(struct fl_blk *b)
{
	uint64_t *bm = calloc((fl_blk_chunks(b) + 63) / 64 + 1, 8);

	if (!bm)
		return -ENOMEM;
	pthread_mutex_lock(&b->vdev.lock);
	free(b->dirty);
	b->dirty = bm;
	pthread_mutex_unlock(&b->vdev.lock);
	return 0;
}

void fl_blk_track_collect(struct fl_blk *b, uint64_t *out)
{
	uint64_t words = (fl_blk_chunks(b) + 63) / 64;

	pthread_mutex_lock(&b->vdev.lock);
	if (b->dirty)
		for (uint64_t w = 0; w < words; w++) {
			out[w] |= b->dirty[w];
			b->dirty[w] = 0;
		}
	pthread_mutex_unlock(&b->vdev.lock);
}

void fl_blk_track_stop(struct fl_blk *b)
{
	uint64_t *bm;

	pthread_mutex_lock(&b->vdev.lock);
	bm = b->dirty;
	b->dirty = NULL;
	pthread_mutex_unlock(&b->vdev.lock);
	free(bm);
}

void fl_blk_fini(struct fl_blk *b)
{
	fl_blk_track_stop(b);
	fl_virtio_fini(&b->vdev);
	if (b->fd >= 0)
		close(b->fd);
	b->fd = -1;
}

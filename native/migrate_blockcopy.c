/*
 * Live block copy (docs/migration.md, "Block copy"): the disks a migration copies through its
 * stream instead of finding them on shared storage. The source's side: which disks, their
 * chunks that may hold data (the first pass), the chunks the guest wrote since the last
 * collection (virtio-blk's write tracking), each run of dirty chunks read for a BLOCK record.
 * The target's side: the DISKS record checked against its own disks, each BLOCK written at
 * its offset, the copies flushed (and checksummed in debug mode) before READY.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "migrate_blockcopy.h"
#include "virtio/blk.h"
#include "vmm.h"

_Static_assert(FL_MIG_CHUNK == FL_BLK_CHUNK, "the stream's chunk is the tracking granule");
_Static_assert(FL_MIG_MAX_DISKS == FL_MAX_DISKS, "the stream's disk count is the machine's");

static uint32_t disk_count(struct fl_vm *vm)
{
	uint32_t n = 0;

	while (n < FL_MIG_MAX_DISKS && fl_virtio_disk(vm, n))
		n++;
	return n;
}

int fl_mig_copy_init(struct fl_mig_copy *c, struct fl_vm *vm, uint32_t copy, char *err,
		     size_t errlen)
{
	memset(c, 0, sizeof(*c));
	c->disks.count = disk_count(vm);
	if (copy >> c->disks.count)
		return fl_mig_copy_fail(err, errlen, EINVAL,
					"copy of disk %d, but the machine has %u disks",
					31 - __builtin_clz(copy), c->disks.count);
	c->disks.copy = copy;
	for (uint32_t i = 0; i < c->disks.count; i++) {
		struct fl_mig_copy_disk *d = &c->d[i];
		d->blk = fl_virtio_disk(vm, i);
		c->disks.size[i] = d->blk->size;
		if (!(copy >> i & 1))
			continue;
		d->chunks = fl_blk_chunks(d->blk);
		d->words = (d->chunks + 63) / 64;
		d->dirty = calloc(d->words + 1, 8);
		d->work = calloc(d->words + 1, 8);
		if (!d->dirty || !d->work)
			return fl_mig_copy_fail(err, errlen, ENOMEM, "disk %u: copy bitmaps", i);
	}
	if (copy) {
		c->buf = malloc(FL_MIG_MAX_BLOCK);
		if (!c->buf)
			return fl_mig_copy_fail(err, errlen, ENOMEM, "block copy buffer");
	}
	return 0;
}

int fl_mig_copy_start(struct fl_mig_copy *c, char *err, size_t errlen)
{
	for (uint32_t i = 0; i < c->disks.count; i++) {
		struct fl_mig_copy_disk *d = &c->d[i];
		if (!d->dirty)
			continue;
		/* Tracking first, then the data map: a write between the two is in both. */
		if (fl_blk_track_start(d->blk) < 0)
			return fl_mig_copy_fail(err, errlen, ENOMEM, "disk %u: write tracking", i);
		d->tracking = 1;
		fl_mig_disk_data_map(d->blk->fd, d->blk->size, d->dirty);
	}
	return 0;
}

uint64_t fl_mig_copy_next(struct fl_mig_copy *c)
{
	uint64_t bytes = 0;

	for (uint32_t i = 0; i < c->disks.count; i++) {
		struct fl_mig_copy_disk *d = &c->d[i];
		uint64_t *tmp = d->work;
		if (!d->dirty)
			continue;
		d->work = d->dirty;
		d->dirty = tmp;
		memset(d->dirty, 0, d->words * 8);
		bytes += fl_mig_popcount(d->work, d->words) * FL_MIG_CHUNK;
	}
	return bytes;
}

uint64_t fl_mig_copy_collect(struct fl_mig_copy *c)
{
	uint64_t bytes = 0;

	for (uint32_t i = 0; i < c->disks.count; i++) {
		struct fl_mig_copy_disk *d = &c->d[i];
		if (!d->tracking)
			continue;
		fl_blk_track_collect(d->blk, d->dirty);
		bytes += fl_mig_popcount(d->dirty, d->words) * FL_MIG_CHUNK;
	}
	return bytes;
}

int fl_mig_copy_run(struct fl_mig_copy_disk *d, const uint64_t *bm, uint64_t *chunk,
		    uint64_t *first, uint64_t *count)
{
	uint64_t c = *chunk, w, bits;

	if (c >= d->chunks)
		return 0;
	w = c / 64;
	bits = bm[w] & (~0ULL << (c % 64));
	while (!bits && ++w < d->words)
		bits = bm[w];
	if (!bits)
		return 0;
	c = w * 64 + (uint64_t)__builtin_ctzll(bits);
	*first = c;
	while (c < d->chunks && (bm[c / 64] >> (c % 64) & 1) &&
	       c - *first < FL_MIG_MAX_BLOCK / FL_MIG_CHUNK)
		c++;
	*count = c - *first;
	*chunk = c;
	return *count > 0;
}

void fl_mig_copy_range(struct fl_mig_copy *c, uint32_t disk, uint64_t first, uint64_t count,
		       struct fl_mig_block *b)
{
	uint64_t size = c->d[disk].blk->size, off = first * FL_MIG_CHUNK, len = count * FL_MIG_CHUNK;

	*b = (struct fl_mig_block){.disk = disk, .offset = off,
				   .length = len > size - off ? size - off : len};
}

int fl_mig_copy_read(struct fl_mig_copy *c, uint32_t disk, uint64_t first, uint64_t count,
		     struct fl_mig_block *b)
{
	struct fl_blk *blk = c->d[disk].blk;
	uint64_t off, len;

	fl_mig_copy_range(c, disk, first, count, b);
	off = b->offset;
	len = b->length;
	for (uint64_t got = 0; got < len;) {
		ssize_t r = pread(blk->fd, c->buf + got, len - got, (off_t)(off + got));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r == 0) {
			/* Shrunk under us (not by the guest): what is gone reads as zeros. */
			memset(c->buf + got, 0, len - got);
			break;
		}
		got += (uint64_t)r;
	}
	return 0;
}

void fl_mig_copy_fini(struct fl_mig_copy *c)
{
	for (uint32_t i = 0; i < FL_MIG_MAX_DISKS; i++) {
		struct fl_mig_copy_disk *d = &c->d[i];
		if (d->tracking)
			fl_blk_track_stop(d->blk);
		d->tracking = 0;
		free(d->dirty);
		free(d->work);
		d->dirty = d->work = NULL;
	}
	free(c->buf);
	c->buf = NULL;
}

int fl_mig_copy_sums(struct fl_mig_copy *c, uint64_t *sums)
{
	for (uint32_t i = 0; i < c->disks.count; i++) {
		sums[i] = 0;
		if (c->disks.copy >> i & 1) {
			int rc = fl_mig_disk_sum(c->d[i].blk->fd, c->d[i].blk->size, &sums[i]);
			if (rc < 0)
				return rc;
		}
	}
	return 0;
}

/* ---- the target ---- */

int fl_mig_copy_accept(struct fl_mig_copy *c, struct fl_vm *vm, const struct fl_config *cfg,
		       const struct fl_mig_disks *theirs, char *err, size_t errlen)
{
	uint64_t size[FL_MIG_MAX_DISKS] = {0};
	uint32_t copy = 0;
	int rc;

	memset(c, 0, sizeof(*c));
	c->disks.count = disk_count(vm);
	for (uint32_t i = 0; i < c->disks.count; i++) {
		c->d[i].blk = fl_virtio_disk(vm, i);
		size[i] = c->d[i].blk->size;
		if (i < cfg->ndisks && cfg->disks[i].flags & FL_DISK_COPY)
			copy |= 1u << i;
	}
	rc = fl_mig_disks_check(theirs, c->disks.count, size, copy, err, errlen);
	if (rc < 0)
		return rc;
	c->disks = *theirs;
	for (uint32_t i = 0; i < c->disks.count; i++) {
		struct fl_blk *b = c->d[i].blk;
		if (!(copy >> i & 1))
			continue;
		if (b->read_only)
			return fl_mig_copy_fail(err, errlen, EINVAL,
						"disk %u: read-only here, a copy cannot be written "
						"into it",
						i);
		/* Its own file, not the source's: locked whole before anything is written into
		 * it, so no one else (a VMM, the storage agent's wipe or delete) uses it
		 * meanwhile. Someone holding it: refused. */
		rc = fl_blk_set_lock(b, FL_BLK_LOCK_WHOLE, err, errlen);
		if (rc < 0)
			return rc;
		/* What the source does not send (its holes) must read as zeros here: whatever
		 * the file held before (an earlier attempt's copy) goes. */
		if (b->size && fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
					 (off_t)b->size) < 0)
			return fl_mig_copy_fail(err, errlen, errno,
						"disk %u: emptying it for the copy: %s", i,
						strerror(errno));
	}
	if (copy) {
		c->buf = malloc(FL_MIG_MAX_BLOCK);
		if (!c->buf)
			return fl_mig_copy_fail(err, errlen, ENOMEM, "block copy buffer");
	}
	return 0;
}

int fl_mig_copy_write(struct fl_mig_copy *c, const struct fl_mig_block *b, char *err,
		      size_t errlen)
{
	int fd = c->d[b->disk].blk->fd;

	for (uint64_t done = 0; done < b->length;) {
		ssize_t w = pwrite(fd, c->buf + done, b->length - done, (off_t)(b->offset + done));
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return fl_mig_copy_fail(err, errlen, w < 0 ? errno : EIO,
						"disk %u: writing the copy at %llu: %s", b->disk,
						(unsigned long long)(b->offset + done),
						strerror(w < 0 ? errno : EIO));
		done += (uint64_t)w;
	}
	c->bytes += b->length;
	c->chunks += (b->length + FL_MIG_CHUNK - 1) / FL_MIG_CHUNK;
	return 0;
}

int fl_mig_copy_flush(struct fl_mig_copy *c, char *err, size_t errlen)
{
	for (uint32_t i = 0; i < c->disks.count; i++)
		if (c->disks.copy >> i & 1 && fdatasync(c->d[i].blk->fd) < 0)
			return fl_mig_copy_fail(err, errlen, errno, "disk %u: flushing the copy: %s",
						i, strerror(errno));
	return 0;
}

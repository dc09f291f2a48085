/* virtio-blk on a raw image file (blk.c). */
#ifndef FL_VIRTIO_BLK_H
#define FL_VIRTIO_BLK_H

#include <stddef.h>

#include "virtio.h"

#define FL_BLK_ID_LEN 20

struct fl_blk {
	struct fl_virtio_dev vdev; /* first: the transport hands it back to the ops */
	int fd;
	int read_only;
	int lock;	   /* which part of the volume lock it holds: FL_BLK_LOCK_* */
	uint64_t capacity; /* 512-byte sectors */
	char id[FL_BLK_ID_LEN + 1];
	char name[64]; /* its path, for errors (cut) */
	struct fl_vq_chain chain; /* the request being served (device thread only) */
	uint64_t reads, writes, read_bytes, write_bytes, errors;
};

#define FL_BLK_READ_ONLY 1u
#define FL_BLK_UNLOCKED 2u /* open without the volume lock (a migration target's disk) */

/*
 * The volume lock (docs/storage.md, "Locks"): an OFD lock, exclusive for a writable disk,
 * shared for a read-only one. A live migration hands it over without a gap a third process
 * could use: the source, paused and flushed, keeps only the hand-off byte (HANDOFF); the
 * target takes every other byte (REST); the source lets the byte go at the commit and the
 * target takes the whole file (LOCKED). Whoever asks for the whole file meanwhile finds part
 * of it held.
 */
#define FL_BLK_HANDOFF_BYTE ((1ULL << 62) + 1)
enum { FL_BLK_LOCK_NONE, FL_BLK_LOCK_WHOLE, FL_BLK_LOCK_HANDOFF, FL_BLK_LOCK_REST };

/* Opens path (flags: FL_BLK_*) and sets the device up; on failure -errno and err. */
int fl_blk_init(struct fl_blk *b, const char *path, unsigned flags, const char *id,
		const struct fl_guest_mem *mem, char *err, size_t errlen);
/* Moves the volume lock to `want` (FL_BLK_LOCK_*): WHOLE takes the whole file, HANDOFF
 * flushes the file and keeps only the hand-off byte, REST takes all but that byte, NONE
 * lets it all go. -EBUSY (err says so) when another open file holds a conflicting lock;
 * then the lock is as it was. The device must not be serving requests (paused, or not
 * started). */
int fl_blk_set_lock(struct fl_blk *b, int want, char *err, size_t errlen);
void fl_blk_fini(struct fl_blk *b);

#endif

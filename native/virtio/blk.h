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
	uint64_t size; /* the file's bytes (a block copy copies them all) */
	/* Write tracking (a live block copy): one bit per FL_BLK_CHUNK of the file, set after
	 * every write the guest made; NULL when nobody tracks. Under vdev.lock, which the
	 * device thread holds while it serves requests. */
	uint64_t *dirty;
};

/*
 * The tracking granule. 64 KiB, as QEMU's drive-mirror default: the bitmap stays small (an
 * 8 GiB disk needs 16 KiB of it, 1 TiB 2 MiB), one guest write of 4 KiB costs a 64 KiB
 * resend at worst, and it is a multiple of every file system's block, so SEEK_DATA's holes
 * line up with whole chunks.
 */
#define FL_BLK_CHUNK (64u * 1024u)

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
 * lets it all go (REST while holding WHOLE: nothing to do). -EBUSY (err says so) when another open file holds a conflicting lock;
 * then the lock is as it was. The device must not be serving requests (paused, or not
 * started). */
int fl_blk_set_lock(struct fl_blk *b, int want, char *err, size_t errlen);
void fl_blk_fini(struct fl_blk *b);

/* The chunks of the file (FL_BLK_CHUNK each, the last one maybe partial). */
uint64_t fl_blk_chunks(const struct fl_blk *b);
/* Starts tracking writes (every chunk clean); 0 or -ENOMEM. Safe while the device runs. */
int fl_blk_track_start(struct fl_blk *b);
/* ORs the chunks written since the last collect into out (fl_blk_chunks bits) and clears
 * them, atomically with respect to the device thread: a write the guest made before the
 * collect is in out, one after it in the next collect. A write's bit is set once its data
 * is in the file, so what a caller reads after the collect is at least that new. */
void fl_blk_track_collect(struct fl_blk *b, uint64_t *out);
/* Stops tracking and frees the bitmap; safe while the device runs. */
void fl_blk_track_stop(struct fl_blk *b);

#endif

/*
 * Live block copy between the migration's ends (migrate_blockcopy.c): the disks the stream
 * copies, on the source (tracked and sent) and on the target (written).
 */
#ifndef FL_MIGRATE_BLOCKCOPY_H
#define FL_MIGRATE_BLOCKCOPY_H

#include <stdarg.h>
#include <stdio.h>

#include "migrate_link.h"

struct fl_mig_copy_disk {
	struct fl_blk *blk;
	uint64_t chunks, words; /* FL_MIG_CHUNK chunks of the file, bitmap words */
	uint64_t *dirty;	/* source: to send next (NULL: not copied) */
	uint64_t *work;		/* source: being sent */
	int tracking;		/* source: the device tracks its writes */
};

struct fl_mig_copy {
	struct fl_mig_disks disks; /* what both sides agreed on (the DISKS record) */
	struct fl_mig_copy_disk d[FL_MIG_MAX_DISKS];
	uint8_t *buf;		   /* one BLOCK record's data */
	uint64_t bytes, chunks;	   /* sent (source) or written (target) */
};

static inline int fl_mig_copy_fail(char *err, size_t errlen, int e, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static inline int fl_mig_copy_fail(char *err, size_t errlen, int e, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	return -e;
}

/* Source: the DISKS record for vm and bitmaps for the disks in `copy` (bit i: disk i);
 * -EINVAL for a disk the machine lacks, -ENOMEM. fl_mig_copy_fini in any case. */
int fl_mig_copy_init(struct fl_mig_copy *c, struct fl_vm *vm, uint32_t copy, char *err,
		     size_t errlen);
/* Source: tracks the copied disks' writes and marks their chunks that may hold data as
 * the first pass's to send. */
int fl_mig_copy_start(struct fl_mig_copy *c, char *err, size_t errlen);
/* Source: what was collected becomes what is sent (work); returns its bytes. */
uint64_t fl_mig_copy_next(struct fl_mig_copy *c);
/* Source: the chunks written since the last collect, added to dirty; returns dirty's bytes. */
uint64_t fl_mig_copy_collect(struct fl_mig_copy *c);
/* Source: the next run of set chunks in bm from *chunk (at most one BLOCK record's), *chunk
 * moved past it; 0 when none is left. */
int fl_mig_copy_run(struct fl_mig_copy_disk *d, const uint64_t *bm, uint64_t *chunk,
		    uint64_t *first, uint64_t *count);
/* Source: the BLOCK record's range for chunks [first, first+count) (cut at the file's end). */
void fl_mig_copy_range(struct fl_mig_copy *c, uint32_t disk, uint64_t first, uint64_t count,
		       struct fl_mig_block *b);
/* Source: reads chunks [first, first+count) of a disk into buf (cut at the file's end) and
 * fills the BLOCK record's range. 0 or -errno. */
int fl_mig_copy_read(struct fl_mig_copy *c, uint32_t disk, uint64_t first, uint64_t count,
		     struct fl_mig_block *b);
/* Debug mode: each copied disk's checksum (0 for the others). 0 or -errno. */
int fl_mig_copy_sums(struct fl_mig_copy *c, uint64_t *sums);
/* Stops tracking, frees the bitmaps and the buffer. */
void fl_mig_copy_fini(struct fl_mig_copy *c);

/* Target: checks the source's DISKS record against vm's disks (FL_DISK_COPY in cfg says
 * which are copied), empties each copied disk (punched to a hole: what the source does not
 * send reads as zeros). 0 or -errno with err. */
int fl_mig_copy_accept(struct fl_mig_copy *c, struct fl_vm *vm, const struct fl_config *cfg,
		       const struct fl_mig_disks *theirs, char *err, size_t errlen);
/* Target: writes buf (a checked BLOCK record's data) at its offset. */
int fl_mig_copy_write(struct fl_mig_copy *c, const struct fl_mig_block *b, char *err,
		      size_t errlen);
/* Target: every copied disk on stable storage. */
int fl_mig_copy_flush(struct fl_mig_copy *c, char *err, size_t errlen);

#endif

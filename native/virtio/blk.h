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
	uint64_t capacity; /* 512-byte sectors */
	char id[FL_BLK_ID_LEN + 1];
	struct fl_vq_chain chain; /* the request being served (device thread only) */
	uint64_t reads, writes, read_bytes, write_bytes, errors;
};

/* Opens path (read-only when asked) and sets the device up; on failure -errno and err. */
int fl_blk_init(struct fl_blk *b, const char *path, int read_only, const char *id,
		const struct fl_guest_mem *mem, char *err, size_t errlen);
void fl_blk_fini(struct fl_blk *b);

#endif

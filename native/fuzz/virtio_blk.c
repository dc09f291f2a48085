/*
 * libFuzzer target for virtio-blk request handling (native/virtio/blk.c) behind the real
 * transport and virtqueue code: the guest's RAM (descriptor chains, request headers, data
 * buffers, all attacker-chosen) is served by the device against a real backing file (a
 * memfd), twice, since what a read request writes into RAM may be the ring itself. Writes
 * are tracked as during a live block copy (bit 3 of the flags: not), so each one's chunk
 * index, from guest-chosen sectors, lands in a bitmap sized from the disk (ASan sees any
 * bit outside it); every chunk a write reached must be marked.
 *
 * Input: flags (bit 0: read-only disk; bits 1-2: disk of 0, 4 KiB, 64 KiB or 64 KiB + 300
 * bytes), the low feature bits to accept, the queue (see fz_driver_up), then guest RAM.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../virtio/blk.h"
#include "guest.h"

static const size_t disk_sizes[4] = {0, 4096, 65536, 65536 + 300};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int disk_fd = -1;
	static uint8_t pattern[65536 + 300];
	static struct fl_blk b;
	struct fz_input in = {data, size};
	char path[64], err[256];

	uint32_t flags = (uint32_t)fz_take(&in, 1);
	uint32_t features = (uint32_t)fz_take(&in, 1);
	size_t disk = disk_sizes[(flags >> 1) & 3];

	if (disk_fd < 0) {
		disk_fd = memfd_create("fuzz-disk", MFD_CLOEXEC);
		for (size_t i = 0; i < sizeof(pattern); i++)
			pattern[i] = (uint8_t)(i * 7 + (i >> 9));
	}
	/* The same disk for every run: a write must not leak into the next input. */
	if (disk_fd < 0 || ftruncate(disk_fd, 0) < 0 ||
	    (disk && pwrite(disk_fd, pattern, disk, 0) != (ssize_t)disk))
		abort();
	snprintf(path, sizeof(path), "/proc/self/fd/%d", disk_fd);
	if (fl_blk_init(&b, path, flags & 1, "fuzz-disk-serial-0123456789", &fz_mem, err,
			sizeof(err)) < 0)
		abort();
	if (b.capacity != disk / 512)
		__builtin_trap();

	if (!(flags & 8) && fl_blk_track_start(&b) < 0)
		abort();
	fz_driver_up(&b.vdev, features, &in);
	fz_ram_fill(&in);
	for (int round = 0; round < 2; round++) {
		fz_mmio_write(&b.vdev, FL_VIRTIO_QUEUE_NOTIFY, 0);
		fz_serve(&b.vdev);
	}
	/* Every request either moved whole sectors inside the disk or failed. */
	if (b.read_bytes % 512 || b.write_bytes % 512 || b.read_bytes > 2u * FL_VQ_MAX_SIZE * disk ||
	    (b.read_only && b.writes))
		__builtin_trap();
	if (!(flags & 8)) {
		uint64_t dirty[2] = {0, 0}; /* the 64 KiB + 300 disk has 2 chunks */
		fl_blk_track_collect(&b, dirty);
		if (dirty[0] >> fl_blk_chunks(&b) || dirty[1])
			__builtin_trap(); /* a chunk beyond the disk */
		if (b.write_bytes && !dirty[0])
			__builtin_trap(); /* data that reached the file, not marked */
		if (!b.writes && !b.errors && dirty[0])
			__builtin_trap();
	}
	fl_blk_fini(&b);
	return 0;
}

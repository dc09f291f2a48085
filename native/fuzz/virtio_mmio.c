/*
 * libFuzzer target for the virtio-mmio register file (native/virtio/mmio.c): a guest's
 * sequence of register accesses, of any offset and width, on a virtio-blk or virtio-net
 * device, mixed with writes to its RAM, rounds of the device thread and a snapshot save and
 * restore. Whatever the order, the transport's invariants hold (fz_check_transport) and the
 * devices touch nothing outside RAM.
 *
 * Input: flags (bit 0: virtio-net, else virtio-blk), then operations, each an opcode byte:
 *   0 read  offset(2) width(1)          1 write offset(2) width(1) value(8)
 *   2 RAM   gpa(2, bit 15: high region) length(1) bytes
 *   3 serve the queues                  4 save and restore the transport
 *   5 a host frame (net): length(1) bytes
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../devices.h"
#include "../virtio/blk.h"
#include "../virtio/net.h"
#include "guest.h"

#define MAX_OPS 256

static const uint32_t widths[4] = {1, 2, 4, 8};

static void poke_ram(struct fz_input *in)
{
	uint16_t at = (uint16_t)fz_take(in, 2);
	uint64_t gpa = fz_gpa(at & 0x7fff, at & 0x8000);
	size_t len = (size_t)fz_take(in, 1), got;
	const uint8_t *p = fz_bytes(in, len, &got);
	uint8_t *dst = fl_gmem_ptr(&fz_mem, gpa, got);

	if (dst)
		memcpy(dst, p, got);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int disk_fd = -1, sv[2] = {-1, -1};
	static struct fl_blk b;
	static struct fl_net n;
	static const uint8_t mac[6] = {0x52, 0x54, 0, 0x12, 0x34, 0x56};
	static uint8_t scratch[4096];
	struct fz_input in = {data, size};
	struct fl_virtio_state st;
	struct fl_virtio_dev *d;
	char path[64], err[256];
	int net = (int)fz_take(&in, 1) & 1;

	if (disk_fd < 0) {
		disk_fd = memfd_create("fuzz-disk", MFD_CLOEXEC);
		if (disk_fd < 0 || socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv) < 0)
			abort();
	}
	memset(fz_ram, 0, sizeof(fz_ram));
	if (net) {
		if (fl_net_init(&n, sv[0], mac, &fz_mem, err, sizeof(err)) < 0)
			abort();
		d = &n.vdev;
	} else {
		if (ftruncate(disk_fd, 0) < 0 || ftruncate(disk_fd, 8192) < 0)
			abort();
		snprintf(path, sizeof(path), "/proc/self/fd/%d", disk_fd);
		if (fl_blk_init(&b, path, 0, "fuzz", &fz_mem, err, sizeof(err)) < 0)
			abort();
		d = &b.vdev;
	}

	for (int op = 0; op < MAX_OPS && in.n; op++) {
		uint8_t buf[8] = {0};
		uint64_t off;
		uint32_t w;
		size_t len, got;
		const uint8_t *p;

		switch (fz_take(&in, 1) % 6) {
		case 0:
			off = fz_take(&in, 2) % FL_VIRTIO_MMIO_SIZE;
			w = widths[fz_take(&in, 1) & 3];
			if (off + w > FL_VIRTIO_MMIO_SIZE)
				break; /* the bus refuses accesses straddling the window */
			fl_virtio_mmio(d, off, buf, w, 0);
			if (off == 0 && w == 4 && fl_le_get32(buf) != 0x74726976)
				__builtin_trap();
			break;
		case 1:
			off = fz_take(&in, 2) % FL_VIRTIO_MMIO_SIZE;
			w = widths[fz_take(&in, 1) & 3];
			fl_le_put(buf, 8, fz_take(&in, 8));
			if (off + w > FL_VIRTIO_MMIO_SIZE)
				break;
			fl_virtio_mmio(d, off, buf, w, 1);
			break;
		case 2:
			poke_ram(&in);
			break;
		case 3:
			fz_serve(d);
			break;
		case 4:
			fl_virtio_save(d, &st);
			if (fl_virtio_restore(d, &st) < 0)
				__builtin_trap(); /* our own snapshot must be taken back */
			break;
		case 5:
			len = (size_t)fz_take(&in, 1);
			p = fz_bytes(&in, len, &got);
			if (net && send(sv[1], p, got, MSG_DONTWAIT) < 0)
				abort();
			break;
		}
		fz_check_transport(d);
	}

	if (net) {
		while (recv(sv[0], scratch, sizeof(scratch), MSG_DONTWAIT) >= 0)
			;
		while (recv(sv[1], scratch, sizeof(scratch), MSG_DONTWAIT) >= 0)
			;
		fl_net_fini(&n);
	} else {
		fl_blk_fini(&b);
	}
	return 0;
}

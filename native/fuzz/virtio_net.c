/*
 * libFuzzer target for virtio-net (native/virtio/net.c) behind the real transport and
 * virtqueue code: the guest's transmit chains go out, and frames from the host come into
 * its receive chains. A datagram socketpair stands in for the tap (it keeps frame
 * boundaries as a tap does); the harness is the host end. The vnet header a tap opened with
 * IFF_VNET_HDR would add is given to the device as the ioctl would report it.
 *
 * Input: the low feature bits to accept (bits 6-7, which the device does not offer, pick the
 * tap's vnet header: 10, 12 or 32 bytes, or none), the receive then the transmit queue (see
 * fz_driver_up), the number of host frames (0..7) and each as a 2-byte length and its
 * bytes, then guest RAM.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../virtio/net.h"
#include "guest.h"

#define MAX_FRAME 2048
#define ETH_HEADER 14

static const uint32_t vnet_hdr[4] = {10, 12, 32, 0};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int sv[2] = {-1, -1};
	static struct fl_net n;
	static uint8_t frame[FZ_RAM_SIZE + 64];
	static const uint8_t mac[6] = {0x52, 0x54, 0, 0x12, 0x34, 0x56};
	struct fz_input in = {data, size};
	char err[256];

	if (sv[0] < 0 && socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv) < 0)
		abort();
	if (fl_net_init(&n, sv[0], mac, &fz_mem, err, sizeof(err)) < 0)
		abort();
	uint32_t features = (uint32_t)fz_take(&in, 1);
	n.host_hdr = vnet_hdr[features >> 6];
	fz_driver_up(&n.vdev, features, &in);

	/* Host frames wait in the socket before the guest looks. */
	uint32_t nframes = (uint32_t)fz_take(&in, 1) & 7;
	for (uint32_t i = 0; i < nframes; i++) {
		size_t len = (size_t)fz_take(&in, 2) % MAX_FRAME, got;
		const uint8_t *p = fz_bytes(&in, len, &got);
		if (send(sv[1], p, got, MSG_DONTWAIT) < 0)
			abort();
	}
	fz_ram_fill(&in);

	fz_mmio_write(&n.vdev, FL_VIRTIO_QUEUE_NOTIFY, FL_NET_TXQ);
	fz_mmio_write(&n.vdev, FL_VIRTIO_QUEUE_NOTIFY, FL_NET_RXQ);
	fz_serve(&n.vdev);
	fz_serve(&n.vdev); /* the tap is still readable: the worker comes back */

	/* What went out is a frame no bigger than guest RAM after a zeroed vnet header, and a
	 * frame count was kept for each. */
	static const uint8_t zeros[32];
	uint64_t out = 0;
	ssize_t r;
	while ((r = recv(sv[1], frame, sizeof(frame), MSG_DONTWAIT)) >= 0) {
		if ((size_t)r > n.host_hdr + FZ_RAM_SIZE || (size_t)r < n.host_hdr + ETH_HEADER ||
		    memcmp(frame, zeros, n.host_hdr) != 0)
			__builtin_trap();
		out++;
	}
	if (out != n.tx_frames || n.rx_frames > nframes)
		__builtin_trap();
	/* Leftover host frames must not reach the next input. */
	while (recv(sv[0], frame, sizeof(frame), MSG_DONTWAIT) >= 0)
		;
	fl_net_fini(&n);
	return 0;
}

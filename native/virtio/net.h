/* virtio-net on a tap file descriptor (net.c). */
#ifndef FL_VIRTIO_NET_H
#define FL_VIRTIO_NET_H

#include <stddef.h>

#include "virtio.h"

#define FL_NET_RXQ 0
#define FL_NET_TXQ 1
/* struct virtio_net_hdr_v1 (num_buffers included, as VERSION_1 has it). */
#define FL_NET_HDR 12

struct fl_net {
	struct fl_virtio_dev vdev; /* first: the transport hands it back to the ops */
	int tap_fd;		   /* the caller's; never closed here */
	uint32_t host_hdr;	   /* vnet header bytes the tap adds and expects (0: none) */
	uint8_t mac[6];
	struct fl_vq_chain rx;	   /* a receive chain taken, waiting for a frame */
	int rx_have;
	struct fl_vq_chain tx;
	uint64_t rx_frames, tx_frames, rx_dropped, tx_dropped;
};

/* Sets the device up on tap_fd (made non-blocking); on failure -errno and err. */
int fl_net_init(struct fl_net *n, int tap_fd, const uint8_t mac[6],
		const struct fl_guest_mem *mem, char *err, size_t errlen);
void fl_net_fini(struct fl_net *n);

#endif

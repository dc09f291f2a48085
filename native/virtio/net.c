/*
 * virtio-net on a tap file descriptor the caller opened (the runtime never configures host
 * networking).
 *
 * A tap opened with IFF_VNET_HDR (its header set to virtio 1.x's 12 bytes here) carries the
 * offloads: the device offers checksum offload and TSO both ways (CSUM, HOST_TSO4/6,
 * HOST_ECN; GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN). On transmit the guest's header goes to the
 * tap as it is when the guest took CSUM (the kernel checks it: a malformed one is refused
 * and the frame dropped), zeros otherwise; on receive the tap writes its header into the
 * guest's buffer (num_buffers set to 1 after it; flags and GSO fields zeroed when the guest
 * did not take GUEST_CSUM), and TUNSETOFFLOAD lets it pass partial checksums and large
 * segments only as far as the guest took them.
 *
 * Without IFF_VNET_HDR no offloads are offered: every frame is a plain Ethernet frame, the
 * guest's virtio header is dropped on transmit and written as zeros (num_buffers 1) on
 * receive. A tap whose header size cannot be set to 12 is used the same way, a zeroed
 * header of its size added on transmit and the one it adds on receive discarded. The
 * receive path reads the tap only while the guest has posted buffers; frames larger than a
 * buffer are cut to it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include "net.h"

#define VIRTIO_NET_F_CSUM (1ULL << 0)
#define VIRTIO_NET_F_GUEST_CSUM (1ULL << 1)
#define VIRTIO_NET_F_MAC (1ULL << 5)
#define VIRTIO_NET_F_GUEST_TSO4 (1ULL << 7)
#define VIRTIO_NET_F_GUEST_TSO6 (1ULL << 8)
#define VIRTIO_NET_F_GUEST_ECN (1ULL << 9)
#define VIRTIO_NET_F_HOST_TSO4 (1ULL << 11)
#define VIRTIO_NET_F_HOST_TSO6 (1ULL << 12)
#define VIRTIO_NET_F_HOST_ECN (1ULL << 13)
#define VIRTIO_NET_F_STATUS (1ULL << 16)
#define OFFLOADS                                                                          \
	(VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 |              \
	 VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN | VIRTIO_NET_F_HOST_TSO4 |           \
	 VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN)
#define VIRTIO_NET_S_LINK_UP 1
#define MAX_HOST_HDR 32
#define MIN_FRAME 14 /* an Ethernet header: a shorter frame or receive buffer is useless */

static struct fl_net *net_of(struct fl_virtio_dev *d)
{
	return (struct fl_net *)d;
}

/* Whether the tap carries the guest's own header (a 12-byte vnet header) and the guest took
 * `feature` of the offloads. */
static int took(const struct fl_net *n, uint64_t feature)
{
	return n->host_hdr == FL_NET_HDR && (n->vdev.s.driver_features & feature);
}

static void tx_process(struct fl_net *n)
{
	struct fl_virtio_dev *d = &n->vdev;
	struct fl_vq *vq = &d->vq[FL_NET_TXQ];
	static const uint8_t zero_hdr[MAX_HOST_HDR];
	struct iovec out[FL_VQ_MAX_SEGS + 1];
	int pushed = 0;

	for (uint32_t i = 0; i < vq->cfg.size; i++) {
		int rc = fl_vq_pop(vq, d->mem, &n->tx);
		if (rc == 0)
			break;
		if (rc < 0 || n->tx.out_len < FL_NET_HDR) {
			fl_virtio_set_broken(d);
			return;
		}
		uint32_t k = 0, len = n->tx.out_len - FL_NET_HDR;
		if (took(n, VIRTIO_NET_F_CSUM)) {
			/* Its header as it is: the tap checks it (csum_start/offset within the
			 * frame, a GSO type and size it supports) before it builds the packet. */
			k = fl_iov_slice(n->tx.iov, n->tx.nout, 0, n->tx.out_len, out, FL_VQ_MAX_SEGS);
		} else {
			if (n->host_hdr)
				out[k++] = (struct iovec){(void *)zero_hdr, n->host_hdr};
			k += fl_iov_slice(n->tx.iov, n->tx.nout, FL_NET_HDR, len, out + k,
					  FL_VQ_MAX_SEGS);
		}
		ssize_t w = -1;
		/* Shorter than an Ethernet header is no frame: a tap refuses it, and an empty
		 * writev returns 0 without sending anything. Dropped, and counted as such. */
		if (len >= MIN_FRAME) {
			do
				w = writev(n->tap_fd, out, (int)k);
			while (w < 0 && errno == EINTR);
		}
		/* A full or refusing tap drops the frame, as a congested link would. */
		if (w < 0)
			n->tx_dropped++;
		else
			n->tx_frames++;
		fl_vq_push(vq, n->tx.head, 0);
		pushed = 1;
	}
	if (pushed)
		fl_virtio_signal_used(d, FL_NET_TXQ);
}

/* Moves frames from the tap into posted receive buffers until either runs out. */
static void rx_process(struct fl_net *n)
{
	struct fl_virtio_dev *d = &n->vdev;
	struct fl_vq *vq = &d->vq[FL_NET_RXQ];
	uint8_t host_hdr[MAX_HOST_HDR];
	uint8_t guest_hdr[FL_NET_HDR] = {0};
	struct iovec in[FL_VQ_MAX_SEGS + 1];
	int pushed = 0;

	guest_hdr[10] = 1; /* num_buffers */
	for (uint32_t i = 0; i < FL_VQ_MAX_SIZE; i++) {
		if (!fl_virtio_queue_live(d, FL_NET_RXQ))
			break;
		if (!n->rx_have) {
			int rc = fl_vq_pop(vq, d->mem, &n->rx);
			if (rc < 0 || (rc > 0 && (n->rx.nout || n->rx.in_len < FL_NET_HDR + MIN_FRAME))) {
				fl_virtio_set_broken(d);
				break;
			}
			if (rc == 0) {
				/* No buffers: stop reading the tap until the guest posts some. */
				d->worker.extra_wanted = 0;
				break;
			}
			n->rx_have = 1;
		}
		uint32_t k = 0, direct = n->host_hdr == FL_NET_HDR;
		if (direct) {
			/* The tap's header straight into the guest's (the same layout). */
			k = fl_iov_slice(n->rx.iov, n->rx.nin, 0, n->rx.in_len, in, FL_VQ_MAX_SEGS);
		} else {
			if (n->host_hdr)
				in[k++] = (struct iovec){host_hdr, n->host_hdr};
			k += fl_iov_slice(n->rx.iov, n->rx.nin, FL_NET_HDR,
					  n->rx.in_len - FL_NET_HDR, in + k, FL_VQ_MAX_SEGS);
		}
		ssize_t r;
		do
			r = readv(n->tap_fd, in, (int)k);
		while (r < 0 && errno == EINTR);
		if (r < 0 || (uint32_t)r < n->host_hdr) {
			if (r >= 0)
				n->rx_dropped++;
			break; /* EAGAIN: nothing more; the chain waits for the next frame */
		}
		if (direct) {
			/* The tap leaves num_buffers as it was; a guest that took no checksum
			 * offload must see no flags (nor GSO fields: the tap sends it none). */
			if (!took(n, VIRTIO_NET_F_GUEST_CSUM))
				fl_iov_to(n->rx.iov, n->rx.nin, 0, guest_hdr, FL_NET_HDR);
			else
				fl_iov_to(n->rx.iov, n->rx.nin, 10, guest_hdr + 10, 2);
			fl_vq_push(vq, n->rx.head, (uint32_t)r);
		} else {
			fl_iov_to(n->rx.iov, n->rx.nin, 0, guest_hdr, FL_NET_HDR);
			fl_vq_push(vq, n->rx.head, FL_NET_HDR + (uint32_t)r - n->host_hdr);
		}
		n->rx_have = 0;
		n->rx_frames++;
		pushed = 1;
	}
	if (pushed)
		fl_virtio_signal_used(d, FL_NET_RXQ);
}

static void net_process(struct fl_virtio_dev *d, uint32_t qi)
{
	struct fl_net *n = net_of(d);

	if (qi == FL_NET_TXQ) {
		tx_process(n);
	} else {
		d->worker.extra_wanted = 1;
		rx_process(n);
	}
}

static void net_extra(struct fl_virtio_dev *d)
{
	rx_process(net_of(d));
}

/* A tap that refuses the setting keeps sending plain frames, which every guest takes. */
static void tap_offloads_set(struct fl_net *n, unsigned int flags)
{
	if (n->host_hdr == FL_NET_HDR)
		(void)ioctl(n->tap_fd, TUNSETOFFLOAD, flags);
}

/* What the tap may hand the guest: partial checksums and large segments only as far as
 * the guest took them. */
static void tap_offloads(struct fl_net *n)
{
	unsigned int flags = 0;

	if (took(n, VIRTIO_NET_F_GUEST_CSUM)) {
		flags |= TUN_F_CSUM;
		if (took(n, VIRTIO_NET_F_GUEST_TSO4))
			flags |= TUN_F_TSO4;
		if (took(n, VIRTIO_NET_F_GUEST_TSO6))
			flags |= TUN_F_TSO6;
		if ((flags & (TUN_F_TSO4 | TUN_F_TSO6)) && took(n, VIRTIO_NET_F_GUEST_ECN))
			flags |= TUN_F_TSO_ECN;
	}
	tap_offloads_set(n, flags);
}

static void net_reset(struct fl_virtio_dev *d)
{
	struct fl_net *n = net_of(d);

	n->rx_have = 0;
	d->worker.extra_wanted = 0;
	tap_offloads_set(n, 0); /* (the features are cleared after this) */
}

static void net_activate(struct fl_virtio_dev *d)
{
	tap_offloads(net_of(d));
	d->worker.extra_wanted = 1;
	fl_virtio_worker_kick(d);
}

static void net_quiesce(struct fl_virtio_dev *d)
{
	struct fl_net *n = net_of(d);

	/* A taken but unfilled receive chain goes back to the ring: taken again on resume. */
	if (n->rx_have) {
		d->vq[FL_NET_RXQ].last_avail--;
		n->rx_have = 0;
	}
}

static const struct fl_virtio_ops net_ops = {
	.process = net_process,
	.reset = net_reset,
	.activate = net_activate,
	.extra = net_extra,
	.quiesce = net_quiesce,
};

int fl_net_init(struct fl_net *n, int tap_fd, const uint8_t mac[6],
		const struct fl_guest_mem *mem, char *err, size_t errlen)
{
	struct ifreq ifr;
	int flags, rc, hdr = 0;

	memset(n, 0, sizeof(*n));
	n->tap_fd = -1;
	flags = fcntl(tap_fd, F_GETFL);
	if (flags < 0 || fcntl(tap_fd, F_SETFL, flags | O_NONBLOCK) < 0) {
		snprintf(err, errlen, "tap fd %d: %s", tap_fd, strerror(errno));
		return -errno;
	}
	memset(&ifr, 0, sizeof(ifr));
	if (ioctl(tap_fd, TUNGETIFF, &ifr) == 0 && (ifr.ifr_flags & IFF_VNET_HDR)) {
		/* virtio 1.x's header, so the guest's and the tap's are one: the offloads. */
		hdr = FL_NET_HDR;
		if (ioctl(tap_fd, TUNSETVNETHDRSZ, &hdr) < 0 &&
		    (ioctl(tap_fd, TUNGETVNETHDRSZ, &hdr) < 0 || hdr < 0 || hdr > MAX_HOST_HDR)) {
			snprintf(err, errlen, "tap fd %d: unusable vnet header size", tap_fd);
			return -EINVAL;
		}
	}
	n->host_hdr = (uint32_t)hdr;
	n->tap_fd = tap_fd;
	memcpy(n->mac, mac, 6);
	/* Nothing offloaded until the guest says what it takes (a tap kept from an earlier
	 * guest may still have them on). */
	if (n->host_hdr == FL_NET_HDR && ioctl(tap_fd, TUNSETOFFLOAD, 0) < 0) {
		snprintf(err, errlen, "tap fd %d: TUNSETOFFLOAD: %s", tap_fd, strerror(errno));
		return -errno;
	}
	rc = fl_virtio_init(&n->vdev, "virtio_net", VIRTIO_ID_NET,
			    VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS |
				    (n->host_hdr == FL_NET_HDR ? OFFLOADS : 0),
			    2, mem, &net_ops);
	if (rc < 0) {
		snprintf(err, errlen, "virtio-net: %s", strerror(-rc));
		return rc;
	}
	n->vdev.worker.extra_fd = tap_fd;
	/* struct virtio_net_config: mac, status. */
	memcpy(n->vdev.config, mac, 6);
	n->vdev.config[6] = VIRTIO_NET_S_LINK_UP;
	n->vdev.config[7] = 0;
	n->vdev.config_len = 8;
	return 0;
}

void fl_net_fini(struct fl_net *n)
{
	fl_virtio_fini(&n->vdev);
	n->tap_fd = -1;
}

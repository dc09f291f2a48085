/*
 * What both ends of a live migration share (migrate_link.h): the control handle, the socket
 * whose every wait checks cancel and the deadline, and the RAM checksum of debug mode. The
 * source is migrate_source.c, the target migrate_target.c, the stream's format migrate.h.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "migrate_link.h"
#include "vmm.h"

#define PAGE FL_MIG_PAGE
#define POLL_MS 20 /* how often a blocked send or receive checks cancel */
#define K_DISK 0x165667b19e3779f9ULL /* a disk checksum's start */

uint64_t fl_mig_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

uint64_t fl_mig_deadline(uint64_t t0, uint64_t timeout_ns)
{
	return timeout_ns > UINT64_MAX - t0 ? UINT64_MAX : t0 + timeout_ns;
}

/* ---- the control handle ---- */

struct fl_migration *fl_migration_new(void)
{
	struct fl_migration *m = calloc(1, sizeof(*m));

	if (!m)
		return NULL;
	if (pthread_mutex_init(&m->lock, NULL) != 0) {
		free(m);
		return NULL;
	}
	m->budget_ns = 300000000ULL;
	return m;
}

void fl_migration_free(struct fl_migration *m)
{
	if (!m)
		return;
	pthread_mutex_destroy(&m->lock);
	free(m);
}

const char *fl_migration_error(const struct fl_migration *m)
{
	return m ? m->err : "no migration handle";
}

void fl_migration_set_budget(struct fl_migration *m, uint64_t downtime_ns)
{
	__atomic_store_n(&m->budget_ns, downtime_ns, __ATOMIC_RELAXED);
}

void fl_migration_set_bandwidth(struct fl_migration *m, uint64_t bytes_per_s)
{
	__atomic_store_n(&m->bandwidth, bytes_per_s, __ATOMIC_RELAXED);
}

void fl_migration_set_start_paused(struct fl_migration *m, int paused)
{
	__atomic_store_n(&m->start_paused, !!paused, __ATOMIC_RELAXED);
}

void fl_migration_set_copy_disks(struct fl_migration *m, uint32_t mask)
{
	__atomic_store_n(&m->copy_disks, mask, __ATOMIC_RELAXED);
}

void fl_migration_cancel(struct fl_migration *m)
{
	__atomic_store_n(&m->cancel, 1, __ATOMIC_SEQ_CST);
}

void fl_migration_progress(struct fl_migration *m, struct fl_migrate_progress *out)
{
	pthread_mutex_lock(&m->lock);
	*out = m->progress;
	out->budget_ns = __atomic_load_n(&m->budget_ns, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&m->lock);
}

int fl_mig_fail(struct fl_migration *m, int e, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(m->err, sizeof(m->err), fmt, ap);
	va_end(ap);
	return -e;
}

/* ---- the socket: every wait checks cancel and the deadline ---- */

int fl_mig_check(const struct fl_mig_link *l)
{
	if (l->cancellable && __atomic_load_n(&l->m->cancel, __ATOMIC_SEQ_CST))
		return -ECANCELED;
	if (fl_mig_now() >= l->deadline)
		return -ETIMEDOUT;
	return 0;
}

int fl_mig_wait(struct fl_mig_link *l, short events)
{
	for (;;) {
		struct pollfd p = {.fd = l->fd, .events = events};
		int n = fl_mig_check(l);

		if (n < 0)
			return n;
		n = poll(&p, 1, POLL_MS);
		if (n < 0 && errno != EINTR)
			return -errno;
		if (n > 0)
			return 0;
	}
}

int fl_mig_sendv(struct fl_mig_link *l, struct iovec *iov, int n)
{
	while (n > 0) {
		struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
		ssize_t w = sendmsg(l->fd, &msg, MSG_NOSIGNAL); /* a closed peer is an error, not a signal */
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				return -errno;
			int rc = fl_mig_wait(l, POLLOUT);
			if (rc < 0)
				return rc;
			continue;
		}
		while (n > 0 && (size_t)w >= iov->iov_len) {
			w -= (ssize_t)iov->iov_len;
			iov++;
			n--;
		}
		if (n > 0) {
			iov->iov_base = (uint8_t *)iov->iov_base + w;
			iov->iov_len -= (size_t)w;
		}
	}
	return 0;
}

int fl_mig_recv(struct fl_mig_link *l, void *buf, size_t len)
{
	uint8_t *p = buf;

	while (len) {
		ssize_t r = read(l->fd, p, len);
		if (r == 0)
			return -ECONNRESET;
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				return -errno;
			int rc = fl_mig_wait(l, POLLIN);
			if (rc < 0)
				return rc;
			continue;
		}
		p += r;
		len -= (size_t)r;
	}
	return 0;
}

int fl_mig_sendfile(struct fl_mig_link *l, int fd, uint64_t off, uint64_t len)
{
	static const uint8_t zeros[4096];
	off_t pos = (off_t)off;

	while (len) {
		ssize_t w = sendfile(l->fd, fd, &pos, len);
		if (w > 0) {
			len -= (uint64_t)w;
			continue;
		}
		if (w == 0) {
			/* Past the end of the file: zeros, as a read of a shrunk file would give. */
			while (len) {
				size_t n = len < sizeof(zeros) ? (size_t)len : sizeof(zeros);
				struct iovec iov = {(void *)zeros, n};
				int rc = fl_mig_sendv(l, &iov, 1); /* (consumes iov) */
				if (rc < 0)
					return rc;
				len -= n;
			}
			return 0;
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			return -errno;
		int rc = fl_mig_wait(l, POLLOUT);
		if (rc < 0)
			return rc;
	}
	return 0;
}

static uint64_t realtime_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* The kernel's receive time of an skb (SO_TIMESTAMPNS: CLOCK_REALTIME) on our monotonic
 * clock, or now when the message carries none. The offset between the clocks is read with
 * the monotonic read between two realtime ones (their midpoint): a preemption between two
 * reads would shift the arrival by as much, so a pair further apart than 20 us is read
 * again (a few tries; the closest pair is used). */
static uint64_t arrival(struct msghdr *msg)
{
	for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
			struct timespec at;
			uint64_t mono = 0, real = 0, best = UINT64_MAX, at_ns;

			memcpy(&at, CMSG_DATA(c), sizeof(at));
			for (int i = 0; i < 4 && best > 20000; i++) {
				uint64_t r0 = realtime_ns(), m = fl_mig_now(), r1 = realtime_ns();

				if (r1 >= r0 && r1 - r0 < best) {
					best = r1 - r0;
					mono = m;
					real = r0 + (r1 - r0) / 2;
				}
			}
			if (best == UINT64_MAX)
				return fl_mig_now(); /* the realtime clock stepped back meanwhile */
			at_ns = (uint64_t)at.tv_sec * 1000000000ULL + (uint64_t)at.tv_nsec;
			if (real >= at_ns && real - at_ns < mono)
				return mono - (real - at_ns);
			return mono;
		}
	}
	return fl_mig_now();
}

int fl_mig_recv_stamped(struct fl_mig_link *l, void *buf, size_t len, uint64_t *at)
{
	uint8_t *p = buf;
	int first = 1;

	while (len) {
		union {
			struct cmsghdr align;
			char buf[CMSG_SPACE(sizeof(struct timespec))];
		} control;
		struct iovec iov = {p, len};
		struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
				     .msg_controllen = sizeof(control.buf)};
		ssize_t r = recvmsg(l->fd, &msg, 0);
		if (r == 0)
			return -ECONNRESET;
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				return -errno;
			int rc = fl_mig_wait(l, POLLIN);
			if (rc < 0)
				return rc;
			continue;
		}
		if (first)
			*at = arrival(&msg);
		first = 0;
		p += r;
		len -= (size_t)r;
	}
	return 0;
}

int fl_mig_send_record(struct fl_mig_link *l, uint32_t type, const void *payload, uint64_t len)
{
	struct fl_mig_record_header h = {.type = type, .length = len};
	struct iovec iov[2] = {{&h, sizeof(h)}, {(void *)payload, len}};

	return fl_mig_sendv(l, iov, len ? 2 : 1);
}

const char *fl_mig_why(int rc)
{
	switch (-rc) {
	case ECANCELED:
		return "cancelled";
	case ETIMEDOUT:
		return "timed out";
	case ECONNRESET:
		return "the peer closed the connection";
	default:
		return strerror(-rc);
	}
}

int fl_mig_nonblocking(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	return 0;
}

uint64_t fl_mig_popcount(const uint64_t *bm, uint64_t words)
{
	uint64_t n = 0;

	for (uint64_t w = 0; w < words; w++)
		n += (uint64_t)__builtin_popcountll(bm[w]);
	return n;
}

/* All of RAM's checksum (debug), the same on both sides whatever their RAM's backing: pages
 * that cannot hold data count as zero pages without being read (reading them would
 * allocate them). */
int fl_mig_vm_ram_sum(struct fl_vm *vm, uint64_t *sum, char *err, size_t errlen)
{
	uint64_t npages = vm->mem.size / PAGE, words = (npages + 63) / 64;
	uint64_t *map = calloc(words, 8);
	static const uint64_t zero_page[PAGE / 8];
	uint64_t zero = fl_mig_page_sum(zero_page), h;
	int rc;

	if (!map)
		return -ENOMEM;
	rc = fl_snap_data_map(vm, map, err, errlen);
	if (rc == 0) {
		h = fl_mig_ram_sum(NULL, 0);
		for (uint64_t i = 0; i < npages; i++) {
			uint64_t p = map[i / 64] >> (i % 64) & 1
					     ? fl_mig_page_sum(vm->mem.host + i * PAGE)
					     : zero;
			h = fl_mig_sum_step(h, p);
		}
		*sum = h;
	}
	free(map);
	return rc;
}

static void mark_chunks(uint64_t *bm, uint64_t from, uint64_t to)
{
	for (uint64_t c = from / FL_MIG_CHUNK; c < (to + FL_MIG_CHUNK - 1) / FL_MIG_CHUNK; c++)
		bm[c / 64] |= 1ULL << (c % 64);
}

int fl_mig_disk_data_map(int fd, uint64_t size, uint64_t *bm)
{
	uint64_t at = 0;

	while (at < size) {
		off_t data = lseek(fd, (off_t)at, SEEK_DATA), hole;
		if (data < 0 && errno == ENXIO)
			return 0; /* only holes from here */
		if (data < 0) {
			mark_chunks(bm, at, size); /* the file system cannot say: all may be data */
			return 0;
		}
		hole = lseek(fd, data, SEEK_HOLE);
		if (hole < 0 || (uint64_t)hole > size)
			hole = (off_t)size;
		if ((uint64_t)data >= size)
			return 0;
		mark_chunks(bm, (uint64_t)data, (uint64_t)hole);
		at = (uint64_t)hole;
	}
	return 0;
}

int fl_mig_disk_sum(int fd, uint64_t size, uint64_t *sum)
{
	uint64_t chunks = (size + FL_MIG_CHUNK - 1) / FL_MIG_CHUNK, words = (chunks + 63) / 64;
	uint64_t *map = calloc(words + 1, 8), h = K_DISK;
	uint8_t *buf = malloc(FL_MIG_CHUNK);
	static const uint8_t zero[FL_MIG_CHUNK];
	int rc = 0;

	if (!map || !buf) {
		rc = -ENOMEM;
		goto out;
	}
	fl_mig_disk_data_map(fd, size, map);
	for (uint64_t c = 0; c < chunks; c++) {
		uint64_t off = c * FL_MIG_CHUNK, len = size - off < FL_MIG_CHUNK ? size - off
									       : FL_MIG_CHUNK;
		const uint8_t *data = zero;
		if (map[c / 64] >> (c % 64) & 1) {
			for (uint64_t got = 0; got < len;) {
				ssize_t r = pread(fd, buf + got, len - got, (off_t)(off + got));
				if (r < 0 && errno == EINTR)
					continue;
				if (r <= 0) {
					rc = r < 0 ? -errno : -EIO;
					goto out;
				}
				got += (uint64_t)r;
			}
			data = buf;
		}
		h = fl_mig_sum_step(h, fl_mig_data_sum(data, len));
	}
	*sum = h;
out:
	free(map);
	free(buf);
	return rc;
}

/* Sends the reason and lingers a moment, reading and dropping what the peer still sends,
 * so closing does not reset the connection before the peer has read why. */
void fl_mig_refuse_peer(struct fl_mig_link *l, const char *why)
{
	struct fl_mig_link quick = {.fd = l->fd, .m = l->m, .deadline = fl_mig_now() + 100000000ULL};
	size_t n = strnlen(why, FL_MIG_MAX_ERROR);
	uint8_t sink[4096];

	if (fl_mig_send_record(&quick, FL_MIG_ERROR, why, n) < 0)
		return;
	shutdown(l->fd, SHUT_WR);
	while (fl_mig_recv(&quick, sink, 1) == 0) /* until EOF or 100 ms */
		if (read(l->fd, sink, sizeof(sink)) == 0)
			break;
}

int fl_migrate_refuse(int fd, const char *why)
{
	struct fl_migration m = {.err = {0}};
	struct fl_mig_link l = {.fd = fd, .m = &m, .deadline = fl_mig_now() + 50000000ULL};
	size_t n = strnlen(why, FL_MIG_MAX_ERROR);

	if (fl_mig_nonblocking(fd) < 0)
		return -errno;
	(void)n;
	fl_mig_refuse_peer(&l, why);
	return 0;
}

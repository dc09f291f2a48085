/*
 * Between the live-migration engine's files: migrate_link.c (the control handle, the socket,
 * the debug RAM checksum), migrate_source.c and migrate_target.c.
 */
#ifndef FL_MIGRATE_LINK_H
#define FL_MIGRATE_LINK_H

#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>

#include "include/flotilla.h"
#include "migrate.h"

struct fl_vm;

struct fl_migration {
	pthread_mutex_t lock;
	struct fl_migrate_progress progress; /* under lock */
	uint64_t budget_ns;		     /* atomic */
	uint64_t bandwidth;		     /* atomic; 0: no cap */
	int cancel;			     /* atomic */
	int start_paused;		     /* atomic; target: loaded, not started, on the commit */
	uint32_t copy_disks;		     /* atomic; source: bit i, disk i is copied */
	char err[256];
};

/* A connected, non-blocking socket; every wait on it checks cancel and the deadline. */
struct fl_mig_link {
	int fd;
	struct fl_migration *m;
	uint64_t deadline; /* CLOCK_MONOTONIC ns */
	int cancellable;
};

uint64_t fl_mig_now(void);
/* t0 + timeout_ns, saturating: a huge timeout means none, not a deadline in the past. */
uint64_t fl_mig_deadline(uint64_t t0, uint64_t timeout_ns);
/* Sets m's error string; returns -e. */
int fl_mig_fail(struct fl_migration *m, int e, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
int fl_mig_nonblocking(int fd);
/* -ECANCELED (cancelled, while cancellable), -ETIMEDOUT (past the deadline), else 0. Every
 * wait checks it; so must every loop that may never wait, each batch or round: a peer that
 * keeps up never fills (or empties) the socket, a pre-copy round may have nothing to send. */
int fl_mig_check(const struct fl_mig_link *l);
/* 0, -ECANCELED, -ETIMEDOUT, -ECONNRESET (peer closed) or -errno. */
int fl_mig_wait(struct fl_mig_link *l, short events);
int fl_mig_sendv(struct fl_mig_link *l, struct iovec *iov, int n);
int fl_mig_recv(struct fl_mig_link *l, void *buf, size_t len);
/* Sends len bytes of file fd from off straight from the page cache (sendfile); bytes past
 * the file's end (it shrank meanwhile) go as zeros, so exactly len bytes are sent. */
int fl_mig_sendfile(struct fl_mig_link *l, int fd, uint64_t off, uint64_t len);
/* fl_mig_recv that also says when the first of those bytes reached this host's kernel (with
 * SO_TIMESTAMPNS on the socket; else when they were read), on CLOCK_MONOTONIC: a busy
 * target's scheduling delay does not shorten the pause it measures. */
int fl_mig_recv_stamped(struct fl_mig_link *l, void *buf, size_t len, uint64_t *at);
int fl_mig_send_record(struct fl_mig_link *l, uint32_t type, const void *payload, uint64_t len);
const char *fl_mig_why(int rc);
/* Sends an ERROR with why, then lingers briefly so closing does not reset it unread. */
void fl_mig_refuse_peer(struct fl_mig_link *l, const char *why);
uint64_t fl_mig_popcount(const uint64_t *bm, uint64_t words);
/* All RAM's checksum (debug mode), the same on both sides whatever backs their RAM. */
int fl_mig_vm_ram_sum(struct fl_vm *vm, uint64_t *sum, char *err, size_t errlen);
/* A disk file's checksum (debug mode): fl_mig_data_sum of each FL_MIG_CHUNK chained, a
 * chunk that is a hole counted as zeros without being read: the same on both sides
 * whatever their holes. */
int fl_mig_disk_sum(int fd, uint64_t size, uint64_t *sum);
/* Marks in bm (one bit per FL_MIG_CHUNK) every chunk of the file that may hold data
 * (SEEK_DATA/SEEK_HOLE; all of it where the file system cannot say). */
int fl_mig_disk_data_map(int fd, uint64_t size, uint64_t *bm);

#endif

/*
 * Live pre-copy migration of a machine over a connected socket (docs/migration.md). The
 * source streams RAM while the guest runs, using the snapshot code's dirty log (KVM plus
 * what the devices wrote), re-sends what was dirtied until the predicted pause fits the
 * budget (throttling the vCPUs when it does not converge), then pauses, sends the last pages
 * and the state in the snapshot format, and commits once the target has loaded everything.
 * The stream's format and checks are in migrate.h / migrate_stream.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

#include "migrate.h"
#include "vmm.h"

#define PAGE FL_MIG_PAGE
#define SLICE_NS 10000000ULL	   /* auto-converge's time slice */
#define POLL_MS 20		   /* how often a blocked send or receive checks cancel */
#define COMMIT_GRACE_NS 10000000000ULL /* after the commit: how long to wait for RESUMED */
#define FIXED_OTHER_NS 500000ULL	   /* vCPU state out and in, beyond what is measured */
#define MIN_SAMPLE (1ULL << 20)	   /* bytes an iteration sends to measure bandwidth */

struct fl_migration {
	pthread_mutex_t lock;
	struct fl_migrate_progress progress;
	uint64_t budget_ns; /* atomic */
	uint64_t bandwidth; /* atomic; 0: no cap */
	int cancel;	    /* atomic */
	char err[256];
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
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

static int mfail(struct fl_migration *m, int e, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int mfail(struct fl_migration *m, int e, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(m->err, sizeof(m->err), fmt, ap);
	va_end(ap);
	return -e;
}

/* ---- the socket: every wait checks cancel and the deadline ---- */

struct link {
	int fd;
	struct fl_migration *m;
	uint64_t deadline;
	int cancellable;
};

static int link_wait(struct link *l, short events)
{
	for (;;) {
		struct pollfd p = {.fd = l->fd, .events = events};
		int n;

		if (l->cancellable && __atomic_load_n(&l->m->cancel, __ATOMIC_SEQ_CST))
			return -ECANCELED;
		if (now_ns() >= l->deadline)
			return -ETIMEDOUT;
		n = poll(&p, 1, POLL_MS);
		if (n < 0 && errno != EINTR)
			return -errno;
		if (n > 0)
			return 0;
	}
}

static int link_sendv(struct link *l, struct iovec *iov, int n)
{
	while (n > 0) {
		struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
		ssize_t w = sendmsg(l->fd, &msg, MSG_NOSIGNAL); /* a closed peer is an error, not a signal */
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				return -errno;
			int rc = link_wait(l, POLLOUT);
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

static int link_recv(struct link *l, void *buf, size_t len)
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
			int rc = link_wait(l, POLLIN);
			if (rc < 0)
				return rc;
			continue;
		}
		p += r;
		len -= (size_t)r;
	}
	return 0;
}

static int send_record(struct link *l, uint32_t type, const void *payload, uint64_t len)
{
	struct fl_mig_record_header h = {.type = type, .length = len};
	struct iovec iov[2] = {{&h, sizeof(h)}, {(void *)payload, len}};

	return link_sendv(l, iov, len ? 2 : 1);
}

static const char *link_why(int rc)
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

static int set_nonblocking(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	return 0;
}

/* ---- auto-converge: the vCPUs sleep a share of each slice ---- */

struct throttle {
	struct fl_vm *vm;
	pthread_t thread;
	int started;
	int stop_fd; /* eventfd-like pipe: readable once stop is asked */
	int wake[2];
	uint32_t pct; /* atomic */
	uint32_t max_pct;
};

static int nap(struct throttle *t, uint64_t ns)
{
	struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ULL),
			      .tv_nsec = (long)(ns % 1000000000ULL)};
	struct pollfd p = {.fd = t->wake[0], .events = POLLIN};

	return ppoll(&p, 1, &ts, NULL) > 0; /* 1: asked to stop */
}

static void *throttle_thread(void *arg)
{
	struct throttle *t = arg;
	sigset_t set;

	sigfillset(&set);
	pthread_sigmask(SIG_SETMASK, &set, NULL);
	for (;;) {
		uint32_t pct = __atomic_load_n(&t->pct, __ATOMIC_RELAXED);
		if (nap(t, pct ? SLICE_NS * (100 - pct) / 100 : SLICE_NS))
			break;
		if (!pct)
			continue;
		fl_vcpus_request(t->vm, FL_REQ_PAUSE, 1);
		int stop = nap(t, SLICE_NS * pct / 100);
		fl_vcpus_request(t->vm, FL_REQ_RUN, 0);
		if (stop)
			break;
	}
	return NULL;
}

static int throttle_start(struct throttle *t, struct fl_vm *vm)
{
	memset(t, 0, sizeof(*t));
	t->vm = vm;
	if (pipe2(t->wake, O_CLOEXEC) < 0)
		return -errno;
	if (pthread_create(&t->thread, NULL, throttle_thread, t) != 0) {
		close(t->wake[0]);
		close(t->wake[1]);
		return -EAGAIN;
	}
	t->started = 1;
	return 0;
}

/* Ends the throttling with every vCPU asked to run again. */
static void throttle_stop(struct throttle *t)
{
	if (!t->started)
		return;
	if (write(t->wake[1], "x", 1) < 0) {
		/* a pipe with room: cannot fail */
	}
	pthread_join(t->thread, NULL);
	close(t->wake[0]);
	close(t->wake[1]);
	t->started = 0;
}

static void throttle_set(struct throttle *t, uint32_t pct)
{
	__atomic_store_n(&t->pct, pct, __ATOMIC_RELAXED);
	if (pct > t->max_pct)
		t->max_pct = pct;
}

static uint64_t popcount(const uint64_t *bm, uint64_t words)
{
	uint64_t n = 0;

	for (uint64_t w = 0; w < words; w++)
		n += (uint64_t)__builtin_popcountll(bm[w]);
	return n;
}

/* All of RAM's checksum (debug), the same on both sides whatever their RAM's backing: pages
 * that cannot hold data count as zero pages without being read (reading them would
 * allocate them). */
static int ram_sum(struct fl_vm *vm, uint64_t *sum, char *err, size_t errlen)
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

/* ---- source ---- */

struct source {
	struct fl_vm *vm;
	struct fl_migration *m;
	struct link l;
	int debug;
	uint64_t npages, words;
	uint8_t *ram;
	uint64_t *dirty; /* collected from the log, to send next */
	uint64_t *work;	 /* being sent */
	uint64_t bytes, pages, zero_pages;
	uint64_t cap_t0, cap_bytes, cap_wait_ns;
	uint8_t *bounce; /* debug: pages copied so their checksum matches what is sent */
	uint64_t sums[FL_MIG_MAX_BATCH];
	uint64_t last_progress;
};

static void progress_update(struct source *s, uint32_t phase, uint64_t t0)
{
	struct fl_migrate_progress *p = &s->m->progress;

	pthread_mutex_lock(&s->m->lock);
	if (phase)
		p->phase = phase;
	p->bytes_sent = s->bytes;
	p->pages_sent = s->pages;
	p->zero_pages = s->zero_pages;
	p->elapsed_ns = now_ns() - t0;
	pthread_mutex_unlock(&s->m->lock);
}

/* Waits as long as the bandwidth cap asks before sending `bytes` more. */
static int cap_wait(struct source *s, uint64_t bytes)
{
	uint64_t cap = __atomic_load_n(&s->m->bandwidth, __ATOMIC_RELAXED);

	if (!cap) {
		s->cap_t0 = 0;
		return 0;
	}
	if (!s->cap_t0) {
		s->cap_t0 = now_ns();
		s->cap_bytes = 0;
	}
	s->cap_bytes += bytes;
	for (;;) {
		uint64_t due = s->cap_t0 + (uint64_t)((double)s->cap_bytes * 1e9 / (double)cap);
		uint64_t now = now_ns();
		if (now >= due)
			return 0;
		if (__atomic_load_n(&s->m->cancel, __ATOMIC_SEQ_CST))
			return -ECANCELED;
		if (now >= s->l.deadline)
			return -ETIMEDOUT;
		uint64_t ns = due - now < 20000000ULL ? due - now : 20000000ULL;
		struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)ns};
		nanosleep(&ts, NULL);
		s->cap_wait_ns += now_ns() - now;
		/* A changed cap applies from here on, not to what was sent before. */
		uint64_t c = __atomic_load_n(&s->m->bandwidth, __ATOMIC_RELAXED);
		if (c != cap) {
			s->cap_t0 = 0;
			return cap_wait(s, 0);
		}
	}
}

static int send_zero(struct source *s, uint64_t first, uint64_t count)
{
	struct fl_mig_pages p = {.first = first, .count = (uint32_t)count};

	s->zero_pages += count;
	s->bytes += sizeof(struct fl_mig_record_header) + sizeof(p);
	return send_record(&s->l, FL_MIG_ZERO, &p, sizeof(p));
}

static int send_pages(struct source *s, uint64_t first, uint64_t count, int capped)
{
	struct fl_mig_pages p = {.first = first, .count = (uint32_t)count};
	uint64_t data = count * PAGE, sums = s->debug ? count * 8 : 0;
	struct fl_mig_record_header h = {.type = FL_MIG_PAGES, .length = sizeof(p) + sums + data};
	struct iovec iov[4] = {{&h, sizeof(h)}, {&p, sizeof(p)}};
	int n = 2, rc;

	if (capped) {
		rc = cap_wait(s, sizeof(h) + h.length);
		if (rc < 0)
			return rc;
	}
	if (s->debug) {
		/* The guest may write the page between summing and sending: send the copy. */
		memcpy(s->bounce, s->ram + first * PAGE, data);
		for (uint64_t i = 0; i < count; i++)
			s->sums[i] = fl_mig_page_sum(s->bounce + i * PAGE);
		iov[n++] = (struct iovec){s->sums, sums};
		iov[n++] = (struct iovec){s->bounce, data};
	} else {
		iov[n++] = (struct iovec){s->ram + first * PAGE, data};
	}
	rc = link_sendv(&s->l, iov, n);
	if (rc == 0) {
		s->bytes += sizeof(h) + h.length;
		s->pages += count;
	}
	return rc;
}

/* Sends pages [first, first+count): runs of data as PAGES records, runs of zero pages as
 * ZERO records (or not at all on the first pass: the target's RAM starts zero). */
static int send_range(struct source *s, uint64_t first, uint64_t count, int first_pass,
		      int capped)
{
	uint64_t end = first + count, run = first;
	int run_zero = -1, rc = 0;

	for (uint64_t page = first; page <= end; page++) {
		int zero = page < end ? fl_snap_page_is_zero(s->ram + page * PAGE) : -1;
		uint64_t len = page - run;

		if (run_zero >= 0 && (zero != run_zero || (!run_zero && len == FL_MIG_MAX_BATCH))) {
			if (run_zero && first_pass)
				s->zero_pages += len;
			else if (run_zero)
				rc = send_zero(s, run, len);
			else
				rc = send_pages(s, run, len, capped);
			if (rc < 0)
				return rc;
			run = page;
		}
		run_zero = zero;
	}
	return 0;
}

static int source_check(struct source *s)
{
	if (fl_vm_state(s->vm) == FL_STATE_STOPPED)
		return mfail(s->m, ESRCH, "the guest stopped during the migration");
	return 0;
}

/* Sends every page set in bm, clearing nothing (the caller owns bm). */
static int send_bitmap(struct source *s, const uint64_t *bm, int first_pass, int capped,
		       uint64_t t0)
{
	uint64_t page = 0;

	while (page < s->npages) {
		uint64_t w = page / 64, bits = bm[w] & (~0ULL << (page % 64)), start;
		while (!bits && ++w < s->words)
			bits = bm[w];
		if (!bits)
			break;
		start = w * 64 + (uint64_t)__builtin_ctzll(bits);
		page = start;
		while (page < s->npages && (bm[page / 64] >> (page % 64) & 1) &&
		       page - start < 4096)
			page++;
		int rc = send_range(s, start, page - start, first_pass, capped);
		if (rc < 0)
			return rc;
		rc = source_check(s);
		if (rc < 0)
			return rc;
		progress_update(s, 0, t0);
	}
	return 0;
}


static int recv_reply(struct source *s, struct fl_mig_record_header *h, void *payload,
		      size_t len)
{
	char text[FL_MIG_MAX_ERROR + 1];
	int rc = link_recv(&s->l, h, sizeof(*h));

	if (rc < 0)
		return rc;
	rc = fl_mig_reply_check(h, s->m->err, sizeof(s->m->err));
	if (rc < 0)
		return rc;
	if (h->type == FL_MIG_ERROR) {
		memset(text, 0, sizeof(text));
		rc = link_recv(&s->l, text, h->length);
		if (rc < 0)
			return rc;
		for (size_t i = 0; i < h->length; i++)
			if (text[i] < 0x20 || text[i] > 0x7e)
				text[i] = '?';
		return mfail(s->m, EREMOTEIO, "the target refused: %s", text);
	}
	if (h->length != len)
		return mfail(s->m, EPROTO, "the target sent record type %u unexpectedly", h->type);
	return link_recv(&s->l, payload, len);
}

static int expect_reply(struct source *s, uint32_t type, void *payload, size_t len)
{
	struct fl_mig_record_header h;
	int rc = recv_reply(s, &h, payload, len);

	if (rc == 0 && h.type != type)
		rc = mfail(s->m, EPROTO, "the target sent record type %u, not %u", h.type, type);
	return rc;
}

struct plan {
	uint64_t rtt_ns, collect_ns, bandwidth; /* bandwidth: bytes/s */
};

static uint64_t predict(const struct plan *pl, uint64_t bytes)
{
	uint64_t bw = pl->bandwidth ? pl->bandwidth : 100ULL << 20;

	return (uint64_t)((double)bytes * 1e9 / (double)bw) + 2 * pl->rtt_ns + pl->collect_ns +
	       FIXED_OTHER_NS;
}

/* Pre-copy until the predicted pause fits the budget; returns the pages left dirty. */
static int precopy(struct source *s, struct throttle *t, struct plan *pl, uint64_t t0,
		   uint32_t *iterations)
{
	uint64_t prev = 0;
	int rc;

	/* The first pass: every page that may hold data (the target's RAM starts zero). */
	rc = fl_snap_data_map(s->vm, s->dirty, s->m->err, sizeof(s->m->err));
	if (rc < 0)
		return rc;
	s->zero_pages = s->npages - popcount(s->dirty, s->words);
	for (uint32_t iter = 1;; iter++) {
		uint64_t *tmp = s->work, t1, t2, tc, sent, busy, n, predicted, budget, wait0;
		int shrinking;

		s->work = s->dirty;
		s->dirty = tmp;
		memset(s->dirty, 0, s->words * 8);
		t1 = now_ns();
		sent = s->bytes;
		wait0 = s->cap_wait_ns;
		rc = send_bitmap(s, s->work, iter == 1, 1, t0);
		if (rc < 0)
			return rc;
		tc = now_ns();
		rc = fl_snap_log_collect(s->vm, s->dirty);
		if (rc < 0)
			return mfail(s->m, -rc, "dirty log: %s", s->vm->err);
		t2 = now_ns();
		pl->collect_ns = t2 - tc;
		sent = s->bytes - sent;
		busy = (tc - t1) - (s->cap_wait_ns - wait0);
		if (sent >= MIN_SAMPLE && busy)
			pl->bandwidth = (uint64_t)((double)sent * 1e9 / (double)busy);
		n = popcount(s->dirty, s->words);
		predicted = predict(pl, n * PAGE);
		budget = __atomic_load_n(&s->m->budget_ns, __ATOMIC_RELAXED);
		*iterations = iter;
		pthread_mutex_lock(&s->m->lock);
		s->m->progress.iteration = iter;
		s->m->progress.remaining_bytes = n * PAGE;
		s->m->progress.dirty_rate = (uint64_t)((double)(n * PAGE) * 1e9 / (double)(t2 - t1));
		s->m->progress.bandwidth = pl->bandwidth;
		s->m->progress.predicted_ns = predicted;
		s->m->progress.throttle_pct = __atomic_load_n(&t->pct, __ATOMIC_RELAXED);
		pthread_mutex_unlock(&s->m->lock);
		progress_update(s, 0, t0);
		shrinking = iter == 1 || n * 4 < prev * 3;
		/* Fits: stop once more rounds stop paying (the dirty set no longer shrinks by a
		 * quarter) or there is next to nothing left. */
		if (predicted <= budget && (n <= 64 || !shrinking)) {
			/* Drain what is still queued before the pause, so the last bytes (and
			 * the PAUSED marker the target times the pause from) go straight through. */
			rc = send_record(&s->l, FL_MIG_SYNC, NULL, 0);
			if (rc == 0)
				rc = expect_reply(s, FL_MIG_SYNCED, NULL, 0);
			return rc;
		}
		/* Does not fit and does not shrink: the guest dirties as fast as we send. */
		if (predicted > budget && !shrinking) {
			uint32_t pct = __atomic_load_n(&t->pct, __ATOMIC_RELAXED);
			throttle_set(t, pct ? (pct + 10 > 99 ? 99 : pct + 10) : 20);
		}
		prev = n;
	}
}

static int stopcopy(struct source *s, struct fl_migrate_result *res, uint64_t t0)
{
	struct fl_snap_writer w;
	struct fl_mig_paused paused;
	struct fl_mig_end end;
	struct fl_mig_ready ready;
	uint8_t id[FL_SNAP_ID_LEN];
	uint64_t before;
	int rc;

	rc = fl_vm_pause_locked(s->vm);
	if (rc < 0)
		return mfail(s->m, -rc, "pausing the source: %s", s->vm->err);
	res->source_pause_ns = paused.source_pause_ns = now_ns();
	progress_update(s, FL_MIGRATE_STOPCOPY, t0);
	rc = send_record(&s->l, FL_MIG_PAUSED, &paused, sizeof(paused));
	if (rc < 0)
		return rc;
	rc = fl_snap_log_collect(s->vm, s->dirty);
	if (rc < 0)
		return mfail(s->m, -rc, "dirty log: %s", s->vm->err);
	before = s->pages + s->zero_pages;
	rc = send_bitmap(s, s->dirty, 0, 0, t0);
	if (rc < 0)
		return rc;
	res->final_pages = s->pages + s->zero_pages - before;
	fl_snap_writer_init(&w);
	if (getrandom(id, sizeof(id), 0) != (ssize_t)sizeof(id))
		memset(id, 0, sizeof(id));
	rc = fl_snap_collect_state(s->vm, &w);
	if (rc == 0 && fl_snap_finish(&w, FL_SNAP_FULL, id, NULL) < 0)
		rc = -ENOMEM;
	if (rc < 0) {
		fl_snap_writer_fini(&w);
		return mfail(s->m, -rc, "collecting the machine state: %s", s->vm->err);
	}
	res->state_bytes = w.len;
	rc = send_record(&s->l, FL_MIG_STATE, w.buf, w.len);
	s->bytes += sizeof(struct fl_mig_record_header) + w.len;
	fl_snap_writer_fini(&w);
	if (rc < 0)
		return rc;
	end.pages = s->pages;
	end.ram_sum = 0;
	if (s->debug && ram_sum(s->vm, &end.ram_sum, s->m->err, sizeof(s->m->err)) < 0)
		return -EIO;
	rc = send_record(&s->l, FL_MIG_END, &end, sizeof(end));
	if (rc < 0)
		return rc;
	rc = expect_reply(s, FL_MIG_READY, &ready, sizeof(ready));
	if (rc < 0)
		return rc;
	res->load_ns = ready.load_ns;
	if (s->debug && ready.ram_sum != end.ram_sum)
		return mfail(s->m, EIO, "the target's RAM differs from the source's (checksum "
					"%016llx, source %016llx)",
			     (unsigned long long)ready.ram_sum, (unsigned long long)end.ram_sum);
	res->ram_sum = end.ram_sum;
	return 0;
}

static int source_setup(struct source *s, const uint8_t *token, uint32_t flags,
			struct plan *pl)
{
	struct fl_mig_hello hello = {.magic = FL_MIG_MAGIC, .version = FL_MIG_VERSION};
	struct fl_snap_config cfg;
	struct fl_mig_ack ack;
	struct iovec iov[1] = {{&hello, sizeof(hello)}};
	uint64_t t = 0;
	int rc;

	hello.flags = s->debug ? FL_MIG_HELLO_DEBUG : 0;
	(void)flags;
	memcpy(hello.token, token, FL_MIG_TOKEN_LEN);
	rc = fl_snap_machine_config(s->vm, &cfg);
	if (rc < 0)
		return mfail(s->m, -rc, "%s", s->vm->err);
	rc = link_sendv(&s->l, iov, 1);
	if (rc == 0) {
		t = now_ns();
		rc = send_record(&s->l, FL_MIG_CONFIG, &cfg, sizeof(cfg));
	}
	/* A refusing target may close before taking it all: read its reason then. */
	if (rc == 0 || rc == -EPIPE || rc == -ECONNRESET)
		rc = expect_reply(s, FL_MIG_ACK, &ack, sizeof(ack));
	if (rc < 0)
		return rc;
	t = now_ns() - t;
	pl->rtt_ns = t > ack.build_ns ? t - ack.build_ns : 0;
	return 0;
}

int fl_migrate_send(struct fl_vm *vm, struct fl_migration *m, int fd, const uint8_t *token,
		    uint32_t flags, uint64_t timeout_ns, struct fl_migrate_result *res)
{
	struct source s;
	struct throttle t = {.started = 0};
	struct plan pl = {0};
	struct fl_mig_resumed resumed;
	uint64_t t0 = now_ns();
	int paused = 0, rc;

	if (!vm || !m || !token || !res || fd < 0)
		return -EINVAL;
	memset(res, 0, sizeof(*res));
	memset(&s, 0, sizeof(s));
	m->err[0] = 0;
	pthread_mutex_lock(&m->lock);
	memset(&m->progress, 0, sizeof(m->progress));
	m->progress.phase = FL_MIGRATE_SETUP;
	pthread_mutex_unlock(&m->lock);
	if (flags & ~(uint32_t)FL_MIGRATE_DEBUG)
		return mfail(m, EINVAL, "unknown migration flags 0x%x", flags);
	pthread_mutex_lock(&vm->api_lock);
	s.vm = vm;
	s.m = m;
	s.debug = !!(flags & FL_MIGRATE_DEBUG);
	s.l = (struct link){.fd = fd, .m = m, .deadline = t0 + timeout_ns, .cancellable = 1};
	if (fl_vm_state(vm) != FL_STATE_RUNNING) {
		rc = mfail(m, EINVAL, "only a running machine migrates live");
		goto out;
	}
	rc = set_nonblocking(fd);
	if (rc < 0) {
		rc = mfail(m, -rc, "the migration socket: %s", strerror(-rc));
		goto out;
	}
	s.ram = vm->mem.host;
	s.npages = vm->mem.size / PAGE;
	s.words = (s.npages + 63) / 64;
	s.dirty = calloc(s.words, 8);
	s.work = calloc(s.words, 8);
	s.bounce = s.debug ? malloc((size_t)FL_MIG_MAX_BATCH * PAGE) : NULL;
	if (!s.dirty || !s.work || (s.debug && !s.bounce)) {
		rc = mfail(m, ENOMEM, "migration bitmaps");
		goto out;
	}
	rc = source_setup(&s, token, flags, &pl);
	if (rc < 0)
		goto failed;
	rc = fl_snap_log_start(vm);
	if (rc < 0) {
		rc = mfail(m, -rc, "dirty logging: %s", vm->err);
		goto failed;
	}
	rc = throttle_start(&t, vm);
	if (rc < 0) {
		rc = mfail(m, -rc, "starting the throttle thread");
		goto failed;
	}
	progress_update(&s, FL_MIGRATE_PRECOPY, t0);
	rc = precopy(&s, &t, &pl, t0, &res->iterations);
	throttle_stop(&t);
	if (rc < 0)
		goto failed;
	paused = 1;
	rc = stopcopy(&s, res, t0);
	if (rc < 0)
		goto failed;

	/* The commit: from here the target owns the guest, whatever happens to this link. */
	res->committed = 1;
	progress_update(&s, FL_MIGRATE_COMMIT, t0);
	s.l.cancellable = 0;
	s.l.deadline = now_ns() + COMMIT_GRACE_NS;
	rc = send_record(&s.l, FL_MIG_COMMIT, NULL, 0);
	if (rc == 0)
		rc = expect_reply(&s, FL_MIG_RESUMED, &resumed, sizeof(resumed));
	if (rc < 0) {
		if (!m->err[0])
			mfail(m, -rc, "commit sent, but no word from the target (%s): the source "
				      "stays paused; resume it only if the target is known dead",
			      link_why(rc));
		goto out;
	}
	res->target_resume_ns = resumed.resume_ns;
	res->downtime_ns = resumed.downtime_ns;
	res->total_ns = now_ns() - t0;
	progress_update(&s, FL_MIGRATE_DONE, t0);
	rc = 0;
	goto out;

failed:
	if (!m->err[0])
		mfail(m, -rc, "migration %s", link_why(rc));
	{
		/* Tell the target why (best effort, without waiting on it). */
		size_t n = strnlen(m->err, FL_MIG_MAX_ERROR);
		struct link quick = {.fd = fd, .m = m, .deadline = now_ns() + 50000000ULL};
		send_record(&quick, FL_MIG_ABORT, m->err, n);
	}
	throttle_stop(&t);
	if (paused && fl_vm_state(vm) == FL_STATE_PAUSED)
		fl_vm_resume_locked(vm);
	pthread_mutex_lock(&m->lock);
	m->progress.phase = FL_MIGRATE_FAILED;
	pthread_mutex_unlock(&m->lock);
out:
	throttle_stop(&t);
	res->bytes_sent = s.bytes;
	res->pages_sent = s.pages;
	res->zero_pages = s.zero_pages;
	res->throttle_pct = t.max_pct;
	if (rc < 0 && !res->committed)
		res->total_ns = now_ns() - t0;
	pthread_mutex_unlock(&vm->api_lock);
	free(s.dirty);
	free(s.work);
	free(s.bounce);
	return rc;
}

/* ---- target ---- */

struct target {
	struct fl_vm *vm;
	struct fl_migration *m;
	struct link l;
	int debug;
	uint64_t npages, pages;
	uint64_t sums[FL_MIG_MAX_BATCH];
	uint64_t marker_ns;
	int built, have_state;
	struct fl_config build;
	struct fl_nic_config nics[FL_MAX_NICS];
};

/* Sends the reason and lingers a moment, reading and dropping what the peer still sends,
 * so closing does not reset the connection before the peer has read why. */
static void refuse(struct link *l, const char *why)
{
	struct link quick = {.fd = l->fd, .m = l->m, .deadline = now_ns() + 100000000ULL};
	size_t n = strnlen(why, FL_MIG_MAX_ERROR);
	uint8_t sink[4096];

	if (send_record(&quick, FL_MIG_ERROR, why, n) < 0)
		return;
	shutdown(l->fd, SHUT_WR);
	for (int i = 0; i < 64; i++) {
		if (link_recv(&quick, sink, 1) < 0)
			break;
		if (read(l->fd, sink, sizeof(sink)) == 0)
			break;
	}
}

static int target_config(struct target *t, const struct fl_config *cfg)
{
	struct fl_mig_record_header h;
	struct fl_snap_config c;
	struct fl_mig_ack ack;
	uint32_t crc = 0;
	uint64_t t0;
	int memfd, rc;

	rc = link_recv(&t->l, &h, sizeof(h));
	if (rc < 0)
		return mfail(t->m, -rc, "reading the machine config: %s", link_why(rc));
	if (h.type != FL_MIG_CONFIG)
		return mfail(t->m, EPROTO, "the stream does not start with the machine config");
	rc = fl_mig_record_check(&h, 0, 0, t->m->err, sizeof(t->m->err));
	if (rc < 0)
		return rc;
	rc = link_recv(&t->l, &c, sizeof(c));
	if (rc < 0)
		return mfail(t->m, -rc, "reading the machine config: %s", link_why(rc));
	rc = fl_snap_check_config(&c, t->m->err, sizeof(t->m->err));
	if (rc < 0)
		return rc;
	if (cfg->nnics > FL_MAX_NICS || (cfg->nnics && !cfg->nics) ||
	    (cfg->ndisks && !cfg->disks))
		return mfail(t->m, EINVAL, "device list missing or too long");
	if (cfg->nnics)
		memcpy(t->nics, cfg->nics, cfg->nnics * sizeof(*t->nics));
	rc = fl_snap_check_machine(t->vm, &c, cfg, t->nics);
	if (rc < 0)
		return mfail(t->m, -rc, "%s", t->vm->err);
	t0 = now_ns();
	memfd = memfd_create("flotilla-ram", MFD_CLOEXEC);
	if (memfd < 0)
		return mfail(t->m, errno, "memfd_create: %s", strerror(errno));
	if (ftruncate(memfd, (off_t)c.mem_size) < 0) {
		close(memfd);
		return mfail(t->m, errno, "sizing guest RAM: %s", strerror(errno));
	}
	t->build = *cfg;
	t->build.kernel_path = NULL;
	t->build.initrd_path = NULL;
	t->build.cmdline = NULL;
	t->build.vcpus = c.nvcpus;
	t->build.memory_mib = c.mem_size / FL_MIB;
	t->build.nics = t->nics;
	/* Built as a restore is (no loader), its RAM a private mapping of an empty memfd. */
	rc = fl_vm_build(t->vm, &t->build, memfd);
	if (rc < 0)
		return mfail(t->m, -rc, "%s", t->vm->err);
	t->built = 1;
	rc = fl_snap_cpuid_crc(t->vm, &crc);
	if (rc < 0)
		return mfail(t->m, -rc, "%s", t->vm->err);
	if (crc != c.cpuid_crc)
		return mfail(t->m, EINVAL, "this host offers the guest other CPU features than the "
					   "source");
	if (t->vm->mem.size != c.mem_size)
		return mfail(t->m, EINVAL, "guest RAM layout differs");
	t->npages = c.mem_size / PAGE;
	ack.build_ns = now_ns() - t0;
	rc = send_record(&t->l, FL_MIG_ACK, &ack, sizeof(ack));
	return rc < 0 ? mfail(t->m, -rc, "sending ACK: %s", link_why(rc)) : 0;
}

static int target_pages(struct target *t, const struct fl_mig_record_header *h)
{
	struct fl_mig_pages p;
	uint8_t *dst;
	int rc = link_recv(&t->l, &p, sizeof(p));

	if (rc < 0)
		return rc;
	rc = fl_mig_pages_check(h, &p, t->npages, t->debug, t->m->err, sizeof(t->m->err));
	if (rc < 0)
		return rc;
	dst = t->vm->mem.host + p.first * PAGE;
	if (h->type == FL_MIG_ZERO) {
		if (p.count >= 16)
			madvise(dst, (size_t)p.count * PAGE, MADV_DONTNEED); /* back to the memfd's zeros */
		else
			memset(dst, 0, (size_t)p.count * PAGE);
		return 0;
	}
	if (t->debug) {
		rc = link_recv(&t->l, t->sums, (size_t)p.count * 8);
		if (rc < 0)
			return rc;
	}
	rc = link_recv(&t->l, dst, (size_t)p.count * PAGE);
	if (rc < 0)
		return rc;
	if (t->debug)
		for (uint32_t i = 0; i < p.count; i++)
			if (fl_mig_page_sum(dst + (uint64_t)i * PAGE) != t->sums[i])
				return mfail(t->m, EIO, "page %llu arrived damaged (checksum)",
					     (unsigned long long)(p.first + i));
	t->pages += p.count;
	return 0;
}

static int target_state(struct target *t, uint64_t len)
{
	struct fl_snap_parsed *p = calloc(1, sizeof(*p));
	uint8_t *buf = malloc(len);
	int rc = -ENOMEM;

	if (!p || !buf) {
		rc = mfail(t->m, ENOMEM, "machine state");
		goto out;
	}
	rc = link_recv(&t->l, buf, len);
	if (rc < 0)
		goto out;
	rc = fl_snap_parse(buf, len, p, t->m->err, sizeof(t->m->err));
	if (rc < 0)
		goto out;
	if (p->config.mem_size != t->vm->mem.size || p->config.nvcpus != t->vm->nvcpus) {
		rc = mfail(t->m, EPROTO, "the state is of another machine than the config said");
		goto out;
	}
	rc = fl_snap_check(t->vm, p, &t->build, t->nics);
	if (rc == 0)
		rc = fl_snap_apply(t->vm, p);
	if (rc < 0)
		mfail(t->m, -rc, "%s", t->vm->err);
out:
	free(buf);
	free(p);
	return rc;
}

/* Records until END; then READY, and COMMIT or ABORT. */
static int target_stream(struct target *t, struct fl_migrate_result *res)
{
	struct fl_mig_record_header h;
	char text[FL_MIG_MAX_ERROR + 1];
	int rc;

	for (;;) {
		rc = link_recv(&t->l, &h, sizeof(h));
		if (rc < 0)
			return rc;
		rc = fl_mig_record_check(&h, t->npages, t->debug, t->m->err, sizeof(t->m->err));
		if (rc < 0)
			return rc;
		switch (h.type) {
		case FL_MIG_PAGES:
		case FL_MIG_ZERO:
			rc = target_pages(t, &h);
			break;
		case FL_MIG_SYNC:
			rc = send_record(&t->l, FL_MIG_SYNCED, NULL, 0);
			break;
		case FL_MIG_PAUSED: {
			struct fl_mig_paused p;
			t->marker_ns = now_ns();
			rc = link_recv(&t->l, &p, sizeof(p));
			res->source_pause_ns = p.source_pause_ns;
			break;
		}
		case FL_MIG_STATE: {
			uint64_t t0 = now_ns();
			if (!t->marker_ns || t->have_state)
				return mfail(t->m, EPROTO, "machine state out of order");
			rc = target_state(t, h.length);
			t->have_state = 1;
			res->load_ns = now_ns() - t0;
			break;
		}
		case FL_MIG_END: {
			struct fl_mig_end e;
			struct fl_mig_ready r = {.load_ns = res->load_ns};
			rc = link_recv(&t->l, &e, sizeof(e));
			if (rc < 0)
				return rc;
			if (!t->have_state)
				return mfail(t->m, EPROTO, "the stream ended without the state");
			if (e.pages != t->pages)
				return mfail(t->m, EPROTO, "%llu pages arrived, the source sent %llu",
					     (unsigned long long)t->pages,
					     (unsigned long long)e.pages);
			if (t->debug) {
				if (ram_sum(t->vm, &r.ram_sum, t->m->err, sizeof(t->m->err)) < 0)
					return -EIO;
				res->ram_sum = r.ram_sum;
				if (r.ram_sum != e.ram_sum) {
					mfail(t->m, EIO, "RAM checksum differs from the source's");
					refuse(&t->l, t->m->err);
					return -EIO;
				}
			}
			rc = send_record(&t->l, FL_MIG_READY, &r, sizeof(r));
			if (rc < 0)
				return rc;
			rc = link_recv(&t->l, &h, sizeof(h));
			if (rc < 0)
				return rc;
			rc = fl_mig_record_check(&h, t->npages, t->debug, t->m->err,
						 sizeof(t->m->err));
			if (rc < 0)
				return rc;
			if (h.type == FL_MIG_COMMIT)
				return 0;
			if (h.type != FL_MIG_ABORT)
				return mfail(t->m, EPROTO, "record %u instead of the commit", h.type);
		}
			__attribute__((fallthrough)); /* ABORT after READY */
		case FL_MIG_ABORT:
			memset(text, 0, sizeof(text));
			rc = link_recv(&t->l, text, h.length);
			if (rc < 0)
				return rc;
			for (size_t i = 0; i < h.length; i++)
				if (text[i] < 0x20 || text[i] > 0x7e)
					text[i] = '?';
			return mfail(t->m, ECANCELED, "the source gave up: %s", text);
		default:
			return mfail(t->m, EPROTO, "record type %u out of place", h.type);
		}
		if (rc < 0)
			return rc;
	}
}

int fl_migrate_receive(struct fl_vm *vm, struct fl_migration *m, const struct fl_config *cfg,
		       int fd, const uint8_t *token, uint64_t timeout_ns,
		       struct fl_migrate_result *res)
{
	struct target *t;
	struct fl_mig_hello hello;
	struct fl_mig_resumed resumed;
	uint64_t t0 = now_ns();
	int rc;

	if (!vm || !m || !cfg || !token || !res || fd < 0)
		return -EINVAL;
	memset(res, 0, sizeof(*res));
	m->err[0] = 0;
	t = calloc(1, sizeof(*t));
	if (!t)
		return mfail(m, ENOMEM, "migration target");
	t->vm = vm;
	t->m = m;
	t->l = (struct link){.fd = fd, .m = m, .deadline = t0 + timeout_ns, .cancellable = 1};
	pthread_mutex_lock(&vm->api_lock);
	if (vm->state != FL_STATE_NEW) {
		rc = mfail(m, EBUSY, "a migration is received into a new machine only");
		goto out;
	}
	rc = set_nonblocking(fd);
	if (rc < 0) {
		rc = mfail(m, -rc, "the migration socket: %s", strerror(-rc));
		goto out;
	}
	/* The hello and its token before anything else the peer sends. */
	rc = link_recv(&t->l, &hello, sizeof(hello));
	if (rc < 0) {
		rc = mfail(m, -rc, "reading the hello: %s", link_why(rc));
		goto out;
	}
	rc = fl_mig_hello_check(&hello, token, m->err, sizeof(m->err));
	if (rc < 0) {
		refuse(&t->l, m->err);
		goto out;
	}
	res->token_accepted = 1;
	t->debug = !!(hello.flags & FL_MIG_HELLO_DEBUG);
	rc = target_config(t, cfg);
	if (rc < 0) {
		refuse(&t->l, m->err);
		goto out;
	}
	rc = target_stream(t, res);
	if (rc < 0) {
		if (!m->err[0])
			mfail(m, -rc, "migration stream: %s", link_why(rc));
		refuse(&t->l, m->err);
		goto out;
	}
	/* Committed: run. vCPUs start on the state loaded above. */
	pthread_mutex_unlock(&vm->api_lock);
	rc = fl_vm_start(vm);
	pthread_mutex_lock(&vm->api_lock);
	if (rc < 0) {
		mfail(m, -rc, "starting the migrated guest: %s", vm->err);
		goto out;
	}
	res->target_resume_ns = resumed.resume_ns = now_ns();
	res->downtime_ns = resumed.downtime_ns = resumed.resume_ns - t->marker_ns;
	res->committed = 1;
	res->pages_sent = t->pages;
	res->vcpus = vm->nvcpus;
	res->memory_mib = vm->mem.size / FL_MIB;
	for (uint32_t i = 0; i < t->build.nnics && i < 4; i++)
		memcpy(res->macs[i], t->nics[i].mac, 6);
	/* The guest runs here now; a lost RESUMED only leaves the source in doubt. */
	t->l.cancellable = 0;
	t->l.deadline = now_ns() + 1000000000ULL;
	send_record(&t->l, FL_MIG_RESUMED, &resumed, sizeof(resumed));
	res->total_ns = now_ns() - t0;
	rc = 0;
out:
	if (rc < 0 && t->built) {
		char why[sizeof(vm->err)];
		memcpy(why, vm->err, sizeof(why));
		fl_vm_unbuild(vm);
		memcpy(vm->err, why, sizeof(why));
	}
	pthread_mutex_unlock(&vm->api_lock);
	free(t);
	return rc;
}

int fl_migrate_refuse(int fd, const char *why)
{
	struct fl_migration m = {.err = {0}};
	struct link l = {.fd = fd, .m = &m, .deadline = now_ns() + 50000000ULL};
	size_t n = strnlen(why, FL_MIG_MAX_ERROR);

	if (set_nonblocking(fd) < 0)
		return -errno;
	(void)n;
	refuse(&l, why);
	return 0;
}

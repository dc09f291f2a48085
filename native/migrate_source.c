/*
 * The source of a live migration (docs/migration.md): streams RAM while the guest runs,
 * using the snapshot code's dirty log (KVM plus what the devices wrote), re-sends what was
 * dirtied until the predicted pause fits the budget (throttling the vCPUs when it does not
 * converge), then pauses, sends the last pages and the state in the snapshot format, and
 * commits once the target has loaded everything.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "migrate_blockcopy.h"
#include "migrate_link.h"
#include "virtio/blk.h"
#include "vmm.h"

#define PAGE FL_MIG_PAGE
#define SLICE_NS 10000000ULL		   /* auto-converge's time slice */
#define COMMIT_GRACE_NS 10000000000ULL /* after the commit: how long to wait for RESUMED */
#define RELOCK_NS 5000000000ULL /* a rollback: how long the target may take to let go */
#define FIXED_OTHER_NS 500000ULL	   /* vCPU state out and in, beyond what is measured */
#define EXTRA_ROUNDS 3		   /* throttled rounds to bring a pause that fits down */
#define EXTRA_PCT 50		   /* an extra round's throttle, +20 a round */
#define GOAL_NS 2000000ULL	   /* a pause this short ends pre-copy, whatever the budget */
#define MIN_SAMPLE (1ULL << 20)	   /* bytes an iteration sends to measure bandwidth */
#define RECOLLECT_BYTES (4ULL << 20) /* sent between a round's looks at the dirty log */

/* ---- auto-converge: the vCPUs sleep a share of each slice ---- */

struct throttle {
	struct fl_vm *vm;
	pthread_t thread;
	int started;
	int wake[2];
	uint32_t pct; /* atomic */
	uint32_t max_pct;
};

enum { NAPPED, NAP_STOP, NAP_CHANGED };

/* Sleeps `ns` unless woken: NAP_STOP when the throttle ends, NAP_CHANGED when its share
 * changed (throttle_set). */
static int nap(struct throttle *t, uint64_t ns)
{
	struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ULL),
			      .tv_nsec = (long)(ns % 1000000000ULL)};
	struct pollfd p = {.fd = t->wake[0], .events = POLLIN};
	char why[16];
	ssize_t n;

	if (ppoll(&p, 1, &ts, NULL) <= 0)
		return NAPPED;
	n = read(t->wake[0], why, sizeof(why));
	return n > 0 && memchr(why, 'x', (size_t)n) ? NAP_STOP : NAP_CHANGED;
}

/* Each slice the vCPUs sleep their share first, then run: a share set (or raised) takes
 * effect at once, not after the slice under way. */
static void *throttle_thread(void *arg)
{
	struct throttle *t = arg;
	sigset_t set;

	sigfillset(&set);
	pthread_sigmask(SIG_SETMASK, &set, NULL);
	for (;;) {
		uint32_t pct = __atomic_load_n(&t->pct, __ATOMIC_RELAXED);
		int r;

		if (!pct) {
			if (nap(t, SLICE_NS) == NAP_STOP)
				break;
			continue;
		}
		fl_vcpus_request(t->vm, FL_REQ_PAUSE, 1);
		r = nap(t, SLICE_NS * pct / 100);
		fl_vcpus_request(t->vm, FL_REQ_RUN, 0);
		if (r == NAP_CHANGED)
			continue; /* a new share: a new slice, its sleep first */
		if (r != NAP_STOP)
			r = nap(t, SLICE_NS * (100 - pct) / 100);
		if (r == NAP_STOP)
			break;
	}
	return NULL;
}

static int throttle_start(struct throttle *t, struct fl_vm *vm)
{
	memset(t, 0, sizeof(*t));
	t->vm = vm;
	if (pipe2(t->wake, O_CLOEXEC | O_NONBLOCK) < 0)
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
	if (t->started && write(t->wake[1], "p", 1) < 0) {
		/* a full pipe already wakes the thread */
	}
}

/* Throttles the vCPUs `first` %, or `step` % more than now once at or past it (at most 99). */
static void throttle_ramp(struct throttle *t, uint32_t first, uint32_t step)
{
	uint32_t pct = __atomic_load_n(&t->pct, __ATOMIC_RELAXED);
	uint32_t next = pct < first ? first : pct + step;

	throttle_set(t, next > 99 ? 99 : next);
}


struct source {
	struct fl_vm *vm;
	struct fl_migration *m;
	struct fl_mig_link l;
	int debug;
	int was_paused;	  /* the machine was paused before: it stays so, and is never resumed */
	int no_throttle;  /* auto-converge off: the vCPUs are never throttled */
	uint32_t version; /* the stream's: FL_MIG_VERSION, or 1 for a target of an older release */
	uint64_t npages, words;
	uint8_t *ram;
	uint64_t *dirty; /* collected from the log, to send next */
	uint64_t *work;	 /* being sent */
	uint64_t bytes, pages, zero_pages;
	uint64_t cap_t0, cap_bytes, cap_wait_ns;
	uint8_t *bounce; /* debug: pages copied so their checksum matches what is sent */
	uint64_t sums[FL_MIG_MAX_BATCH];
	uint64_t last_progress;
	struct fl_mig_copy copy; /* the disks copied through the stream */
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
	p->disk_bytes_sent = s->copy.bytes;
	p->elapsed_ns = fl_mig_now() - t0;
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
		s->cap_t0 = fl_mig_now();
		s->cap_bytes = 0;
	}
	s->cap_bytes += bytes;
	for (;;) {
		uint64_t due = s->cap_t0 + (uint64_t)((double)s->cap_bytes * 1e9 / (double)cap);
		uint64_t now = fl_mig_now();
		if (now >= due)
			return 0;
		if (__atomic_load_n(&s->m->cancel, __ATOMIC_SEQ_CST))
			return -ECANCELED;
		if (now >= s->l.deadline)
			return -ETIMEDOUT;
		uint64_t ns = due - now < 20000000ULL ? due - now : 20000000ULL;
		struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)ns};
		nanosleep(&ts, NULL);
		s->cap_wait_ns += fl_mig_now() - now;
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
	return fl_mig_send_record(&s->l, FL_MIG_ZERO, &p, sizeof(p));
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
	rc = fl_mig_sendv(&s->l, iov, n);
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
		return fl_mig_fail(s->m, ESRCH, "the guest stopped during the migration");
	return 0;
}

static int recv_reply(struct source *s, struct fl_mig_record_header *h, void *payload,
		      size_t len);

/* The target says nothing while pages flow unless it gives up: then it sends why (an ERROR
 * record) and closes. Seen between batches, that ends the migration at once, with its
 * reason. */
static int target_spoke(struct source *s)
{
	struct pollfd p = {.fd = s->l.fd, .events = POLLIN};
	struct fl_mig_record_header h;

	if (poll(&p, 1, 0) <= 0)
		return 0;
	return recv_reply(s, &h, NULL, 0) < 0 ? -EREMOTEIO : fl_mig_fail(s->m, EPROTO,
		"the target sent record type %u mid-stream", h.type);
}

/* A pre-copy round's pages not yet sent that the guest wrote again since the round began
 * would be sent twice: every RECOLLECT_BYTES the round collects the dirty log into the next
 * round's set (`s->dirty`, where they stay) and drops them from what is left of this one,
 * from `page` on. A page is never lost: what leaves `bm` is in `s->dirty`, and the pause
 * collects the rest. */
static int recollect(struct source *s, uint64_t *bm, uint64_t page)
{
	int rc = fl_snap_log_collect(s->vm, s->dirty);

	if (rc < 0)
		return fl_mig_fail(s->m, -rc, "dirty log: %s", s->vm->err);
	for (uint64_t w = page / 64; w < s->words; w++)
		bm[w] &= ~s->dirty[w]; /* the bits below `page` are behind the round already */
	return 0;
}

/* Sends every page set in bm; a pre-copy round (`capped`) drops from it the pages written
 * again before it reached them (recollect). */
static int send_bitmap(struct source *s, uint64_t *bm, int first_pass, int capped, uint64_t t0)
{
	uint64_t page = 0, mark = s->bytes;

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
		if (rc == 0)
			rc = target_spoke(s);
		if (rc == 0)
			rc = fl_mig_check(&s->l); /* sends that never wait see no deadline */
		if (rc == 0 && capped && s->bytes - mark >= RECOLLECT_BYTES) {
			mark = s->bytes;
			rc = recollect(s, bm, page);
		}
		if (rc < 0)
			return rc;
		rc = source_check(s);
		if (rc < 0)
			return rc;
		progress_update(s, 0, t0);
	}
	return 0;
}

/* Sends every chunk of the copied disks set in their work bitmaps (dirty: `last`, the ones
 * collected while paused), as BLOCK records of up to FL_MIG_MAX_BLOCK bytes. */
static int send_disks(struct source *s, int last, int capped, uint64_t t0)
{
	for (uint32_t i = 0; i < s->copy.disks.count; i++) {
		struct fl_mig_copy_disk *d = &s->copy.d[i];
		uint64_t chunk = 0, first, count, sum;
		struct fl_mig_block b;

		if (!d->dirty)
			continue;
		while (fl_mig_copy_run(d, last ? d->dirty : d->work, &chunk, &first, &count)) {
			struct fl_mig_record_header h = {.type = FL_MIG_BLOCK};
			struct iovec iov[4];
			int n = 0, rc = 0;
			/* Debug mode reads the bytes to checksum exactly what it sends; otherwise
			 * they go from the page cache to the socket without a copy here. */
			if (s->debug)
				rc = fl_mig_copy_read(&s->copy, i, first, count, &b);
			else
				fl_mig_copy_range(&s->copy, i, first, count, &b);
			if (rc < 0)
				return fl_mig_fail(s->m, -rc, "disk %u: reading it: %s", i,
						   strerror(-rc));
			h.length = sizeof(b) + (s->debug ? 8 : 0) + b.length;
			if (capped) {
				rc = cap_wait(s, sizeof(h) + h.length);
				if (rc < 0)
					return rc;
			}
			iov[n++] = (struct iovec){&h, sizeof(h)};
			iov[n++] = (struct iovec){&b, sizeof(b)};
			if (s->debug) {
				sum = fl_mig_data_sum(s->copy.buf, b.length);
				iov[n++] = (struct iovec){&sum, sizeof(sum)};
				iov[n++] = (struct iovec){s->copy.buf, b.length};
			}
			rc = fl_mig_sendv(&s->l, iov, n);
			if (rc == 0 && !s->debug)
				rc = fl_mig_sendfile(&s->l, d->blk->fd, b.offset, b.length);
			if (rc < 0)
				return rc;
			s->bytes += sizeof(h) + h.length;
			s->copy.bytes += b.length;
			s->copy.chunks += count;
			rc = target_spoke(s);
			if (rc == 0)
				rc = fl_mig_check(&s->l);
			if (rc == 0)
				rc = source_check(s);
			if (rc < 0)
				return rc;
			progress_update(s, 0, t0);
		}
	}
	return 0;
}

static int recv_reply(struct source *s, struct fl_mig_record_header *h, void *payload,
		      size_t len)
{
	char text[FL_MIG_MAX_ERROR + 1];
	int rc = fl_mig_recv(&s->l, h, sizeof(*h));

	if (rc < 0)
		return rc;
	rc = fl_mig_reply_check(h, s->m->err, sizeof(s->m->err));
	if (rc < 0)
		return rc;
	if (h->type == FL_MIG_ERROR) {
		memset(text, 0, sizeof(text));
		rc = fl_mig_recv(&s->l, text, h->length);
		if (rc < 0)
			return rc;
		for (size_t i = 0; i < h->length; i++)
			if (text[i] < 0x20 || text[i] > 0x7e)
				text[i] = '?';
		return fl_mig_fail(s->m, EREMOTEIO, "the target refused: %s", text);
	}
	if (h->length != len)
		return fl_mig_fail(s->m, EPROTO, "the target sent record type %u unexpectedly", h->type);
	return fl_mig_recv(&s->l, payload, len);
}

static int expect_reply(struct source *s, uint32_t type, void *payload, size_t len)
{
	struct fl_mig_record_header h;
	int rc = recv_reply(s, &h, payload, len);

	if (rc == 0 && h.type != type)
		rc = fl_mig_fail(s->m, EPROTO, "the target sent record type %u, not %u", h.type, type);
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
	uint32_t extra = 0;
	int rc;

	/* Bytes, not pages, from here: copied disks' chunks count beside RAM's pages. */

	/* The first pass: every page that may hold data (the target's RAM starts zero). */
	rc = fl_snap_data_map(s->vm, s->dirty, s->m->err, sizeof(s->m->err));
	if (rc < 0)
		return rc;
	s->zero_pages = s->npages - fl_mig_popcount(s->dirty, s->words);
	for (uint32_t iter = 1;; iter++) {
		uint64_t *tmp = s->work, t1, t2, tc, sent, busy, n, predicted, budget, wait0;
		uint64_t disk, dirty;
		int shrinking;

		/* A round may send nothing (the guest dirtied nothing): it never waits on the
		 * socket, where the deadline and cancel are otherwise seen. */
		rc = fl_mig_check(&s->l);
		if (rc < 0)
			return rc;
		s->work = s->dirty;
		s->dirty = tmp;
		memset(s->dirty, 0, s->words * 8);
		fl_mig_copy_next(&s->copy);
		t1 = fl_mig_now();
		sent = s->bytes;
		wait0 = s->cap_wait_ns;
		rc = send_bitmap(s, s->work, iter == 1, 1, t0);
		if (rc == 0)
			rc = send_disks(s, 0, 1, t0);
		if (rc < 0)
			return rc;
		tc = fl_mig_now();
		rc = fl_snap_log_collect(s->vm, s->dirty);
		if (rc < 0)
			return fl_mig_fail(s->m, -rc, "dirty log: %s", s->vm->err);
		disk = fl_mig_copy_collect(&s->copy);
		t2 = fl_mig_now();
		pl->collect_ns = t2 - tc;
		sent = s->bytes - sent;
		busy = (tc - t1) - (s->cap_wait_ns - wait0);
		if (sent >= MIN_SAMPLE && busy)
			pl->bandwidth = (uint64_t)((double)sent * 1e9 / (double)busy);
		n = fl_mig_popcount(s->dirty, s->words);
		dirty = n * PAGE + disk;
		predicted = predict(pl, dirty);
		budget = __atomic_load_n(&s->m->budget_ns, __ATOMIC_RELAXED);
		*iterations = iter;
		pthread_mutex_lock(&s->m->lock);
		s->m->progress.iteration = iter;
		s->m->progress.remaining_bytes = dirty;
		s->m->progress.disk_remaining_bytes = disk;
		s->m->progress.dirty_rate = (uint64_t)((double)dirty * 1e9 / (double)(t2 - t1));
		s->m->progress.bandwidth = pl->bandwidth;
		s->m->progress.predicted_ns = predicted;
		s->m->progress.throttle_pct = __atomic_load_n(&t->pct, __ATOMIC_RELAXED);
		pthread_mutex_unlock(&s->m->lock);
		progress_update(s, 0, t0);
		/* The first pass shrinks what is left unless the guest wrote as much as it sent. */
		shrinking = dirty * 4 < (iter == 1 ? sent : prev) * 3;
		/* Fits: stop at a pause of GOAL_NS or less, or once more rounds stop paying (the
		 * dirty set no longer shrinks by a quarter), or with next to nothing left. A pause
		 * that fits but would take over GOAL_NS (or a quarter of a budget under 4 ×
		 * GOAL_NS) first gets up to EXTRA_ROUNDS more rounds with the vCPUs throttled
		 * (EXTRA_PCT, +20 a round): the budget is a ceiling, not a goal, and a guest that
		 * writes as fast as the stream sends is slowed for a few rounds rather than
		 * paused for a budget's worth. Not with auto-converge off. */
		if (predicted <= budget && predicted <= GOAL_NS) {
			shrinking = 0;
		} else if (predicted <= budget && dirty > 64 * PAGE && !shrinking &&
			   predicted > (budget / 4 < GOAL_NS ? budget / 4 : GOAL_NS) &&
			   extra < EXTRA_ROUNDS && !s->no_throttle) {
			extra++;
			throttle_ramp(t, EXTRA_PCT, 20);
			prev = dirty;
			continue;
		}
		if (predicted <= budget && (dirty <= 64 * PAGE || !shrinking)) {
			/* Drain what is still queued before the pause, so the last bytes (and
			 * the PAUSED marker the target times the pause from) go straight through. */
			rc = fl_mig_send_record(&s->l, FL_MIG_SYNC, NULL, 0);
			if (rc == 0)
				rc = expect_reply(s, FL_MIG_SYNCED, NULL, 0);
			return rc;
		}
		/* Does not fit and does not shrink: the guest dirties as fast as we send. */
		if (predicted > budget && !shrinking && !s->no_throttle)
			throttle_ramp(t, 20, 10);
		prev = dirty;
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

	rc = s->was_paused ? 0 : fl_vm_pause_locked(s->vm);
	if (rc < 0)
		return fl_mig_fail(s->m, -rc, "pausing the source: %s", s->vm->err);
	res->source_pause_ns = paused.source_pause_ns = fl_mig_now();
	progress_update(s, FL_MIGRATE_STOPCOPY, t0);
	rc = fl_mig_send_record(&s->l, FL_MIG_PAUSED, &paused, sizeof(paused));
	if (rc < 0)
		return rc;
	rc = fl_snap_log_collect(s->vm, s->dirty);
	if (rc < 0)
		return fl_mig_fail(s->m, -rc, "dirty log: %s", s->vm->err);
	before = s->pages + s->zero_pages;
	rc = send_bitmap(s, s->dirty, 0, 0, t0);
	if (rc < 0)
		return rc;
	/* The devices are paused: what the disks' tracking holds now is all that is left. */
	fl_mig_copy_collect(&s->copy);
	rc = send_disks(s, 1, 0, t0);
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
		return fl_mig_fail(s->m, -rc, "collecting the machine state: %s", s->vm->err);
	}
	res->state_bytes = w.len;
	rc = fl_mig_send_record(&s->l, FL_MIG_STATE, w.buf, w.len);
	s->bytes += sizeof(struct fl_mig_record_header) + w.len;
	fl_snap_writer_fini(&w);
	if (rc < 0)
		return rc;
	/* Paused, its devices still: flush the disks and let their locks go but for the
	 * hand-off byte, so the target can take the rest before READY and no third process
	 * finds a whole volume free in between. */
	rc = fl_virtio_disks_lock(s->vm, FL_BLK_LOCK_HANDOFF);
	if (rc < 0)
		return fl_mig_fail(s->m, -rc, "handing the disks over: %s", s->vm->err);
	memset(&end, 0, sizeof(end));
	end.pages = s->pages;
	end.disk_bytes = s->copy.bytes;
	if (s->debug && fl_mig_vm_ram_sum(s->vm, &end.ram_sum, s->m->err, sizeof(s->m->err)) < 0)
		return -EIO;
	if (s->debug && s->copy.disks.copy) {
		rc = fl_mig_copy_sums(&s->copy, end.disk_sum);
		if (rc < 0)
			return fl_mig_fail(s->m, -rc, "checksumming the disks: %s", strerror(-rc));
	}
	/* Version 1's END is version 2's first fields. */
	rc = fl_mig_send_record(&s->l, FL_MIG_END, &end,
				s->version < 2 ? sizeof(struct fl_mig_end_v1) : sizeof(end));
	if (rc < 0)
		return rc;
	rc = expect_reply(s, FL_MIG_READY, &ready, sizeof(ready));
	if (rc < 0)
		return rc;
	res->load_ns = ready.load_ns;
	if (s->debug && ready.ram_sum != end.ram_sum)
		return fl_mig_fail(s->m, EIO, "the target's RAM differs from the source's (checksum "
					"%016llx, source %016llx)",
			     (unsigned long long)ready.ram_sum, (unsigned long long)end.ram_sum);
	res->ram_sum = end.ram_sum;
	return 0;
}

/*
 * A failure after the pause: take the disks' locks back (the target discards its machine
 * and lets go of them in a moment), then resume if the guest ran before. If another process
 * holds one, the machine stays paused and the error says so: never two writers.
 */
static void rollback_disks(struct source *s, int resume)
{
	uint64_t until = fl_mig_now() + RELOCK_NS;
	int rc;

	while ((rc = fl_virtio_disks_lock(s->vm, FL_BLK_LOCK_WHOLE)) == -EBUSY &&
	       fl_mig_now() < until)
		usleep(20000);
	if (rc < 0) {
		size_t n = strnlen(s->m->err, sizeof(s->m->err));
		/* (cut to the buffer: the reason comes first) */
		if (snprintf(s->m->err + n, sizeof(s->m->err) - n,
			     "; the source stays paused: taking its disks back: %s", s->vm->err) < 0)
			s->m->err[n] = 0;
		return;
	}
	if (resume)
		fl_vm_resume_locked(s->vm);
}

static int source_setup(struct source *s, const uint8_t *token, struct plan *pl)
{
	struct fl_mig_hello hello = {.magic = FL_MIG_MAGIC, .version = s->version};
	struct fl_snap_config cfg;
	struct fl_mig_ack ack;
	struct iovec iov[1] = {{&hello, sizeof(hello)}};
	uint64_t t = 0;
	int rc;

	hello.flags = s->debug ? FL_MIG_HELLO_DEBUG : 0;
	memcpy(hello.token, token, FL_MIG_TOKEN_LEN);
	rc = fl_snap_machine_config(s->vm, &cfg);
	if (rc < 0)
		return fl_mig_fail(s->m, -rc, "%s", s->vm->err);
	rc = fl_mig_sendv(&s->l, iov, 1);
	if (rc == 0) {
		t = fl_mig_now();
		rc = fl_mig_send_record(&s->l, FL_MIG_CONFIG, &cfg, sizeof(cfg));
	}
	/* Which disks are copied, and every disk's size: the target checks both (a version-1
	 * target knows no DISKS record: its disks are shared storage). */
	if (rc == 0 && s->copy.disks.count && s->version >= 2)
		rc = fl_mig_send_record(&s->l, FL_MIG_DISKS, &s->copy.disks,
					sizeof(s->copy.disks));
	/* A refusing target may close before taking it all: read its reason then. */
	if (rc == 0 || rc == -EPIPE || rc == -ECONNRESET)
		rc = expect_reply(s, FL_MIG_ACK, &ack, sizeof(ack));
	if (rc < 0)
		return rc;
	t = fl_mig_now() - t;
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
	uint64_t t0 = fl_mig_now();
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
	if (flags & ~(uint32_t)(FL_MIGRATE_DEBUG | FL_MIGRATE_NO_THROTTLE | FL_MIGRATE_STREAM_V1))
		return fl_mig_fail(m, EINVAL, "unknown migration flags 0x%x", flags);
	pthread_mutex_lock(&vm->api_lock);
	s.vm = vm;
	s.m = m;
	s.debug = !!(flags & FL_MIGRATE_DEBUG);
	s.no_throttle = !!(flags & FL_MIGRATE_NO_THROTTLE);
	s.version = flags & FL_MIGRATE_STREAM_V1 ? 1 : FL_MIG_VERSION;
	s.l = (struct fl_mig_link){.fd = fd, .m = m, .deadline = fl_mig_deadline(t0, timeout_ns), .cancellable = 1};
	/* A paused machine migrates too (nothing dirties its RAM: one pass), and stays paused. */
	s.was_paused = fl_vm_state(vm) == FL_STATE_PAUSED;
	if (fl_vm_state(vm) != FL_STATE_RUNNING && !s.was_paused) {
		rc = fl_mig_fail(m, EINVAL, "only a running or paused machine migrates");
		goto out;
	}
	rc = fl_mig_nonblocking(fd);
	if (rc < 0) {
		rc = fl_mig_fail(m, -rc, "the migration socket: %s", strerror(-rc));
		goto out;
	}
	s.ram = vm->mem.host;
	s.npages = vm->mem.size / PAGE;
	s.words = (s.npages + 63) / 64;
	s.dirty = calloc(s.words, 8);
	s.work = calloc(s.words, 8);
	s.bounce = s.debug ? malloc((size_t)FL_MIG_MAX_BATCH * PAGE) : NULL;
	if (!s.dirty || !s.work || (s.debug && !s.bounce)) {
		rc = fl_mig_fail(m, ENOMEM, "migration bitmaps");
		goto out;
	}
	rc = fl_mig_copy_init(&s.copy, vm, __atomic_load_n(&m->copy_disks, __ATOMIC_RELAXED),
			      m->err, sizeof(m->err));
	if (rc < 0)
		goto out;
	if (s.version < 2 && s.copy.disks.copy) {
		rc = fl_mig_fail(m, EPROTO,
				 "the target speaks migration stream version 1, which copies no "
				 "disks: upgrade it, or migrate the domain cold");
		goto out;
	}
	rc = source_setup(&s, token, &pl);
	if (rc < 0)
		goto failed;
	rc = fl_snap_log_start(vm);
	if (rc < 0) {
		rc = fl_mig_fail(m, -rc, "dirty logging: %s", vm->err);
		goto failed;
	}
	rc = fl_mig_copy_start(&s.copy, m->err, sizeof(m->err));
	if (rc < 0)
		goto failed;
	/* The throttle lets paused vCPUs run at the end of each nap: never for a paused one. */
	rc = s.was_paused || s.no_throttle ? 0 : throttle_start(&t, vm);
	if (rc < 0) {
		rc = fl_mig_fail(m, -rc, "starting the throttle thread");
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

	/* The commit: from here the target owns the guest, whatever happens to this link. It
	 * holds all of each disk's lock but the hand-off byte, which goes with the COMMIT. */
	fl_virtio_disks_lock(vm, FL_BLK_LOCK_NONE);
	res->committed = 1;
	progress_update(&s, FL_MIGRATE_COMMIT, t0);
	s.l.cancellable = 0;
	s.l.deadline = fl_mig_now() + COMMIT_GRACE_NS;
	rc = fl_mig_send_record(&s.l, FL_MIG_COMMIT, NULL, 0);
	if (rc == 0)
		rc = expect_reply(&s, FL_MIG_RESUMED, &resumed, sizeof(resumed));
	if (rc < 0) {
		if (!m->err[0])
			fl_mig_fail(m, -rc, "commit sent, but no word from the target (%s): the source "
				      "stays paused; resume it only if the target is known dead",
			      fl_mig_why(rc));
		goto out;
	}
	res->target_resume_ns = resumed.resume_ns;
	res->downtime_ns = resumed.downtime_ns;
	res->total_ns = fl_mig_now() - t0;
	progress_update(&s, FL_MIGRATE_DONE, t0);
	rc = 0;
	goto out;

failed:
	if ((rc == -EPIPE || rc == -ECONNRESET) && !m->err[0]) {
		/* The target may have closed after saying why: read it if it is there. */
		struct fl_mig_record_header h;
		s.l.cancellable = 0;
		s.l.deadline = fl_mig_now() + 200000000ULL;
		if (recv_reply(&s, &h, NULL, 0) == -EREMOTEIO)
			rc = -EREMOTEIO;
		else
			m->err[0] = 0;
	}
	if (!m->err[0])
		fl_mig_fail(m, -rc, "migration %s", fl_mig_why(rc));
	{
		/* Tell the target why (best effort, without waiting on it). */
		size_t n = strnlen(m->err, FL_MIG_MAX_ERROR);
		struct fl_mig_link quick = {.fd = fd, .m = m, .deadline = fl_mig_now() + 50000000ULL};
		fl_mig_send_record(&quick, FL_MIG_ABORT, m->err, n);
	}
	throttle_stop(&t);
	if (paused && fl_vm_state(vm) == FL_STATE_PAUSED)
		rollback_disks(&s, paused && !s.was_paused);
	pthread_mutex_lock(&m->lock);
	m->progress.phase = FL_MIGRATE_FAILED;
	pthread_mutex_unlock(&m->lock);
out:
	throttle_stop(&t);
	res->bytes_sent = s.bytes;
	res->pages_sent = s.pages;
	res->zero_pages = s.zero_pages;
	res->throttle_pct = t.max_pct;
	res->disk_bytes = s.copy.bytes;
	res->disk_chunks = s.copy.chunks;
	if (rc < 0 && !res->committed)
		res->total_ns = fl_mig_now() - t0;
	pthread_mutex_unlock(&vm->api_lock);
	free(s.dirty);
	free(s.work);
	free(s.bounce);
	fl_mig_copy_fini(&s.copy);
	return rc;
}

/*
 * The target of a live migration (docs/migration.md): checks the hello and its token before
 * anything else, the machine config before building anything, then every record (migrate.h)
 * as it takes the pages straight into guest RAM and loads the state; runs the guest only on
 * the source's commit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "migrate_blockcopy.h"
#include "migrate_link.h"
#include "virtio/blk.h"
#include "vmm.h"

#define PAGE FL_MIG_PAGE
/* How long a connection may take to present its hello: the listener serves one connection
 * at a time, so a peer that connects and says nothing must not hold it for the whole
 * timeout (the real source sends its hello right after connecting). */
#define HELLO_NS 5000000000ULL

struct target {
	struct fl_vm *vm;
	struct fl_migration *m;
	struct fl_mig_link l;
	int debug;
	uint32_t version; /* the stream's (the hello's) */
	uint64_t npages, pages;
	uint64_t sums[FL_MIG_MAX_BATCH];
	uint64_t marker_ns;
	int built, have_state;
	struct fl_config build;
	struct fl_nic_config nics[FL_MAX_NICS];
	struct fl_mig_copy copy; /* the disks the source copies into ours */
};

/* The DISKS record (after CONFIG when the machine has disks): the two sides agree on each
 * disk's size and on which ones the stream copies; the copies start empty. */
static int target_disks(struct target *t, const struct fl_config *cfg)
{
	struct fl_mig_record_header h;
	struct fl_mig_disks d;
	int rc;

	if (!cfg->ndisks)
		return 0;
	if (t->version < 2) {
		/* A version-1 source sends no DISKS: its disks are shared storage, none copied
		 * (a disk this side was given to copy is refused by the check). */
		memset(&d, 0, sizeof(d));
		while (d.count < FL_MIG_MAX_DISKS && fl_virtio_disk(t->vm, d.count)) {
			d.size[d.count] = fl_virtio_disk(t->vm, d.count)->size;
			d.count++;
		}
		return fl_mig_copy_accept(&t->copy, t->vm, cfg, &d, t->m->err, sizeof(t->m->err));
	}
	rc = fl_mig_recv(&t->l, &h, sizeof(h));
	if (rc < 0)
		return fl_mig_fail(t->m, -rc, "reading the disks: %s", fl_mig_why(rc));
	if (h.type != FL_MIG_DISKS)
		return fl_mig_fail(t->m, EPROTO, "the machine config is not followed by its disks");
	rc = fl_mig_record_check(&h, t->npages, 0, t->version, t->m->err, sizeof(t->m->err));
	if (rc == 0)
		rc = fl_mig_recv(&t->l, &d, sizeof(d));
	if (rc < 0)
		return rc;
	return fl_mig_copy_accept(&t->copy, t->vm, cfg, &d, t->m->err, sizeof(t->m->err));
}

/* A BLOCK record: checked against the disks agreed on, written at its offset. */
static int target_block(struct target *t, const struct fl_mig_record_header *h)
{
	struct fl_mig_block b;
	uint64_t sum = 0;
	int rc = fl_mig_recv(&t->l, &b, sizeof(b));

	if (rc < 0)
		return rc;
	rc = fl_mig_block_check(h, &b, &t->copy.disks, t->debug, t->m->err, sizeof(t->m->err));
	if (rc < 0)
		return rc;
	if (t->debug)
		rc = fl_mig_recv(&t->l, &sum, sizeof(sum));
	if (rc == 0)
		rc = fl_mig_recv(&t->l, t->copy.buf, b.length);
	if (rc < 0)
		return rc;
	if (t->debug && fl_mig_data_sum(t->copy.buf, b.length) != sum)
		return fl_mig_fail(t->m, EIO, "disk %u: block at %llu arrived damaged (checksum)",
				   b.disk, (unsigned long long)b.offset);
	return fl_mig_copy_write(&t->copy, &b, t->m->err, sizeof(t->m->err));
}

/* At END: the copies complete (as many bytes as the source sent), on stable storage, and
 * in debug mode the same as the source's. */
static int target_disks_end(struct target *t, const struct fl_mig_end *e)
{
	uint64_t sums[FL_MIG_MAX_DISKS] = {0};
	int rc;

	if (e->disk_bytes != t->copy.bytes)
		return fl_mig_fail(t->m, EPROTO, "%llu bytes of disk arrived, the source sent %llu",
				   (unsigned long long)t->copy.bytes,
				   (unsigned long long)e->disk_bytes);
	rc = fl_mig_copy_flush(&t->copy, t->m->err, sizeof(t->m->err));
	if (rc < 0 || !t->debug || !t->copy.disks.copy)
		return rc;
	rc = fl_mig_copy_sums(&t->copy, sums);
	if (rc < 0)
		return fl_mig_fail(t->m, -rc, "checksumming the disks: %s", strerror(-rc));
	for (uint32_t i = 0; i < t->copy.disks.count; i++)
		if (sums[i] != e->disk_sum[i])
			return fl_mig_fail(t->m, EIO, "disk %u differs from the source's (checksum)", i);
	return 0;
}

static int target_config(struct target *t, const struct fl_config *cfg)
{
	struct fl_mig_record_header h;
	struct fl_snap_config c;
	struct fl_mig_ack ack;
	uint32_t crc = 0;
	uint64_t t0;
	int memfd, rc;

	rc = fl_mig_recv(&t->l, &h, sizeof(h));
	if (rc < 0)
		return fl_mig_fail(t->m, -rc, "reading the machine config: %s", fl_mig_why(rc));
	if (h.type != FL_MIG_CONFIG)
		return fl_mig_fail(t->m, EPROTO, "the stream does not start with the machine config");
	rc = fl_mig_record_check(&h, 0, 0, t->version, t->m->err, sizeof(t->m->err));
	if (rc < 0)
		return rc;
	rc = fl_mig_recv(&t->l, &c, sizeof(c));
	if (rc < 0)
		return fl_mig_fail(t->m, -rc, "reading the machine config: %s", fl_mig_why(rc));
	rc = fl_snap_check_config(&c, t->m->err, sizeof(t->m->err));
	if (rc < 0)
		return rc;
	if (cfg->nnics > FL_MAX_NICS || (cfg->nnics && !cfg->nics) ||
	    (cfg->ndisks && !cfg->disks))
		return fl_mig_fail(t->m, EINVAL, "device list missing or too long");
	if (cfg->nnics)
		memcpy(t->nics, cfg->nics, cfg->nnics * sizeof(*t->nics));
	rc = fl_snap_check_machine(t->vm, &c, cfg, t->nics);
	if (rc < 0)
		return fl_mig_fail(t->m, -rc, "%s", t->vm->err);
	t0 = fl_mig_now();
	memfd = memfd_create("flotilla-ram", MFD_CLOEXEC);
	if (memfd < 0)
		return fl_mig_fail(t->m, errno, "memfd_create: %s", strerror(errno));
	if (ftruncate(memfd, (off_t)c.mem_size) < 0) {
		close(memfd);
		return fl_mig_fail(t->m, errno, "sizing guest RAM: %s", strerror(errno));
	}
	t->build = *cfg;
	t->build.kernel_path = NULL;
	t->build.initrd_path = NULL;
	t->build.cmdline = NULL;
	t->build.vcpus = c.nvcpus;
	t->build.memory_mib = c.mem_size / FL_MIB;
	t->build.nics = t->nics;
	/* Built as a restore is (no loader), its RAM a private mapping of an empty memfd; its
	 * disks unlocked: the source holds their locks until it is paused (target_stream). */
	t->vm->disks_unlocked = 1;
	rc = fl_vm_build(t->vm, &t->build, memfd);
	t->vm->disks_unlocked = 0;
	if (rc < 0)
		return fl_mig_fail(t->m, -rc, "%s", t->vm->err);
	t->built = 1;
	rc = fl_snap_cpuid_crc(t->vm, &crc);
	if (rc < 0)
		return fl_mig_fail(t->m, -rc, "%s", t->vm->err);
	if (crc != c.cpuid_crc)
		return fl_mig_fail(t->m, EINVAL, "this host offers the guest other CPU features than the "
					   "source");
	if (t->vm->mem.size != c.mem_size)
		return fl_mig_fail(t->m, EINVAL, "guest RAM layout differs");
	t->npages = c.mem_size / PAGE;
	rc = target_disks(t, cfg);
	if (rc < 0)
		return rc;
	ack.build_ns = fl_mig_now() - t0;
	rc = fl_mig_send_record(&t->l, FL_MIG_ACK, &ack, sizeof(ack));
	return rc < 0 ? fl_mig_fail(t->m, -rc, "sending ACK: %s", fl_mig_why(rc)) : 0;
}

static int target_pages(struct target *t, const struct fl_mig_record_header *h)
{
	struct fl_mig_pages p;
	uint8_t *dst;
	int rc = fl_mig_recv(&t->l, &p, sizeof(p));

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
		rc = fl_mig_recv(&t->l, t->sums, (size_t)p.count * 8);
		if (rc < 0)
			return rc;
	}
	rc = fl_mig_recv(&t->l, dst, (size_t)p.count * PAGE);
	if (rc < 0)
		return rc;
	if (t->debug)
		for (uint32_t i = 0; i < p.count; i++)
			if (fl_mig_page_sum(dst + (uint64_t)i * PAGE) != t->sums[i])
				return fl_mig_fail(t->m, EIO, "page %llu arrived damaged (checksum)",
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
		rc = fl_mig_fail(t->m, ENOMEM, "machine state");
		goto out;
	}
	rc = fl_mig_recv(&t->l, buf, len);
	if (rc < 0)
		goto out;
	rc = fl_snap_parse(buf, len, p, t->m->err, sizeof(t->m->err));
	if (rc < 0)
		goto out;
	if (p->config.mem_size != t->vm->mem.size || p->config.nvcpus != t->vm->nvcpus) {
		rc = fl_mig_fail(t->m, EPROTO, "the state is of another machine than the config said");
		goto out;
	}
	rc = fl_snap_check(t->vm, p, &t->build, t->nics);
	if (rc == 0)
		rc = fl_snap_apply(t->vm, p);
	if (rc < 0)
		fl_mig_fail(t->m, -rc, "%s", t->vm->err);
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
	uint64_t arrived;
	int rc;

	for (;;) {
		/* A stream that always has the next record queued never waits for it. */
		rc = fl_mig_check(&t->l);
		if (rc < 0)
			return rc;
		rc = fl_mig_recv_stamped(&t->l, &h, sizeof(h), &arrived);
		if (rc < 0)
			return rc;
		rc = fl_mig_record_check(&h, t->npages, t->debug, t->version, t->m->err,
					 sizeof(t->m->err));
		if (rc < 0)
			return rc;
		switch (h.type) {
		case FL_MIG_PAGES:
		case FL_MIG_ZERO:
			rc = target_pages(t, &h);
			break;
		case FL_MIG_BLOCK:
			rc = target_block(t, &h);
			break;
		case FL_MIG_SYNC:
			/* The source pauses next: flush the copies now, so the flush at END (in
			 * the pause) has only the last chunks left to write. */
			rc = fl_mig_copy_flush(&t->copy, t->m->err, sizeof(t->m->err));
			if (rc == 0)
				rc = fl_mig_send_record(&t->l, FL_MIG_SYNCED, NULL, 0);
			break;
		case FL_MIG_PAUSED: {
			struct fl_mig_paused p;
			t->marker_ns = arrived;
			rc = fl_mig_recv(&t->l, &p, sizeof(p));
			if (rc == 0)
				res->source_pause_ns = p.source_pause_ns;
			break;
		}
		case FL_MIG_STATE: {
			uint64_t t0 = fl_mig_now();
			if (!t->marker_ns || t->have_state)
				return fl_mig_fail(t->m, EPROTO, "machine state out of order");
			rc = target_state(t, h.length);
			t->have_state = 1;
			res->load_ns = fl_mig_now() - t0;
			break;
		}
		case FL_MIG_END: {
			struct fl_mig_end e = {0};
			struct fl_mig_ready r = {.load_ns = res->load_ns};
			/* Version 1's END is version 2's first fields (no disk bytes, no sums). */
			rc = fl_mig_recv(&t->l, &e,
					 t->version < 2 ? sizeof(struct fl_mig_end_v1) : sizeof(e));
			if (rc < 0)
				return rc;
			if (!t->have_state)
				return fl_mig_fail(t->m, EPROTO, "the stream ended without the state");
			if (e.pages != t->pages)
				return fl_mig_fail(t->m, EPROTO, "%llu pages arrived, the source sent %llu",
					     (unsigned long long)t->pages,
					     (unsigned long long)e.pages);
			rc = target_disks_end(t, &e);
			if (rc < 0) {
				fl_mig_refuse_peer(&t->l, t->m->err);
				return rc;
			}
			if (t->debug) {
				if (fl_mig_vm_ram_sum(t->vm, &r.ram_sum, t->m->err, sizeof(t->m->err)) < 0)
					return -EIO;
				res->ram_sum = r.ram_sum;
				if (r.ram_sum != e.ram_sum) {
					fl_mig_fail(t->m, EIO, "RAM checksum differs from the source's");
					fl_mig_refuse_peer(&t->l, t->m->err);
					return -EIO;
				}
			}
			/* The source, paused and flushed, kept only the hand-off byte of each
			 * disk's lock: take the rest (someone else holding it: refused, the
			 * source takes its disks back and runs on). */
			if (fl_virtio_disks_lock(t->vm, FL_BLK_LOCK_REST) < 0) {
				fl_mig_fail(t->m, EBUSY, "%s", t->vm->err);
				fl_mig_refuse_peer(&t->l, t->m->err);
				return -EBUSY;
			}
			rc = fl_mig_send_record(&t->l, FL_MIG_READY, &r, sizeof(r));
			if (rc < 0)
				return rc;
			rc = fl_mig_recv(&t->l, &h, sizeof(h));
			if (rc < 0)
				return rc;
			rc = fl_mig_record_check(&h, t->npages, t->debug, t->version, t->m->err,
						 sizeof(t->m->err));
			if (rc < 0)
				return rc;
			if (h.type == FL_MIG_COMMIT)
				return 0;
			if (h.type != FL_MIG_ABORT)
				return fl_mig_fail(t->m, EPROTO, "record %u instead of the commit", h.type);
		}
			__attribute__((fallthrough)); /* ABORT after READY */
		case FL_MIG_ABORT:
			memset(text, 0, sizeof(text));
			rc = fl_mig_recv(&t->l, text, h.length);
			if (rc < 0)
				return rc;
			for (size_t i = 0; i < h.length; i++)
				if (text[i] < 0x20 || text[i] > 0x7e)
					text[i] = '?';
			return fl_mig_fail(t->m, ECANCELED, "the source gave up: %s", text);
		default:
			return fl_mig_fail(t->m, EPROTO, "record type %u out of place", h.type);
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
	uint64_t t0 = fl_mig_now();
	int rc;

	if (!vm || !m || !cfg || !token || !res || fd < 0)
		return -EINVAL;
	memset(res, 0, sizeof(*res));
	m->err[0] = 0;
	t = calloc(1, sizeof(*t));
	if (!t)
		return fl_mig_fail(m, ENOMEM, "migration target");
	t->vm = vm;
	t->m = m;
	t->l = (struct fl_mig_link){.fd = fd, .m = m, .deadline = fl_mig_deadline(t0, HELLO_NS),
				    .cancellable = 1};
	if (timeout_ns < HELLO_NS)
		t->l.deadline = fl_mig_deadline(t0, timeout_ns);
	pthread_mutex_lock(&vm->api_lock);
	if (vm->state != FL_STATE_NEW) {
		rc = fl_mig_fail(m, EBUSY, "a migration is received into a new machine only");
		goto out;
	}
	rc = fl_mig_nonblocking(fd);
	if (rc < 0) {
		rc = fl_mig_fail(m, -rc, "the migration socket: %s", strerror(-rc));
		goto out;
	}
	/* Kernel receive times, for the PAUSED marker (a failure only costs precision). */
	setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &(int){1}, sizeof(int));
	/* The hello and its token before anything else the peer sends. */
	rc = fl_mig_recv(&t->l, &hello, sizeof(hello));
	if (rc < 0) {
		rc = fl_mig_fail(m, -rc, "reading the hello: %s", fl_mig_why(rc));
		goto out;
	}
	rc = fl_mig_hello_check(&hello, token, m->err, sizeof(m->err));
	if (rc < 0) {
		fl_mig_refuse_peer(&t->l, m->err);
		goto out;
	}
	res->token_accepted = 1;
	t->version = hello.version;
	t->l.deadline = fl_mig_deadline(t0, timeout_ns);
	t->debug = !!(hello.flags & FL_MIG_HELLO_DEBUG);
	rc = target_config(t, cfg);
	if (rc < 0) {
		fl_mig_refuse_peer(&t->l, m->err);
		goto out;
	}
	rc = target_stream(t, res);
	if (rc < 0) {
		if (!m->err[0])
			fl_mig_fail(m, -rc, "migration stream: %s", fl_mig_why(rc));
		fl_mig_refuse_peer(&t->l, m->err);
		goto out;
	}
	/* Committed: the source let go of the hand-off byte before its COMMIT; take each whole
	 * lock (a retry covers nothing but a slow peer), then run. vCPUs start on the state
	 * loaded above (or later: start_paused). */
	for (int i = 0; (rc = fl_virtio_disks_lock(vm, FL_BLK_LOCK_WHOLE)) == -EBUSY && i < 50; i++)
		usleep(20000);
	if (rc < 0) {
		fl_mig_fail(m, -rc, "taking the disks over: %s", vm->err);
		goto out;
	}
	if (!__atomic_load_n(&m->start_paused, __ATOMIC_RELAXED)) {
		pthread_mutex_unlock(&vm->api_lock);
		rc = fl_vm_start(vm);
		pthread_mutex_lock(&vm->api_lock);
	}
	if (rc < 0) {
		fl_mig_fail(m, -rc, "starting the migrated guest: %s", vm->err);
		goto out;
	}
	res->target_resume_ns = resumed.resume_ns = fl_mig_now();
	res->downtime_ns = resumed.downtime_ns = resumed.resume_ns - t->marker_ns;
	res->committed = 1;
	res->pages_sent = t->pages;
	res->disk_bytes = t->copy.bytes;
	res->disk_chunks = t->copy.chunks;
	res->vcpus = vm->nvcpus;
	res->memory_mib = vm->mem.size / FL_MIB;
	for (uint32_t i = 0; i < t->build.nnics && i < 4; i++)
		memcpy(res->macs[i], t->nics[i].mac, 6);
	/* The guest runs here now; a lost RESUMED only leaves the source in doubt. */
	t->l.cancellable = 0;
	t->l.deadline = fl_mig_now() + 1000000000ULL;
	fl_mig_send_record(&t->l, FL_MIG_RESUMED, &resumed, sizeof(resumed));
	res->total_ns = fl_mig_now() - t0;
	rc = 0;
out:
	if (rc < 0 && t->built) {
		char why[sizeof(vm->err)];
		memcpy(why, vm->err, sizeof(why));
		fl_vm_unbuild(vm);
		memcpy(vm->err, why, sizeof(why));
	}
	pthread_mutex_unlock(&vm->api_lock);
	fl_mig_copy_fini(&t->copy);
	free(t);
	return rc;
}

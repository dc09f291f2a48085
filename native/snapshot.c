/*
 * Snapshots of a paused machine: save to a state file and a sparse memory file, restore
 * into a new machine whose RAM maps the memory file copy-on-write, and the dirty-page
 * tracking diff snapshots need. The format is in snapshot_file.c, the memory file and the
 * file handling in snapshot_mem.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "snapshot.h"
#include "virtio/blk.h"
#include "virtio/net.h"
#include "vmm.h"

#define PAGE FL_SNAP_PAGE

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- dirty tracking ---- */

static int track_alloc(struct fl_vm *vm)
{
	uint64_t words = (vm->mem.size / PAGE + 63) / 64;

	vm->snap.npages = vm->mem.size / PAGE;
	if (!vm->snap.pending)
		vm->snap.pending = calloc(words, sizeof(uint64_t));
	if (!vm->snap.devices)
		vm->snap.devices = calloc(words, sizeof(uint64_t));
	if (!vm->snap.pending || !vm->snap.devices)
		return -ENOMEM;
	return 0;
}

int fl_snap_log_start(struct fl_vm *vm)
{
	int rc = track_alloc(vm);

	if (rc < 0)
		return fl_fail(vm, ENOMEM, "dirty page bitmaps");
	rc = fl_mem_log_dirty(&vm->mem, vm->vm_fd, vm->err, sizeof(vm->err));
	if (rc < 0)
		return rc;
	__atomic_store_n(&vm->gmem.dirty, vm->snap.devices, __ATOMIC_RELEASE);
	return 0;
}

/* Starts logging writes from now on: called while paused, right after a snapshot. */
static int track_start(struct fl_vm *vm, const uint8_t *base)
{
	int rc = fl_snap_log_start(vm);

	if (rc < 0)
		return rc;
	memcpy(vm->snap.base, base, FL_SNAP_ID_LEN);
	vm->snap.tracking = 1;
	return 0;
}

/* Moves what KVM and the devices logged into pending (kept there until a save succeeds). */
static int track_collect(struct fl_vm *vm)
{
	uint64_t words = (vm->snap.npages + 63) / 64;
	int rc = fl_mem_collect_dirty(&vm->mem, vm->vm_fd, vm->snap.pending, vm->err,
				      sizeof(vm->err));

	if (rc < 0)
		return rc;
	for (uint64_t w = 0; w < words; w++)
		vm->snap.pending[w] |= __atomic_exchange_n(&vm->snap.devices[w], 0, __ATOMIC_RELAXED);
	return 0;
}

/* The same for a migration: what was logged goes to out too, and stays in pending, so a
 * migration that fails leaves the next diff snapshot whole (a superset at worst). */
int fl_snap_log_collect(struct fl_vm *vm, uint64_t *out)
{
	uint64_t words = (vm->snap.npages + 63) / 64;
	int rc = fl_mem_collect_dirty(&vm->mem, vm->vm_fd, out, vm->err, sizeof(vm->err));

	if (rc < 0)
		return rc;
	for (uint64_t w = 0; w < words; w++) {
		out[w] |= __atomic_exchange_n(&vm->snap.devices[w], 0, __ATOMIC_RELAXED);
		vm->snap.pending[w] |= out[w];
	}
	return 0;
}

/* ---- state ---- */

/*
 * The CPUID the guest is given, as a checksum. KVM_GET_SUPPORTED_CPUID reports the APIC id
 * of whichever host CPU ran the ioctl in a few fields; fl_cpuid_apply replaces those per
 * vCPU, so they are left out.
 */
int fl_snap_cpuid_crc(struct fl_vm *vm, uint32_t *crc)
{
	uint32_t c = 0;

	if (!vm->cpuid)
		return fl_fail(vm, EINVAL, "no CPUID table");
	for (uint32_t i = 0; i < vm->cpuid->nent; i++) {
		struct kvm_cpuid_entry2 e = vm->cpuid->entries[i];
		uint32_t words[6];

		if (e.function == 1)
			e.ebx &= 0x0000ffffu;
		if (e.function == 0xb || e.function == 0x1f)
			e.edx = 0;
		if (e.function == 0x8000001e)
			e.eax = 0;
		words[0] = e.function;
		words[1] = e.index;
		words[2] = e.eax;
		words[3] = e.ebx;
		words[4] = e.ecx;
		words[5] = e.edx;
		c = fl_crc32c(c, words, sizeof(words));
	}
	*crc = c;
	return 0;
}

int fl_snap_machine_config(struct fl_vm *vm, struct fl_snap_config *c)
{
	memset(c, 0, sizeof(*c));
	c->nvcpus = vm->nvcpus;
	c->nslots = vm->nvirtio;
	c->mem_size = vm->mem.size;
	c->low_size = vm->mem.low_size;
	c->page_size = PAGE;
	for (uint32_t i = 0; i < vm->nvirtio; i++) {
		struct fl_virtio_dev *d = vm->virtio[i].dev;
		c->slots[i].device_id = d->device_id;
		if (d->device_id == VIRTIO_ID_BLOCK) {
			c->slots[i].flags = ((struct fl_blk *)d)->read_only ? FL_DISK_READONLY : 0;
			c->slots[i].capacity = ((struct fl_blk *)d)->capacity;
		} else {
			memcpy(c->slots[i].mac, ((struct fl_net *)d)->mac, 6);
		}
	}
	return fl_snap_cpuid_crc(vm, &c->cpuid_crc);
}

int fl_snap_collect_state(struct fl_vm *vm, struct fl_snap_writer *w)
{
	struct fl_snap_config cfg;
	struct fl_ioapic_state io;
	struct fl_serial_state ser;
	struct fl_i8042_state kbd;
	struct kvm_clock_data kc;
	struct fl_snap_clock clk;
	size_t blob = (size_t)fl_vcpu_state_size();
	size_t dev = (size_t)fl_device_state_size();
	uint8_t *buf = malloc(blob > dev ? blob : dev);
	int rc;

	if (!buf)
		return fl_fail(vm, ENOMEM, "state buffer");
	rc = fl_snap_machine_config(vm, &cfg);
	if (rc < 0)
		goto out;
	fl_snap_add(w, FL_SEC_CONFIG, 0, &cfg, sizeof(cfg));
	for (uint32_t i = 0; i < vm->nvcpus; i++) {
		rc = fl_vcpu_state_get(vm, i, buf);
		if (rc < 0)
			goto out;
		fl_snap_add(w, FL_SEC_VCPU, i, buf, blob);
	}
	fl_ioapic_save(&vm->ioapic, &io);
	fl_snap_add(w, FL_SEC_IOAPIC, 0, &io, sizeof(io));
	fl_serial_save(&vm->serial, &ser);
	fl_snap_add(w, FL_SEC_SERIAL, 0, &ser, sizeof(ser));
	fl_i8042_save(&vm->i8042, &kbd);
	fl_snap_add(w, FL_SEC_I8042, 0, &kbd, sizeof(kbd));
	fl_snap_add(w, FL_SEC_PM, 0, &vm->pm.s, sizeof(vm->pm.s));
	memset(&kc, 0, sizeof(kc));
	if (ioctl(vm->vm_fd, KVM_GET_CLOCK, &kc) < 0) {
		rc = fl_fail(vm, errno, "KVM_GET_CLOCK: %s", strerror(errno));
		goto out;
	}
	memset(&clk, 0, sizeof(clk));
	clk.clock = kc.clock;
	clk.flags = kc.flags;
	fl_snap_add(w, FL_SEC_CLOCK, 0, &clk, sizeof(clk));
	for (uint32_t i = 0; i < vm->nvirtio; i++) {
		fl_device_blob_get(vm, i, buf);
		fl_snap_add(w, FL_SEC_VIRTIO, i, buf, dev);
	}
	rc = 0;
out:
	free(buf);
	return rc;
}

/*
 * A live save writes while the guest runs what it can: every page of RAM that holds data (a
 * full snapshot) or every page written since the base (a diff), then what the guest wrote
 * meanwhile, pass after pass, until a pass is small or stops shrinking. Only the last
 * pass, the state and the pages written during it are taken paused; the fsync and renames
 * come after the guest runs again. The snapshot is the machine at that pause, as a live
 * migration's target gets it.
 */
#define LIVE_PASSES 5	      /* running passes at most, the first included */
#define LIVE_SMALL_PAGES 256u /* a pass this small (1 MiB) is left to the pause */

static uint64_t bits_set(const uint64_t *bm, uint64_t words)
{
	uint64_t n = 0;

	for (uint64_t w = 0; w < words; w++)
		n += (uint64_t)__builtin_popcountll(bm[w]);
	return n;
}

/* The running passes; on return `left` holds what the last collect found and no pass wrote
 * (written paused with what the pause's collect adds). */
static int live_passes(struct fl_vm *vm, int fd, int diff, uint64_t *left,
		       struct fl_snapshot_stats *s)
{
	uint64_t words = (vm->snap.npages + 63) / 64, prev = UINT64_MAX, n;
	struct fl_snap_runs rs = {0};
	int rc;

	/* What was logged until now is in the first pass: the diff's pending pages, or all. */
	memset(left, 0, words * sizeof(uint64_t));
	rc = fl_snap_log_collect(vm, left);
	if (rc < 0)
		return rc;
	memset(left, 0, words * sizeof(uint64_t));
	if (diff) {
		rc = fl_snap_write_bitmap(vm, fd, vm->snap.pending, NULL, &s->memory_pages,
					  vm->err, sizeof(vm->err));
	} else {
		rc = fl_snap_write_full(vm, fd, &rs, vm->err, sizeof(vm->err));
		s->memory_pages += rs.pages;
		free(rs.r);
	}
	if (rc < 0)
		return rc;
	for (uint32_t pass = 1;; pass++) {
		rc = fl_snap_log_collect(vm, left);
		if (rc < 0)
			return rc;
		n = bits_set(left, words);
		s->passes = pass;
		if (n <= LIVE_SMALL_PAGES || n >= prev || pass == LIVE_PASSES)
			return 0;
		rc = fl_snap_write_bitmap(vm, fd, left, NULL, &s->memory_pages, vm->err,
					  sizeof(vm->err));
		if (rc < 0)
			return rc;
		memset(left, 0, words * sizeof(uint64_t));
		prev = n;
	}
}

int fl_snapshot_save(struct fl_vm *vm, const char *state_path, const char *memory_path,
		     uint32_t flags, struct fl_snapshot_stats *stats)
{
	struct fl_snap_tmpfile mem = {.fd = -1}, st = {.fd = -1};
	struct fl_snap_writer w;
	struct fl_snapshot_stats s;
	struct fl_snap_runs rs = {0};
	uint8_t id[FL_SNAP_ID_LEN];
	uint64_t *left = NULL;
	int diff = !!(flags & FL_SNAPSHOT_DIFF), live = 0, was_tracking = 0, paused_here = 0;
	uint32_t kind = diff ? FL_SNAP_DIFF : FL_SNAP_FULL;
	uint64_t t0 = now_ns(), t1, t2, tp = 0;
	int rc;

	if (!vm || !state_path || !memory_path)
		return -EINVAL;
	memset(&s, 0, sizeof(s));
	fl_snap_writer_init(&w);
	pthread_mutex_lock(&vm->api_lock);
	vm->err[0] = 0;
	if (flags & ~(uint32_t)(FL_SNAPSHOT_DIFF | FL_SNAPSHOT_LIVE | FL_SNAPSHOT_KEEP_PAUSED)) {
		rc = fl_fail(vm, EINVAL, "unknown snapshot flags 0x%x", flags);
		goto out;
	}
	if (fl_vm_state(vm) == FL_STATE_RUNNING && (flags & FL_SNAPSHOT_LIVE)) {
		live = 1;
	} else if (fl_vm_state(vm) != FL_STATE_PAUSED) {
		rc = fl_fail(vm, EINVAL,
			     (flags & FL_SNAPSHOT_LIVE)
				     ? "a live snapshot is taken of a running or paused machine"
				     : "a snapshot is taken only while the machine is paused");
		goto out;
	}
	if (diff && !vm->snap.tracking) {
		rc = fl_fail(vm, EINVAL,
			     "no snapshot to diff against: take a full one (or restore) first");
		goto out;
	}
	if (strcmp(state_path, memory_path) == 0) {
		rc = fl_fail(vm, EINVAL, "state and memory need two different files");
		goto out;
	}
	if (getrandom(id, sizeof(id), 0) != (ssize_t)sizeof(id)) {
		rc = fl_fail(vm, errno ? errno : EIO, "getrandom: %s", strerror(errno));
		goto out;
	}
	rc = fl_snap_tmp_open(&mem, memory_path, vm->err, sizeof(vm->err));
	if (rc < 0)
		goto out;
	rc = fl_snap_tmp_open(&st, state_path, vm->err, sizeof(vm->err));
	if (rc < 0)
		goto out;
	was_tracking = vm->snap.tracking;
	if (live) {
		/* Logging from here on (a first full snapshot starts it; it stays on). */
		rc = fl_snap_log_start(vm);
		if (rc < 0)
			goto out;
		left = calloc((vm->snap.npages + 63) / 64, sizeof(uint64_t));
		if (!left) {
			rc = fl_fail(vm, ENOMEM, "dirty page bitmap");
			goto out;
		}
		rc = live_passes(vm, mem.fd, diff, left, &s);
		if (rc < 0)
			goto out;
		tp = now_ns(); /* the guest's stop starts with the vCPUs' kick */
		rc = fl_vm_pause_locked(vm);
		if (rc < 0)
			goto out;
		paused_here = 1;
		rc = fl_snap_log_collect(vm, left);
		if (rc == 0)
			rc = fl_snap_write_bitmap(vm, mem.fd, left, NULL, &s.pages_paused, vm->err,
						  sizeof(vm->err));
		if (rc < 0)
			goto out;
		s.memory_pages += s.pages_paused;
	} else if (vm->snap.tracking) {
		rc = track_collect(vm);
		if (rc < 0)
			goto out;
	}
	t1 = now_ns();
	rc = fl_snap_collect_state(vm, &w);
	if (rc < 0)
		goto out;
	if (fl_snap_finish(&w, kind, id, diff ? vm->snap.base : NULL) < 0) {
		rc = fl_fail(vm, ENOMEM, "building the state file");
		goto out;
	}
	if (live) {
		if (!(flags & FL_SNAPSHOT_KEEP_PAUSED)) {
			rc = fl_vm_resume_locked(vm);
			if (rc < 0)
				goto out;
			paused_here = 0;
		}
		s.ns_paused = now_ns() - tp;
		s.ns_state = now_ns() - t1;
		/* A diff holds every page pending since its base: each was written in a pass. */
		if (diff && fl_snap_runs_from_bitmap(vm->snap.pending, vm->snap.npages, &rs) < 0) {
			rc = fl_fail(vm, ENOMEM, "the diff's runs");
			goto out;
		}
	} else {
		s.ns_state = now_ns() - t1;
		rc = diff ? fl_snap_write_diff(vm, mem.fd, &rs, vm->err, sizeof(vm->err))
			  : fl_snap_write_full(vm, mem.fd, &rs, vm->err, sizeof(vm->err));
		if (rc < 0)
			goto out;
		s.memory_pages = rs.pages;
	}
	t2 = now_ns();
	rc = fl_snap_write_trailer(mem.fd, vm->mem.size, kind, id, diff ? vm->snap.base : NULL, &rs);
	if (rc == 0)
		rc = fl_snap_write_all(st.fd, w.buf, w.len, 0);
	if (rc < 0) {
		rc = fl_fail(vm, -rc, "writing the snapshot: %s", strerror(-rc));
		goto out;
	}
	rc = fl_snap_tmp_commit(&mem, &st, vm->err, sizeof(vm->err));
	if (rc < 0)
		goto out;

	/* Committed: the next diff starts here. */
	if (vm->snap.tracking || live) {
		memset(vm->snap.pending, 0, (vm->snap.npages + 63) / 64 * sizeof(uint64_t));
		memcpy(vm->snap.base, id, FL_SNAP_ID_LEN);
		vm->snap.tracking = 1;
	} else if (track_start(vm, id) < 0) {
		/* The snapshot stands; only diffs against it are unavailable. */
		vm->snap.tracking = 0;
	}
	s.state_bytes = w.len;
	s.memory_runs = rs.n;
	s.ns_memory = live ? t1 - t0 : t2 - t1 - s.ns_state;
	s.ns_sync = now_ns() - t2;
	if (!live)
		s.ns_paused = now_ns() - t0;
	if (stats)
		*stats = s;
	rc = 0;
out:
	if (rc < 0 && live) {
		/* What was collected stays pending for the next diff; a machine this save paused
		 * runs again. Logging started here for a first snapshot gives no diff base. */
		vm->snap.tracking = was_tracking;
		if (paused_here)
			fl_vm_resume_locked(vm);
	}
	fl_snap_tmp_discard(&mem);
	fl_snap_tmp_discard(&st);
	pthread_mutex_unlock(&vm->api_lock);
	fl_snap_writer_fini(&w);
	free(rs.r);
	free(left);
	return rc;
}

/* ---- restore ---- */

static int read_state_file(const char *path, uint8_t **buf, size_t *len, char *err,
			   size_t errlen)
{
	struct stat sb;
	int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC), rc; /* a FIFO: no wait */

	*buf = NULL;
	if (fd < 0)
		return fl_errf(err, errlen, errno, "cannot open snapshot %s: %s", path,
			       strerror(errno));
	if (fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode) || sb.st_size > FL_SNAP_MAX_STATE) {
		close(fd);
		return fl_errf(err, errlen, EINVAL, "%s is not a snapshot state file", path);
	}
	*len = (size_t)sb.st_size;
	*buf = malloc(*len ? *len : 1);
	if (!*buf) {
		close(fd);
		return fl_errf(err, errlen, ENOMEM, "reading %s", path);
	}
	rc = fl_snap_read_all(fd, *buf, *len, 0);
	close(fd);
	if (rc < 0) {
		free(*buf);
		*buf = NULL;
		return fl_errf(err, errlen, -rc, "reading %s: %s", path, strerror(-rc));
	}
	return 0;
}

/* Everything that can be checked without KVM, so a refusal changes nothing. */
int fl_snap_check_machine(struct fl_vm *vm, const struct fl_snap_config *c,
			  const struct fl_config *cfg, struct fl_nic_config *nics)
{
	if (cfg->vcpus && cfg->vcpus != c->nvcpus)
		return fl_fail(vm, EINVAL, "snapshot is of a machine with %u vCPUs, not %u",
			       c->nvcpus, cfg->vcpus);
	if (cfg->memory_mib && cfg->memory_mib * FL_MIB != c->mem_size)
		return fl_fail(vm, EINVAL, "snapshot is of a machine with %llu MiB, not %llu",
			       (unsigned long long)(c->mem_size / FL_MIB),
			       (unsigned long long)cfg->memory_mib);
	if (cfg->ndisks > FL_MAX_DISKS || cfg->nnics > FL_MAX_NICS ||
	    cfg->ndisks + cfg->nnics != c->nslots)
		return fl_fail(vm, EINVAL, "snapshot has %u virtio devices, %u given", c->nslots,
			       cfg->ndisks + cfg->nnics);
	for (uint32_t i = 0; i < c->nslots; i++) {
		const struct fl_snap_slot *sl = &c->slots[i];
		int disk = i < cfg->ndisks;

		if (sl->device_id != (disk ? VIRTIO_ID_BLOCK : VIRTIO_ID_NET))
			return fl_fail(vm, EINVAL, "snapshot slot %u is a %s, not a %s", i,
				       sl->device_id == VIRTIO_ID_NET ? "NIC" : "disk",
				       disk ? "disk" : "NIC");
		if (disk && (sl->flags & FL_DISK_READONLY) !=
				    (cfg->disks[i].flags & FL_DISK_READONLY))
			return fl_fail(vm, EINVAL, "disk %u was %s when saved", i,
				       sl->flags & FL_DISK_READONLY ? "read-only" : "writable");
		if (!disk) {
			struct fl_nic_config *n = &nics[i - cfg->ndisks];
			static const uint8_t zero[6];
			if (!memcmp(n->mac, zero, 6))
				memcpy(n->mac, sl->mac, 6);
			else if (memcmp(n->mac, sl->mac, 6))
				return fl_fail(vm, EINVAL, "NIC %u had another MAC when saved",
					       i - cfg->ndisks);
		}
	}
	return 0;
}

int fl_snap_check(struct fl_vm *vm, const struct fl_snap_parsed *p, const struct fl_config *cfg,
		  struct fl_nic_config *nics)
{
	const struct fl_snap_config *c = &p->config;
	int rc = fl_snap_check_machine(vm, c, cfg, nics);

	if (rc < 0)
		return rc;
	for (uint32_t i = 0; i < c->nslots; i++)
		if (fl_device_blob_check(p->virtio[i], p->virtio_len[i], c->slots[i].device_id) < 0)
			return fl_fail(vm, EINVAL, "virtio slot %u state is corrupt", i);
	for (uint32_t i = 0; i < c->nvcpus; i++)
		if (fl_vcpu_blob_check(p->vcpu[i], p->vcpu_len[i]) < 0)
			return fl_fail(vm, EINVAL, "vCPU %u state is not of this VMM's format", i);
	if (p->section_len[FL_SEC_IOAPIC] != sizeof(struct fl_ioapic_state) ||
	    p->section_len[FL_SEC_SERIAL] != sizeof(struct fl_serial_state) ||
	    p->section_len[FL_SEC_I8042] != sizeof(struct fl_i8042_state) ||
	    p->section_len[FL_SEC_PM] != sizeof(struct fl_pm_state))
		return fl_fail(vm, EINVAL, "a device section has the wrong size");
	return 0;
}

int fl_snap_apply(struct fl_vm *vm, const struct fl_snap_parsed *p)
{
	struct fl_ioapic_state io;
	struct fl_serial_state ser;
	struct fl_i8042_state kbd;
	struct fl_snap_clock clk;
	struct kvm_clock_data kc;
	uint32_t crc = 0;
	int rc;

	rc = fl_snap_cpuid_crc(vm, &crc);
	if (rc < 0)
		return rc;
	if (crc != p->config.cpuid_crc)
		return fl_fail(vm, EINVAL, "this host offers the guest other CPU features than "
					   "the one the snapshot was taken on");
	for (uint32_t i = 0; i < vm->nvirtio; i++) {
		struct fl_virtio_dev *d = vm->virtio[i].dev;
		if (d->device_id == VIRTIO_ID_BLOCK &&
		    ((struct fl_blk *)d)->capacity != p->config.slots[i].capacity)
			return fl_fail(vm, EINVAL, "disk %u has %llu sectors, %llu when saved", i,
				       (unsigned long long)((struct fl_blk *)d)->capacity,
				       (unsigned long long)p->config.slots[i].capacity);
	}
	for (uint32_t i = 0; i < vm->nvcpus; i++) {
		rc = fl_vcpu_state_put(vm, i, p->vcpu[i]);
		if (rc < 0)
			return rc;
	}
	memcpy(&io, p->section[FL_SEC_IOAPIC], sizeof(io));
	memcpy(&ser, p->section[FL_SEC_SERIAL], sizeof(ser));
	memcpy(&kbd, p->section[FL_SEC_I8042], sizeof(kbd));
	memcpy(&vm->pm.s, p->section[FL_SEC_PM], sizeof(vm->pm.s));
	if (fl_ioapic_restore(&vm->ioapic, &io) < 0 || fl_serial_restore(&vm->serial, &ser) < 0 ||
	    fl_i8042_restore(&vm->i8042, &kbd) < 0)
		return fl_fail(vm, EINVAL, "device state out of range");
	for (uint32_t i = 0; i < vm->nvirtio; i++) {
		rc = fl_device_blob_put(vm, i, p->virtio[i]);
		if (rc < 0)
			return rc;
	}
	/* Guest time continues from the snapshot: kvmclock as saved (the TSC came back with
	 * each vCPU's MSRs). */
	memcpy(&clk, p->section[FL_SEC_CLOCK], sizeof(clk));
	memset(&kc, 0, sizeof(kc));
	kc.clock = clk.clock;
	if (ioctl(vm->vm_fd, KVM_SET_CLOCK, &kc) < 0)
		return fl_fail(vm, errno, "KVM_SET_CLOCK: %s", strerror(errno));
	return 0;
}

int fl_snapshot_restore(struct fl_vm *vm, const struct fl_config *cfg, const char *state_path,
			const char *memory_path)
{
	struct fl_snap_parsed *p = NULL;
	struct fl_snap_mem_trailer t;
	struct fl_nic_config nics[FL_MAX_NICS];
	struct fl_config build;
	uint8_t *buf = NULL;
	size_t len = 0;
	int memfd = -1, rc;

	if (!vm || !cfg || !state_path || !memory_path)
		return -EINVAL;
	pthread_mutex_lock(&vm->api_lock);
	if (vm->state != FL_STATE_NEW) {
		rc = fl_fail(vm, EBUSY, "a snapshot is restored into a new machine only");
		goto out;
	}
	p = calloc(1, sizeof(*p));
	if (!p) {
		rc = fl_fail(vm, ENOMEM, "snapshot");
		goto out;
	}
	rc = read_state_file(state_path, &buf, &len, vm->err, sizeof(vm->err));
	if (rc < 0)
		goto out;
	rc = fl_snap_parse(buf, len, p, vm->err, sizeof(vm->err));
	if (rc < 0)
		goto out;
	if (cfg->nnics > FL_MAX_NICS || (cfg->nnics && !cfg->nics) ||
	    (cfg->ndisks && !cfg->disks)) {
		rc = fl_fail(vm, EINVAL, "device list missing or too long");
		goto out;
	}
	memcpy(nics, cfg->nics, cfg->nnics * sizeof(*nics));
	rc = fl_snap_check(vm, p, cfg, nics);
	if (rc < 0)
		goto out;
	memfd = fl_snap_open_memory(memory_path, &t, NULL, vm->err, sizeof(vm->err));
	if (memfd < 0) {
		rc = memfd;
		goto out;
	}
	if (t.kind != FL_SNAP_FULL) {
		rc = fl_fail(vm, EINVAL, "%s is a diff: merge it onto its base memory file first",
			     memory_path);
		goto out;
	}
	if (memcmp(t.id, p->hdr.id, FL_SNAP_ID_LEN) || t.mem_size != p->config.mem_size) {
		rc = fl_fail(vm, EINVAL, "memory file %s belongs to another snapshot", memory_path);
		goto out;
	}

	build = *cfg;
	build.kernel_path = NULL;
	build.initrd_path = NULL;
	build.cmdline = NULL;
	build.vcpus = p->config.nvcpus;
	build.memory_mib = p->config.mem_size / FL_MIB;
	build.nics = nics;
	rc = fl_vm_build(vm, &build, memfd);
	memfd = -1;
	if (rc < 0)
		goto out;
	rc = fl_snap_apply(vm, p);
	if (rc == 0)
		rc = track_start(vm, p->hdr.id);
	if (rc < 0) {
		char why[sizeof(vm->err)];
		memcpy(why, vm->err, sizeof(why));
		fl_vm_unbuild(vm);
		memcpy(vm->err, why, sizeof(why));
	}
out:
	if (memfd >= 0)
		close(memfd);
	pthread_mutex_unlock(&vm->api_lock);
	free(buf);
	free(p);
	return rc;
}

int fl_snapshot_info(const char *state_path, struct fl_snapshot_info *info, char *err,
		     size_t errlen)
{
	struct fl_snap_parsed *p = calloc(1, sizeof(*p));
	uint8_t *buf = NULL;
	size_t len = 0;
	int rc;

	if (!p)
		return fl_errf(err, errlen, ENOMEM, "snapshot");
	rc = read_state_file(state_path, &buf, &len, err, errlen);
	if (rc == 0)
		rc = fl_snap_parse(buf, len, p, err, errlen);
	if (rc == 0) {
		memset(info, 0, sizeof(*info));
		info->version = p->hdr.version;
		info->kind = p->hdr.kind;
		info->vcpus = p->config.nvcpus;
		info->memory_mib = p->config.mem_size / FL_MIB;
		memcpy(info->id, p->hdr.id, FL_SNAP_ID_LEN);
		memcpy(info->parent, p->hdr.parent, FL_SNAP_ID_LEN);
		for (uint32_t i = 0; i < p->config.nslots; i++) {
			if (p->config.slots[i].device_id == VIRTIO_ID_BLOCK)
				info->ndisks++;
			else if (info->nnics < 4)
				memcpy(info->macs[info->nnics++], p->config.slots[i].mac, 6);
		}
	}
	free(buf);
	free(p);
	return rc;
}


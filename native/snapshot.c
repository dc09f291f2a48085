/*
 * Snapshots of a paused machine: save to a state file and a sparse memory file, restore
 * into a new machine whose RAM maps the memory file copy-on-write, diff snapshots from KVM's
 * dirty log, and merging a diff onto its base. The format is in snapshot_file.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
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
#define PM_PRESENT (1ULL << 63)
#define PM_SWAPPED (1ULL << 62)
#define PAGEMAP_CHUNK 16384 /* pages per pagemap read (128 KiB of entries) */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- files ---- */

static int write_all(int fd, const void *buf, size_t len, off_t off)
{
	const uint8_t *p = buf;

	while (len) {
		ssize_t n = pwrite(fd, p, len, off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
		off += n;
	}
	return 0;
}

static int read_all(int fd, void *buf, size_t len, off_t off)
{
	uint8_t *p = buf;

	while (len) {
		ssize_t n = pread(fd, p, len, off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -ENODATA; /* shorter than it said */
		p += n;
		len -= (size_t)n;
		off += n;
	}
	return 0;
}

/* A temporary file beside path, renamed over it once complete. */
struct tmpfile {
	char path[PATH_MAX];
	char final[PATH_MAX];
	int fd;
};

static int tmp_open(struct tmpfile *t, const char *path, char *err, size_t errlen)
{
	t->fd = -1;
	if (snprintf(t->final, sizeof(t->final), "%s", path) >= (int)sizeof(t->final) ||
	    snprintf(t->path, sizeof(t->path), "%s.tmp-%d", path, (int)getpid()) >=
		    (int)sizeof(t->path))
		return fl_errf(err, errlen, ENAMETOOLONG, "snapshot path too long: %s", path);
	unlink(t->path); /* a leftover of a process that had our pid and died mid-save */
	t->fd = open(t->path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (t->fd < 0)
		return fl_errf(err, errlen, errno, "creating %s: %s", t->path, strerror(errno));
	return 0;
}

static void tmp_discard(struct tmpfile *t)
{
	if (t->fd >= 0) {
		close(t->fd);
		unlink(t->path);
	}
	t->fd = -1;
}

static int sync_dir(const char *path)
{
	char copy[PATH_MAX];
	int fd, rc = 0;

	snprintf(copy, sizeof(copy), "%s", path);
	fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0)
		rc = -errno;
	close(fd);
	return rc;
}

/* fsync both, rename the memory file first: the state file names the memory file's id, so
 * until the state is renamed no new pair exists, and after that both are complete. */
static int tmp_commit(struct tmpfile *mem, struct tmpfile *state, char *err, size_t errlen)
{
	if (fsync(mem->fd) < 0 || fsync(state->fd) < 0)
		return fl_errf(err, errlen, errno, "fsync of the snapshot: %s", strerror(errno));
	if (rename(mem->path, mem->final) < 0)
		return fl_errf(err, errlen, errno, "renaming to %s: %s", mem->final,
			       strerror(errno));
	if (rename(state->path, state->final) < 0)
		return fl_errf(err, errlen, errno, "renaming to %s: %s", state->final,
			       strerror(errno));
	close(mem->fd);
	close(state->fd);
	mem->fd = state->fd = -1;
	if (sync_dir(mem->final) < 0 || sync_dir(state->final) < 0)
		return fl_errf(err, errlen, errno, "fsync of the snapshot's directory: %s",
			       strerror(errno));
	return 0;
}

/* ---- the memory file ---- */

static int page_is_zero(const uint8_t *p)
{
	const uint64_t *w = (const uint64_t *)(const void *)p;

	for (uint32_t i = 0; i < PAGE / 8; i += 8) {
		if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] |
		    w[i + 7])
			return 0;
	}
	return 1;
}

struct runs {
	struct fl_snap_run *r;
	uint64_t n, cap;
	uint64_t pages;
};

static int runs_add(struct runs *rs, uint64_t first, uint64_t count)
{
	if (rs->n && rs->r[rs->n - 1].first + rs->r[rs->n - 1].count == first) {
		rs->r[rs->n - 1].count += count;
	} else {
		if (rs->n == rs->cap) {
			uint64_t cap = rs->cap ? rs->cap * 2 : 256;
			struct fl_snap_run *p = realloc(rs->r, cap * sizeof(*p));
			if (!p)
				return -ENOMEM;
			rs->r = p;
			rs->cap = cap;
		}
		rs->r[rs->n++] = (struct fl_snap_run){first, count};
	}
	rs->pages += count;
	return 0;
}

/* Writes pages [first, first+count) of RAM at the same offset of the file. */
static int write_pages(struct fl_vm *vm, int fd, struct runs *rs, uint64_t first, uint64_t count)
{
	int rc = write_all(fd, vm->mem.host + first * PAGE, count * PAGE, (off_t)(first * PAGE));

	return rc < 0 ? rc : runs_add(rs, first, count);
}

/*
 * Which pages may hold data, without touching them: /proc/self/pagemap says whether a page
 * of our mapping is present or swapped. One that is neither is a page nobody wrote: zero in
 * anonymous RAM, and in RAM mapped from a memory file what the file holds there (zero in a
 * hole, else read through the mapping).
 */
static int write_full(struct fl_vm *vm, int fd, struct runs *rs, char *err, size_t errlen)
{
	uint64_t npages = vm->mem.size / PAGE, run_start = 0, run_len = 0;
	uint64_t *pm = malloc(PAGEMAP_CHUNK * sizeof(uint64_t));
	off_t data = -1, hole = -1; /* the memory file's data extent around the cursor */
	int pmfd, rc = 0;

	if (!pm)
		return fl_errf(err, errlen, ENOMEM, "pagemap buffer");
	pmfd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pmfd < 0) {
		free(pm);
		return fl_errf(err, errlen, errno, "/proc/self/pagemap: %s", strerror(errno));
	}
	for (uint64_t base = 0; base < npages && rc == 0; base += PAGEMAP_CHUNK) {
		uint64_t n = npages - base < PAGEMAP_CHUNK ? npages - base : PAGEMAP_CHUNK;
		uint64_t vpage = ((uintptr_t)vm->mem.host) / PAGE + base;

		rc = read_all(pmfd, pm, n * sizeof(uint64_t), (off_t)(vpage * sizeof(uint64_t)));
		if (rc < 0) {
			fl_errf(err, errlen, -rc, "reading /proc/self/pagemap: %s", strerror(-rc));
			break;
		}
		for (uint64_t i = 0; i < n; i++) {
			uint64_t page = base + i;
			off_t off = (off_t)(page * PAGE);
			int maybe = !!(pm[i] & (PM_PRESENT | PM_SWAPPED));

			if (!maybe && vm->mem.file_fd >= 0) {
				if (off >= hole) {
					data = lseek(vm->mem.file_fd, off, SEEK_DATA);
					if (data < 0)
						data = hole = (off_t)vm->mem.size; /* no more data */
					else
						hole = lseek(vm->mem.file_fd, data, SEEK_HOLE);
					if (hole < 0)
						hole = (off_t)vm->mem.size;
				}
				maybe = off >= data && off < hole;
			}
			if (maybe && !page_is_zero(vm->mem.host + page * PAGE)) {
				if (!run_len)
					run_start = page;
				run_len++;
				continue;
			}
			if (run_len) {
				rc = write_pages(vm, fd, rs, run_start, run_len);
				run_len = 0;
				if (rc < 0)
					break;
			}
		}
	}
	if (rc == 0 && run_len)
		rc = write_pages(vm, fd, rs, run_start, run_len);
	if (rc < 0 && !err[0])
		fl_errf(err, errlen, -rc, "writing guest memory: %s", strerror(-rc));
	close(pmfd);
	free(pm);
	return rc;
}

/* A diff: every page in the dirty bitmap, zero or not (it overwrites the base's page). */
static int write_diff(struct fl_vm *vm, int fd, struct runs *rs, char *err, size_t errlen)
{
	uint64_t npages = vm->mem.size / PAGE, page = 0;
	const uint64_t *bm = vm->snap.pending;
	int rc;

	while (page < npages) {
		uint64_t start, w = page / 64, bits = bm[w] & (~0ULL << (page % 64));

		while (!bits && ++w < (npages + 63) / 64)
			bits = bm[w];
		if (!bits)
			break;
		start = w * 64 + (uint64_t)__builtin_ctzll(bits);
		page = start;
		while (page < npages && (bm[page / 64] >> (page % 64) & 1))
			page++;
		rc = write_pages(vm, fd, rs, start, page - start);
		if (rc < 0)
			return fl_errf(err, errlen, -rc, "writing guest memory: %s", strerror(-rc));
	}
	return 0;
}

static int write_trailer(int fd, uint64_t mem_size, uint32_t kind, const uint8_t *id,
			 const uint8_t *parent, const struct runs *rs)
{
	uint64_t nruns = kind == FL_SNAP_DIFF ? rs->n : 0;
	uint64_t size = fl_snap_trailer_size(nruns);
	struct fl_snap_mem_trailer t;
	uint8_t *buf = calloc(1, size);
	int rc;

	if (!buf)
		return -ENOMEM;
	memset(&t, 0, sizeof(t));
	t.magic = FL_SNAP_MEM_MAGIC;
	t.version = FL_SNAP_VERSION;
	t.kind = kind;
	memcpy(t.id, id, FL_SNAP_ID_LEN);
	if (parent)
		memcpy(t.parent, parent, FL_SNAP_ID_LEN);
	t.mem_size = mem_size;
	t.nruns = nruns;
	t.page_size = PAGE;
	if (nruns)
		memcpy(buf, rs->r, nruns * sizeof(*rs->r));
	fl_snap_trailer_seal(&t, (const struct fl_snap_run *)(const void *)buf);
	memcpy(buf + size - sizeof(t), &t, sizeof(t));
	/* Sized first: pages never written stay holes. */
	rc = ftruncate(fd, (off_t)(mem_size + size)) < 0 ? -errno : 0;
	if (rc == 0)
		rc = write_all(fd, buf, size, (off_t)mem_size);
	free(buf);
	return rc;
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

/* Starts logging writes from now on: called while paused, right after a snapshot. */
static int track_start(struct fl_vm *vm, const uint8_t *base)
{
	int rc = track_alloc(vm);

	if (rc < 0)
		return fl_fail(vm, ENOMEM, "dirty page bitmaps");
	rc = fl_mem_log_dirty(&vm->mem, vm->vm_fd, vm->err, sizeof(vm->err));
	if (rc < 0)
		return rc;
	__atomic_store_n(&vm->gmem.dirty, vm->snap.devices, __ATOMIC_RELEASE);
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

/* ---- state ---- */

/*
 * The CPUID the guest is given, as a checksum. KVM_GET_SUPPORTED_CPUID reports the APIC id
 * of whichever host CPU ran the ioctl in a few fields; fl_cpuid_apply replaces those per
 * vCPU, so they are left out.
 */
static int kvm_cpuid_crc(struct fl_vm *vm, uint32_t *crc)
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

static int machine_config(struct fl_vm *vm, struct fl_snap_config *c)
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
	return kvm_cpuid_crc(vm, &c->cpuid_crc);
}

static int collect_state(struct fl_vm *vm, struct fl_snap_writer *w)
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
	rc = machine_config(vm, &cfg);
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

int fl_snapshot_save(struct fl_vm *vm, const char *state_path, const char *memory_path,
		     uint32_t flags, struct fl_snapshot_stats *stats)
{
	struct tmpfile mem = {.fd = -1}, st = {.fd = -1};
	struct fl_snap_writer w;
	struct fl_snapshot_stats s;
	struct runs rs = {0};
	uint8_t id[FL_SNAP_ID_LEN];
	int diff = !!(flags & FL_SNAPSHOT_DIFF);
	uint32_t kind = diff ? FL_SNAP_DIFF : FL_SNAP_FULL;
	uint64_t t0 = now_ns(), t1, t2;
	int rc;

	if (!vm || !state_path || !memory_path)
		return -EINVAL;
	memset(&s, 0, sizeof(s));
	fl_snap_writer_init(&w);
	pthread_mutex_lock(&vm->api_lock);
	vm->err[0] = 0;
	if (fl_vm_state(vm) != FL_STATE_PAUSED) {
		rc = fl_fail(vm, EINVAL, "a snapshot is taken only while the machine is paused");
		goto out;
	}
	if (flags & ~(uint32_t)FL_SNAPSHOT_DIFF) {
		rc = fl_fail(vm, EINVAL, "unknown snapshot flags 0x%x", flags);
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
	rc = collect_state(vm, &w);
	if (rc < 0)
		goto out;
	if (fl_snap_finish(&w, kind, id, diff ? vm->snap.base : NULL) < 0) {
		rc = fl_fail(vm, ENOMEM, "building the state file");
		goto out;
	}
	if (vm->snap.tracking) {
		rc = track_collect(vm);
		if (rc < 0)
			goto out;
	}
	t1 = now_ns();

	rc = tmp_open(&mem, memory_path, vm->err, sizeof(vm->err));
	if (rc < 0)
		goto out;
	rc = tmp_open(&st, state_path, vm->err, sizeof(vm->err));
	if (rc < 0)
		goto out;
	rc = diff ? write_diff(vm, mem.fd, &rs, vm->err, sizeof(vm->err))
		  : write_full(vm, mem.fd, &rs, vm->err, sizeof(vm->err));
	if (rc < 0)
		goto out;
	rc = write_trailer(mem.fd, vm->mem.size, kind, id, diff ? vm->snap.base : NULL, &rs);
	if (rc == 0)
		rc = write_all(st.fd, w.buf, w.len, 0);
	if (rc < 0) {
		rc = fl_fail(vm, -rc, "writing the snapshot: %s", strerror(-rc));
		goto out;
	}
	t2 = now_ns();
	rc = tmp_commit(&mem, &st, vm->err, sizeof(vm->err));
	if (rc < 0)
		goto out;

	/* Committed: the next diff starts here. */
	if (vm->snap.tracking) {
		memset(vm->snap.pending, 0, (vm->snap.npages + 63) / 64 * sizeof(uint64_t));
		memcpy(vm->snap.base, id, FL_SNAP_ID_LEN);
	} else if (track_start(vm, id) < 0) {
		/* The snapshot stands; only diffs against it are unavailable. */
		vm->snap.tracking = 0;
	}
	s.state_bytes = w.len;
	s.memory_pages = rs.pages;
	s.memory_runs = rs.n;
	s.ns_state = t1 - t0;
	s.ns_memory = t2 - t1;
	s.ns_sync = now_ns() - t2;
	if (stats)
		*stats = s;
	rc = 0;
out:
	tmp_discard(&mem);
	tmp_discard(&st);
	pthread_mutex_unlock(&vm->api_lock);
	fl_snap_writer_fini(&w);
	free(rs.r);
	return rc;
}

/* ---- restore ---- */

static int read_state_file(const char *path, uint8_t **buf, size_t *len, char *err,
			   size_t errlen)
{
	struct stat sb;
	int fd = open(path, O_RDONLY | O_CLOEXEC), rc;

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
	rc = read_all(fd, *buf, *len, 0);
	close(fd);
	if (rc < 0) {
		free(*buf);
		*buf = NULL;
		return fl_errf(err, errlen, -rc, "reading %s: %s", path, strerror(-rc));
	}
	return 0;
}

/* Opens a memory file and checks its trailer; the runs (a diff's) are copied to *runs. */
static int open_memory(const char *path, struct fl_snap_mem_trailer *t, struct fl_snap_run **runs,
		       char *err, size_t errlen)
{
	struct stat sb;
	const struct fl_snap_run *r;
	uint8_t *buf = NULL;
	uint64_t mem_size, tail;
	int fd = open(path, O_RDONLY | O_CLOEXEC), rc;

	if (runs)
		*runs = NULL;
	if (fd < 0)
		return fl_errf(err, errlen, errno, "cannot open memory file %s: %s", path,
			       strerror(errno));
	rc = fl_errf(err, errlen, EINVAL, "%s is not a snapshot memory file (truncated?)", path);
	if (fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode) || sb.st_size < (off_t)PAGE)
		goto fail;
	/* The trailer's header ends the file and says where guest memory ends. */
	{
		struct fl_snap_mem_trailer head;
		uint64_t size = (uint64_t)sb.st_size;

		if (read_all(fd, &head, sizeof(head), (off_t)(size - sizeof(head))) < 0)
			goto fail;
		if (head.magic != FL_SNAP_MEM_MAGIC || head.page_size != PAGE ||
		    head.mem_size > ((uint64_t)FL_MAX_MEMORY_MIB << 20) ||
		    head.nruns > head.mem_size / PAGE)
			goto fail;
		mem_size = head.mem_size;
		tail = fl_snap_trailer_size(head.nruns);
		if (size < mem_size || size - mem_size != tail)
			goto fail;
	}
	buf = malloc(tail);
	if (!buf) {
		rc = fl_errf(err, errlen, ENOMEM, "memory file trailer");
		goto fail;
	}
	if (read_all(fd, buf, tail, (off_t)mem_size) < 0)
		goto fail;
	rc = fl_snap_trailer_parse(buf, tail, t, &r, err, errlen);
	if (rc < 0)
		goto fail;
	if (t->mem_size != mem_size) {
		rc = fl_errf(err, errlen, EINVAL, "memory file trailer is inconsistent");
		goto fail;
	}
	if (runs && t->nruns) {
		*runs = malloc(t->nruns * sizeof(**runs));
		if (!*runs) {
			rc = fl_errf(err, errlen, ENOMEM, "memory file runs");
			goto fail;
		}
		memcpy(*runs, r, t->nruns * sizeof(**runs));
	}
	free(buf);
	return fd;
fail:
	free(buf);
	close(fd);
	return rc;
}

/* Everything that can be checked without KVM, so a refusal changes nothing. */
static int check_snapshot(struct fl_vm *vm, const struct fl_snap_parsed *p,
			  const struct fl_config *cfg, struct fl_nic_config *nics)
{
	const struct fl_snap_config *c = &p->config;

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
		if (fl_device_blob_check(p->virtio[i], p->virtio_len[i], sl->device_id) < 0)
			return fl_fail(vm, EINVAL, "virtio slot %u state is corrupt", i);
	}
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

static int apply_state(struct fl_vm *vm, const struct fl_snap_parsed *p)
{
	struct fl_ioapic_state io;
	struct fl_serial_state ser;
	struct fl_i8042_state kbd;
	struct fl_snap_clock clk;
	struct kvm_clock_data kc;
	uint32_t crc = 0;
	int rc;

	rc = kvm_cpuid_crc(vm, &crc);
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
	rc = check_snapshot(vm, p, cfg, nics);
	if (rc < 0)
		goto out;
	memfd = open_memory(memory_path, &t, NULL, vm->err, sizeof(vm->err));
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
	rc = apply_state(vm, p);
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

/* ---- merge ---- */

static int copy_range(int in, int out, uint64_t off, uint64_t len)
{
	while (len) {
		loff_t a = (loff_t)off, b = (loff_t)off;
		ssize_t n = copy_file_range(in, &a, out, &b, len, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -ENODATA;
		off += (uint64_t)n;
		len -= (uint64_t)n;
	}
	return 0;
}

int fl_snapshot_merge(const char *base_memory, const char *diff_memory, const char *out_memory,
		      char *err, size_t errlen)
{
	struct fl_snap_mem_trailer bt, dt;
	struct fl_snap_run *runs = NULL;
	struct tmpfile out = {.fd = -1};
	struct runs none = {0};
	int base = -1, diff = -1, rc;
	off_t pos = 0;

	base = open_memory(base_memory, &bt, NULL, err, errlen);
	if (base < 0)
		return base;
	diff = open_memory(diff_memory, &dt, &runs, err, errlen);
	if (diff < 0) {
		rc = diff;
		goto out;
	}
	rc = fl_errf(err, errlen, EINVAL, "%s is not a full memory file", base_memory);
	if (bt.kind != FL_SNAP_FULL)
		goto out;
	rc = fl_errf(err, errlen, EINVAL, "%s is not a diff", diff_memory);
	if (dt.kind != FL_SNAP_DIFF)
		goto out;
	rc = fl_errf(err, errlen, EINVAL, "%s is not a diff of %s", diff_memory, base_memory);
	if (memcmp(dt.parent, bt.id, FL_SNAP_ID_LEN) || dt.mem_size != bt.mem_size)
		goto out;
	rc = tmp_open(&out, out_memory, err, errlen);
	if (rc < 0)
		goto out;
	/* The base's data extents, then the diff's pages over them; holes stay holes. */
	while (pos < (off_t)bt.mem_size) {
		off_t data = lseek(base, pos, SEEK_DATA), hole;
		if (data < 0 || data >= (off_t)bt.mem_size)
			break;
		hole = lseek(base, data, SEEK_HOLE);
		if (hole < 0 || hole > (off_t)bt.mem_size)
			hole = (off_t)bt.mem_size;
		rc = copy_range(base, out.fd, (uint64_t)data, (uint64_t)(hole - data));
		if (rc < 0)
			goto io;
		pos = hole;
	}
	for (uint64_t i = 0; i < dt.nruns; i++) {
		rc = copy_range(diff, out.fd, runs[i].first * PAGE, runs[i].count * PAGE);
		if (rc < 0)
			goto io;
	}
	rc = write_trailer(out.fd, bt.mem_size, FL_SNAP_FULL, dt.id, NULL, &none);
	if (rc < 0)
		goto io;
	if (fsync(out.fd) < 0 || rename(out.path, out.final) < 0) {
		rc = fl_errf(err, errlen, errno, "writing %s: %s", out_memory, strerror(errno));
		goto out;
	}
	close(out.fd);
	out.fd = -1;
	sync_dir(out_memory);
	rc = 0;
	goto out;
io:
	rc = fl_errf(err, errlen, -rc, "merging into %s: %s", out_memory, strerror(-rc));
out:
	tmp_discard(&out);
	if (base >= 0)
		close(base);
	if (diff >= 0)
		close(diff);
	free(runs);
	return rc;
}

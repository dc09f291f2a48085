/*
 * A snapshot's files: writing guest RAM to a sparse memory file (full or diff) with its
 * trailer, opening one for a restore, merging a diff onto its base, and the temporary-name,
 * fsync and rename discipline both files are written with (snapshot.h).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "snapshot.h"
#include "vmm.h"

#define PAGE FL_SNAP_PAGE
#define PM_PRESENT (1ULL << 63)
#define PM_SWAPPED (1ULL << 62)
#define PAGEMAP_CHUNK 16384 /* pages per pagemap read (128 KiB of entries) */

/* ---- files ---- */

int fl_snap_write_all(int fd, const void *buf, size_t len, off_t off)
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

int fl_snap_read_all(int fd, void *buf, size_t len, off_t off)
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


int fl_snap_tmp_open(struct fl_snap_tmpfile *t, const char *path, char *err, size_t errlen)
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

void fl_snap_tmp_discard(struct fl_snap_tmpfile *t)
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
int fl_snap_tmp_commit(struct fl_snap_tmpfile *mem, struct fl_snap_tmpfile *state, char *err,
		       size_t errlen)
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

int fl_snap_page_is_zero(const uint8_t *p)
{
	const uint64_t *w = (const uint64_t *)(const void *)p;

	for (uint32_t i = 0; i < PAGE / 8; i += 8) {
		if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] |
		    w[i + 7])
			return 0;
	}
	return 1;
}


static int runs_add(struct fl_snap_runs *rs, uint64_t first, uint64_t count)
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
static int write_pages(struct fl_vm *vm, int fd, struct fl_snap_runs *rs, uint64_t first,
		       uint64_t count)
{
	int rc = fl_snap_write_all(fd, vm->mem.host + first * PAGE, count * PAGE,
				   (off_t)(first * PAGE));

	return rc < 0 ? rc : runs_add(rs, first, count);
}

/*
 * Which pages may hold data, without touching them: /proc/self/pagemap says whether a page
 * of our mapping is present or swapped. One that is neither is a page nobody wrote: zero in
 * anonymous RAM, and in RAM mapped from a memory file what the file holds there (zero in a
 * hole, else read through the mapping).
 */
int fl_snap_write_full(struct fl_vm *vm, int fd, struct fl_snap_runs *rs, char *err, size_t errlen)
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

		rc = fl_snap_read_all(pmfd, pm, n * sizeof(uint64_t), (off_t)(vpage * sizeof(uint64_t)));
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
			if (maybe && !fl_snap_page_is_zero(vm->mem.host + page * PAGE)) {
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

/* Sets in bitmap the pages of RAM that may hold data, touching none of them (the pagemap
 * test of fl_snap_write_full): a page neither present nor swapped nor backed by data in the
 * file under RAM is zero. */
int fl_snap_data_map(struct fl_vm *vm, uint64_t *bitmap, char *err, size_t errlen)
{
	uint64_t npages = vm->mem.size / PAGE;
	uint64_t *pm = malloc(PAGEMAP_CHUNK * sizeof(uint64_t));
	int file = vm->mem.file_fd >= 0 ? vm->mem.file_fd : vm->mem.memfd;
	off_t data = -1, hole = -1;
	int pmfd, rc = 0;

	if (!pm)
		return fl_errf(err, errlen, ENOMEM, "pagemap buffer");
	pmfd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pmfd < 0) {
		free(pm);
		return fl_errf(err, errlen, errno, "/proc/self/pagemap: %s", strerror(errno));
	}
	for (uint64_t base = 0; base < npages; base += PAGEMAP_CHUNK) {
		uint64_t n = npages - base < PAGEMAP_CHUNK ? npages - base : PAGEMAP_CHUNK;
		uint64_t vpage = ((uintptr_t)vm->mem.host) / PAGE + base;

		rc = fl_snap_read_all(pmfd, pm, n * sizeof(uint64_t), (off_t)(vpage * sizeof(uint64_t)));
		if (rc < 0) {
			fl_errf(err, errlen, -rc, "reading /proc/self/pagemap: %s", strerror(-rc));
			break;
		}
		for (uint64_t i = 0; i < n; i++) {
			uint64_t page = base + i;
			off_t off = (off_t)(page * PAGE);
			int maybe = !!(pm[i] & (PM_PRESENT | PM_SWAPPED));

			if (!maybe && file >= 0) {
				if (off >= hole) {
					data = lseek(file, off, SEEK_DATA);
					if (data < 0)
						data = hole = (off_t)vm->mem.size;
					else
						hole = lseek(file, data, SEEK_HOLE);
					if (hole < 0)
						hole = (off_t)vm->mem.size;
				}
				maybe = off >= data && off < hole;
			}
			if (maybe)
				bitmap[page / 64] |= 1ULL << (page % 64);
		}
	}
	close(pmfd);
	free(pm);
	return rc;
}

/* The runs of set bits of bm (npages bits), in order: [start, end) of each in *first, *count. */
static int next_run(const uint64_t *bm, uint64_t npages, uint64_t *page, uint64_t *first,
		    uint64_t *count)
{
	uint64_t p = *page, w = p / 64, bits;

	if (p >= npages)
		return 0;
	bits = bm[w] & (~0ULL << (p % 64));
	while (!bits && ++w < (npages + 63) / 64)
		bits = bm[w];
	if (!bits)
		return 0;
	p = w * 64 + (uint64_t)__builtin_ctzll(bits);
	if (p >= npages)
		return 0;
	*first = p;
	while (p < npages && (bm[p / 64] >> (p % 64) & 1))
		p++;
	*count = p - *first;
	*page = p;
	return 1;
}

int fl_snap_write_bitmap(struct fl_vm *vm, int fd, const uint64_t *bm, struct fl_snap_runs *rs,
			 uint64_t *pages, char *err, size_t errlen)
{
	uint64_t npages = vm->mem.size / PAGE, page = 0, first, count;
	int rc;

	while (next_run(bm, npages, &page, &first, &count)) {
		rc = fl_snap_write_all(fd, vm->mem.host + first * PAGE, count * PAGE,
				       (off_t)(first * PAGE));
		if (rc == 0 && rs)
			rc = runs_add(rs, first, count);
		if (rc < 0)
			return fl_errf(err, errlen, -rc, "writing guest memory: %s", strerror(-rc));
		if (pages)
			*pages += count;
	}
	return 0;
}

int fl_snap_runs_from_bitmap(const uint64_t *bm, uint64_t npages, struct fl_snap_runs *rs)
{
	uint64_t page = 0, first, count;
	int rc;

	while (next_run(bm, npages, &page, &first, &count))
		if ((rc = runs_add(rs, first, count)) < 0)
			return rc;
	return 0;
}

/* A diff: every page in the dirty bitmap, zero or not (it overwrites the base's page). */
int fl_snap_write_diff(struct fl_vm *vm, int fd, struct fl_snap_runs *rs, char *err, size_t errlen)
{
	return fl_snap_write_bitmap(vm, fd, vm->snap.pending, rs, NULL, err, errlen);
}

int fl_snap_write_trailer(int fd, uint64_t mem_size, uint32_t kind, const uint8_t *id,
			 const uint8_t *parent, const struct fl_snap_runs *rs)
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
	memcpy(buf + size - sizeof(t), &t, sizeof(t));
	fl_snap_trailer_seal(buf, size);
	/* Sized first: pages never written stay holes. */
	rc = ftruncate(fd, (off_t)(mem_size + size)) < 0 ? -errno : 0;
	if (rc == 0)
		rc = fl_snap_write_all(fd, buf, size, (off_t)mem_size);
	free(buf);
	return rc;
}

/* Opens a memory file and checks its trailer; the runs (a diff's) are copied to *runs. */
int fl_snap_open_memory(const char *path, struct fl_snap_mem_trailer *t, struct fl_snap_run **runs,
		       char *err, size_t errlen)
{
	struct stat sb;
	const struct fl_snap_run *r;
	uint8_t *buf = NULL;
	uint64_t mem_size, tail;
	int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC), rc; /* a FIFO: no wait */

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

		if (fl_snap_read_all(fd, &head, sizeof(head), (off_t)(size - sizeof(head))) < 0)
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
	if (fl_snap_read_all(fd, buf, tail, (off_t)mem_size) < 0)
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
	struct fl_snap_tmpfile out = {.fd = -1};
	struct fl_snap_runs none = {0};
	int base = -1, diff = -1, rc;
	off_t pos = 0;

	base = fl_snap_open_memory(base_memory, &bt, NULL, err, errlen);
	if (base < 0)
		return base;
	diff = fl_snap_open_memory(diff_memory, &dt, &runs, err, errlen);
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
	rc = fl_snap_tmp_open(&out, out_memory, err, errlen);
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
	rc = fl_snap_write_trailer(out.fd, bt.mem_size, FL_SNAP_FULL, dt.id, NULL, &none);
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
	fl_snap_tmp_discard(&out);
	if (base >= 0)
		close(base);
	if (diff >= 0)
		close(diff);
	free(runs);
	return rc;
}

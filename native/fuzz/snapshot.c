/*
 * libFuzzer target for the snapshot file format (native/snapshot_file.c): a state file or a
 * memory file's trailer, as a restore or a merge reads them from disk. Nothing may be read
 * outside the input, and whatever the parser accepts must be consistent: every pointer it
 * hands back inside the input, every section length within it, the required sections there.
 *
 * Input: a mode byte, then the file's bytes.
 *   bit 0: 0 a state file, 1 a memory file's trailer
 *   bit 1: fix the checksums first (header, each section, the trailer), so the fuzzer gets
 *          past them to the checks behind
 */
#include <stdlib.h>
#include <string.h>

#include "../include/flotilla.h"
#include "../snapshot.h"

static void fix_state(uint8_t *buf, size_t len)
{
	struct fl_snap_header h;
	size_t off = sizeof(h);

	if (len < sizeof(h))
		return;
	memcpy(&h, buf, sizeof(h));
	for (uint32_t s = 0; s < h.nsections && s < FL_SNAP_MAX_SECTIONS; s++) {
		struct fl_snap_section_header sh;
		if (len - off < sizeof(sh))
			break;
		memcpy(&sh, buf + off, sizeof(sh));
		off += sizeof(sh);
		if (sh.length > len - off || ((sh.length + 7) & ~7ULL) > len - off)
			break;
		sh.crc = fl_snap_section_crc(&sh, buf + off);
		memcpy(buf + off - sizeof(sh), &sh, sizeof(sh));
		off += (sh.length + 7) & ~7ULL;
	}
	h.crc = 0;
	h.crc = fl_crc32c(0, &h, sizeof(h));
	memcpy(buf, &h, sizeof(h));
}

static void fix_trailer(uint8_t *buf, size_t len)
{
	if (len >= sizeof(struct fl_snap_mem_trailer))
		fl_snap_trailer_seal(buf, len);
}

static void check_state(const uint8_t *buf, size_t len, const struct fl_snap_parsed *p)
{
	const uint8_t *end = buf + len;

	if (p->config.nvcpus < 1 || p->config.nvcpus > FL_MAX_VCPUS ||
	    p->config.nslots > FL_SNAP_SLOTS || p->hdr.file_size != len)
		__builtin_trap();
	for (uint32_t i = 0; i < FL_MAX_VCPUS; i++) {
		if (!p->vcpu[i] != (i >= p->config.nvcpus))
			__builtin_trap();
		if (p->vcpu[i] && (p->vcpu[i] < buf || p->vcpu_len[i] > (uint64_t)(end - p->vcpu[i])))
			__builtin_trap();
	}
	for (uint32_t i = 0; i <= FL_SEC_MAX; i++)
		if (p->section[i] &&
		    (p->section[i] < buf || p->section_len[i] > (uint64_t)(end - p->section[i])))
			__builtin_trap();
	for (uint32_t i = 0; i < FL_SNAP_SLOTS; i++)
		if (p->virtio[i] &&
		    (p->virtio[i] < buf || p->virtio_len[i] > (uint64_t)(end - p->virtio[i])))
			__builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fl_snap_parsed *p;
	struct fl_snap_mem_trailer t;
	const struct fl_snap_run *runs;
	char err[256];
	uint8_t mode, *buf;
	size_t len;

	if (size < 1)
		return 0;
	mode = data[0];
	len = size - 1;
	/* Files are read into malloc'd (aligned) buffers: so is the input here. */
	buf = malloc(len ? len : 1);
	p = malloc(sizeof(*p));
	if (!buf || !p)
		abort();
	memcpy(buf, data + 1, len);
	if (mode & 1) {
		if (mode & 2)
			fix_trailer(buf, len);
		if (fl_snap_trailer_parse(buf, len, &t, &runs, err, sizeof(err)) == 0) {
			uint64_t pages = t.mem_size / FL_SNAP_PAGE, sum = 0;
			if ((const uint8_t *)runs != buf || t.nruns * sizeof(*runs) > len)
				__builtin_trap();
			for (uint64_t i = 0; i < t.nruns; i++)
				sum += runs[i].count;
			if (sum > pages)
				__builtin_trap();
		}
	} else {
		if (mode & 2)
			fix_state(buf, len);
		if (fl_snap_parse(buf, len, p, err, sizeof(err)) == 0)
			check_state(buf, len, p);
	}
	free(p);
	free(buf);
	return 0;
}

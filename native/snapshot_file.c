/*
 * The snapshot file format: writing a state file into memory, and checking one read from
 * disk (untrusted: every length and offset is bounded before use). See snapshot.h.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "include/flotilla.h"
#include "snapshot.h"

static uint32_t crc_table[8][256];
static int crc_ready;

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1)));
		crc_table[0][i] = c;
	}
	for (uint32_t i = 0; i < 256; i++)
		for (int t = 1; t < 8; t++)
			crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^
					  crc_table[0][crc_table[t - 1][i] & 0xff];
	__atomic_store_n(&crc_ready, 1, __ATOMIC_RELEASE);
}

/* CRC-32C (Castagnoli), slicing by 8: ~1-2 GB/s, plenty for state files of a few KiB. */
uint32_t fl_crc32c(uint32_t crc, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	if (!__atomic_load_n(&crc_ready, __ATOMIC_ACQUIRE))
		crc_init(); /* idempotent: racing initialisers write the same table */
	crc = ~crc;
	while (len >= 8) {
		uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
				     (uint32_t)p[3] << 24);
		crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
		      crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^
		      crc_table[3][p[4]] ^ crc_table[2][p[5]] ^ crc_table[1][p[6]] ^
		      crc_table[0][p[7]];
		p += 8;
		len -= 8;
	}
	while (len--)
		crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
	return ~crc;
}

static int fail(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -EINVAL;
}

static uint64_t pad8(uint64_t n)
{
	return (n + 7) & ~7ULL;
}

/* ---- writing ---- */

void fl_snap_writer_init(struct fl_snap_writer *w)
{
	memset(w, 0, sizeof(*w));
	w->cap = 64 * 1024;
	w->buf = calloc(1, w->cap);
	w->failed = !w->buf;
	w->len = sizeof(struct fl_snap_header);
}

void fl_snap_writer_fini(struct fl_snap_writer *w)
{
	free(w->buf);
	w->buf = NULL;
}

static int reserve(struct fl_snap_writer *w, uint64_t more)
{
	if (w->failed)
		return -1;
	if (more > FL_SNAP_MAX_STATE || w->len + more > FL_SNAP_MAX_STATE) {
		w->failed = 1;
		return -1;
	}
	while (w->len + more > w->cap) {
		uint8_t *p = realloc(w->buf, w->cap * 2);
		if (!p) {
			w->failed = 1;
			return -1;
		}
		memset(p + w->cap, 0, w->cap);
		w->buf = p;
		w->cap *= 2;
	}
	return 0;
}

uint32_t fl_snap_section_crc(const struct fl_snap_section_header *sh, const uint8_t *padded)
{
	struct fl_snap_section_header h = *sh;

	h.crc = 0;
	return fl_crc32c(fl_crc32c(0, &h, sizeof(h)), padded, pad8(sh->length));
}

void fl_snap_add(struct fl_snap_writer *w, uint32_t type, uint32_t instance, const void *payload,
		 uint64_t len)
{
	struct fl_snap_section_header sh = {
		.type = type,
		.instance = instance,
		.length = len,
	};
	uint8_t *at;

	if (reserve(w, sizeof(sh) + pad8(len)) < 0)
		return;
	at = w->buf + w->len;
	memcpy(at + sizeof(sh), payload, len);
	memset(at + sizeof(sh) + len, 0, pad8(len) - len);
	sh.crc = fl_snap_section_crc(&sh, at + sizeof(sh));
	memcpy(at, &sh, sizeof(sh));
	w->len += sizeof(sh) + pad8(len);
	w->nsections++;
}

int fl_snap_finish(struct fl_snap_writer *w, uint32_t kind, const uint8_t *id,
		   const uint8_t *parent)
{
	struct fl_snap_header h;

	if (w->failed)
		return -ENOMEM;
	memset(&h, 0, sizeof(h));
	h.magic = FL_SNAP_MAGIC;
	h.version = FL_SNAP_VERSION;
	h.header_size = sizeof(h);
	h.kind = kind;
	h.nsections = w->nsections;
	h.file_size = w->len;
	memcpy(h.id, id, FL_SNAP_ID_LEN);
	if (parent)
		memcpy(h.parent, parent, FL_SNAP_ID_LEN);
	h.crc = fl_crc32c(0, &h, sizeof(h));
	memcpy(w->buf, &h, sizeof(h));
	return 0;
}

/* ---- reading ---- */

static const char *section_name(uint32_t type)
{
	static const char *const names[] = {"?",	 "config", "vcpu",  "ioapic", "serial",
					    "i8042", "pm",     "clock", "virtio"};

	return type <= FL_SEC_MAX ? names[type] : "unknown";
}

int fl_snap_check_config(const struct fl_snap_config *c, char *err, size_t errlen)
{
	uint64_t low = c->mem_size < 3ULL << 30 ? c->mem_size : 3ULL << 30;

	if (c->nvcpus < 1 || c->nvcpus > FL_MAX_VCPUS)
		return fail(err, errlen, "snapshot config: %u vCPUs", c->nvcpus);
	if (c->page_size != FL_SNAP_PAGE || c->mem_size % FL_SNAP_PAGE || c->mem_size < (4u << 20) ||
	    c->mem_size > ((uint64_t)FL_MAX_MEMORY_MIB << 20) || c->low_size != low)
		return fail(err, errlen, "snapshot config: bad memory layout");
	if (c->nslots > FL_SNAP_SLOTS)
		return fail(err, errlen, "snapshot config: %u devices", c->nslots);
	for (uint32_t i = 0; i < c->nslots; i++)
		if (c->slots[i].device_id != 1 && c->slots[i].device_id != 2)
			return fail(err, errlen, "snapshot config: device %u of type %u", i,
				    c->slots[i].device_id);
	return 0;
}

int fl_snap_parse(const uint8_t *buf, size_t len, struct fl_snap_parsed *out, char *err,
		  size_t errlen)
{
	struct fl_snap_header h;
	uint32_t crc;
	size_t off;

	memset(out, 0, sizeof(*out));
	if (len < sizeof(h))
		return fail(err, errlen, "snapshot state file is truncated (%zu bytes)", len);
	memcpy(&h, buf, sizeof(h));
	if (h.magic != FL_SNAP_MAGIC)
		return fail(err, errlen, "not a snapshot state file (bad magic)");
	crc = h.crc;
	h.crc = 0;
	if (fl_crc32c(0, &h, sizeof(h)) != crc)
		return fail(err, errlen, "snapshot header checksum mismatch");
	h.crc = crc;
	if (h.version > FL_SNAP_VERSION)
		return fail(err, errlen, "snapshot format version %u is newer than this VMM's (%d)",
			    h.version, FL_SNAP_VERSION);
	if (h.version != FL_SNAP_VERSION || h.header_size != sizeof(h))
		return fail(err, errlen, "snapshot format version %u is not supported", h.version);
	if (h.kind != FL_SNAP_FULL && h.kind != FL_SNAP_DIFF)
		return fail(err, errlen, "snapshot kind %u unknown", h.kind);
	if (h.file_size != len)
		return fail(err, errlen, "snapshot state file is %zu bytes, its header says %llu%s",
			    len, (unsigned long long)h.file_size,
			    len < h.file_size ? " (truncated)" : "");
	if (h.nsections > FL_SNAP_MAX_SECTIONS)
		return fail(err, errlen, "snapshot has %u sections", h.nsections);
	out->hdr = h;

	off = sizeof(h);
	for (uint32_t s = 0; s < h.nsections; s++) {
		struct fl_snap_section_header sh;
		const uint8_t *payload;

		if (len - off < sizeof(sh))
			return fail(err, errlen, "section %u: truncated header", s);
		memcpy(&sh, buf + off, sizeof(sh));
		off += sizeof(sh);
		if (sh.length > len - off || pad8(sh.length) > len - off)
			return fail(err, errlen, "section %u (%s): length %llu past the end", s,
				    section_name(sh.type), (unsigned long long)sh.length);
		payload = buf + off;
		off += pad8(sh.length);
		/* The CRC covers the section's header and its padding too: no byte goes unchecked. */
		if (fl_snap_section_crc(&sh, payload) != sh.crc)
			return fail(err, errlen, "section %u (%s %u): checksum mismatch", s,
				    section_name(sh.type), sh.instance);
		if (sh.type == FL_SEC_VCPU) {
			if (sh.instance >= FL_MAX_VCPUS || out->vcpu[sh.instance])
				return fail(err, errlen, "section %u: vCPU %u out of range or twice",
					    s, sh.instance);
			out->vcpu[sh.instance] = payload;
			out->vcpu_len[sh.instance] = sh.length;
		} else if (sh.type == FL_SEC_VIRTIO) {
			if (sh.instance >= FL_SNAP_SLOTS || out->virtio[sh.instance])
				return fail(err, errlen,
					    "section %u: virtio slot %u out of range or twice", s,
					    sh.instance);
			out->virtio[sh.instance] = payload;
			out->virtio_len[sh.instance] = sh.length;
		} else if (sh.type >= 1 && sh.type <= FL_SEC_MAX && sh.instance == 0) {
			if (out->section[sh.type])
				return fail(err, errlen, "section %s appears twice",
					    section_name(sh.type));
			out->section[sh.type] = payload;
			out->section_len[sh.type] = sh.length;
		} else {
			return fail(err, errlen, "section %u: unknown type %u instance %u", s,
				    sh.type, sh.instance);
		}
	}
	if (off != len)
		return fail(err, errlen, "%zu bytes after the last section", len - off);

	if (!out->section[FL_SEC_CONFIG] ||
	    out->section_len[FL_SEC_CONFIG] != sizeof(struct fl_snap_config))
		return fail(err, errlen, "snapshot has no machine config");
	memcpy(&out->config, out->section[FL_SEC_CONFIG], sizeof(out->config));
	if (fl_snap_check_config(&out->config, err, errlen) < 0)
		return -EINVAL;
	for (uint32_t t = FL_SEC_IOAPIC; t <= FL_SEC_CLOCK; t++)
		if (!out->section[t])
			return fail(err, errlen, "snapshot has no %s section", section_name(t));
	for (uint32_t i = 0; i < FL_MAX_VCPUS; i++)
		if (!out->vcpu[i] != (i >= out->config.nvcpus))
			return fail(err, errlen, "vCPU sections do not match the %u vCPUs",
				    out->config.nvcpus);
	for (uint32_t i = 0; i < FL_SNAP_SLOTS; i++)
		if (!out->virtio[i] != (i >= out->config.nslots))
			return fail(err, errlen, "virtio sections do not match the %u devices",
				    out->config.nslots);
	if (out->section_len[FL_SEC_CLOCK] != sizeof(struct fl_snap_clock))
		return fail(err, errlen, "clock section is %llu bytes",
			    (unsigned long long)out->section_len[FL_SEC_CLOCK]);
	return 0;
}

/* ---- the memory file's trailer ---- */

uint64_t fl_snap_trailer_size(uint64_t nruns)
{
	uint64_t n = sizeof(struct fl_snap_mem_trailer) + nruns * sizeof(struct fl_snap_run);

	return (n + FL_SNAP_PAGE - 1) / FL_SNAP_PAGE * FL_SNAP_PAGE;
}

/* Every byte of the trailer up to the CRC, which is its last field and the file's last 4. */
static uint32_t trailer_crc(const uint8_t *buf, size_t len)
{
	return fl_crc32c(0, buf, len - sizeof(uint32_t));
}

void fl_snap_trailer_seal(uint8_t *buf, size_t len)
{
	uint32_t crc = trailer_crc(buf, len);

	memcpy(buf + len - sizeof(crc), &crc, sizeof(crc));
}

int fl_snap_trailer_parse(const uint8_t *buf, size_t len, struct fl_snap_mem_trailer *out,
			  const struct fl_snap_run **runs, char *err, size_t errlen)
{
	struct fl_snap_mem_trailer t;
	const struct fl_snap_run *r;
	uint64_t pages, next = 0;

	if (len < sizeof(t))
		return fail(err, errlen, "memory file is truncated (no trailer)");
	memcpy(&t, buf + len - sizeof(t), sizeof(t));
	if (t.magic != FL_SNAP_MEM_MAGIC)
		return fail(err, errlen, "not a snapshot memory file (bad trailer magic)");
	if (t.version > FL_SNAP_VERSION)
		return fail(err, errlen, "memory file version %u is newer than this VMM's (%d)",
			    t.version, FL_SNAP_VERSION);
	if (t.version != FL_SNAP_VERSION || t.page_size != FL_SNAP_PAGE ||
	    (t.kind != FL_SNAP_FULL && t.kind != FL_SNAP_DIFF) || t.mem_size % FL_SNAP_PAGE ||
	    t.mem_size > ((uint64_t)FL_MAX_MEMORY_MIB << 20))
		return fail(err, errlen, "memory file trailer is malformed");
	pages = t.mem_size / FL_SNAP_PAGE;
	if (t.nruns > pages || t.nruns > (len - sizeof(t)) / sizeof(struct fl_snap_run) ||
	    (t.kind == FL_SNAP_FULL && t.nruns))
		return fail(err, errlen, "memory file trailer is truncated or malformed");
	if (fl_snap_trailer_size(t.nruns) != len)
		return fail(err, errlen, "memory file has %zu bytes of trailer, expected %llu", len,
			    (unsigned long long)fl_snap_trailer_size(t.nruns));
	r = (const struct fl_snap_run *)(const void *)buf;
	if (trailer_crc(buf, len) != t.crc)
		return fail(err, errlen, "memory file trailer checksum mismatch");
	for (uint64_t i = 0; i < t.nruns; i++) {
		if (r[i].count == 0 || r[i].first < next || r[i].first > pages ||
		    r[i].count > pages - r[i].first)
			return fail(err, errlen, "memory file run %llu is out of order or range",
				    (unsigned long long)i);
		next = r[i].first + r[i].count;
	}
	*out = t;
	*runs = r;
	return 0;
}
